"""Medusa and Hydra draft heads on the target's last hidden state.

* Medusa-1 (Cai et al. 2024, arXiv 2401.10774; FasterDecoding/Medusa ``medusa_model.py``): head ``i``
  = ``num_layers`` residual blocks ``x + SiLU(W x)`` (W zero-initialised) then a Linear(h → V)
  initialised from the target's LM head; from the feature of position ``t`` it predicts the token
  at ``t + 2 + i``. The heads do not see each other's tokens. Loss: Σ_i 0.8^i · CE_i.
* Hydra (Ankner et al. 2024, arXiv 2402.05109; zankner/Hydra): sequentially dependent heads —
  head ``i`` also reads the embeddings of the tokens before the one it predicts (the last emitted
  token and the ``i`` tokens earlier heads chose): Linear((i + 2)·h → h), residual blocks, Linear(h → V).

Labels are the target's argmax at each position (the self-generated corpus is its greedy output),
so the heads learn what verification accepts. Weight names of Medusa follow the published
``medusa_lm_head`` files: ``{i}.{j}.linear.weight/bias`` for block ``j`` and ``{i}.{num_layers}.weight``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.methods.draft_heads import DraftVocab, check_target_shape, load_checkpoint
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.registry import DecodeBenchError


class ResBlock(nn.Module):
    """``x + SiLU(linear(x))`` with a zero-initialised weight (Medusa's ResBlock)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


@dataclass
class HeadParams:
    """What Medusa's and Hydra's heads share (each network sets its own ``num_heads``)."""

    num_heads: int = 5
    num_layers: int = 1  # residual blocks per head (medusa_num_layers 1; Hydra: after the input projection)
    draft_vocab_size: int | None = None  # null = the full vocabulary (Medusa-1, Hydra)
    head_decay: float = 0.8  # loss weight of head i: decay ** i

    def __post_init__(self) -> None:
        check(self.num_heads >= 1, "drafter.params.num_heads", self.num_heads, ">= 1")
        check(self.num_layers >= 0, "drafter.params.num_layers", self.num_layers, ">= 0")
        check(
            self.draft_vocab_size is None or self.draft_vocab_size >= 2,
            "drafter.params.draft_vocab_size",
            self.draft_vocab_size,
            ">= 2 or null",
        )


class _Heads(nn.Module):
    """What Medusa and Hydra heads share: the draft vocabulary, the output layers and checkpoints."""

    network = ""
    Params: type[Any]  # the subclass's hyperparameter dataclass (MedusaHeads.Params, HydraHeads.Params)

    def _output_layer(self, backbone: Backbone, vocab: DraftVocab | None) -> nn.Linear:
        weight = backbone.lm_head.weight if vocab is None else backbone.lm_head.weight[vocab.ids]
        layer = nn.Linear(backbone.config.hidden_size, weight.shape[0], bias=False)
        layer.weight = nn.Parameter(weight.detach().clone())
        return layer

    def _register_vocab(self, vocab: DraftVocab | None) -> None:
        self.vocab = vocab
        if vocab is not None:
            self.register_buffer("d2t", vocab.d2t)
            self.register_buffer("t2d", vocab.t2d)
            self.register_buffer("draft_index", vocab.draft_index(), persistent=False)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.vocab is None else draft_ids + self.d2t[draft_ids]

    def labels(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids → draft ids (-1 = outside the draft vocabulary, ignored by the loss)."""
        return target_ids if self.vocab is None else self.draft_index[target_ids]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("heads."): v for k, v in self.state_dict().items()}

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": asdict(self.params),
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
            "draft_vocab_size": None if self.vocab is None else self.vocab.size,
        }

    @classmethod
    def load(cls, backbone: Backbone, directory) -> _Heads:
        state, config = load_checkpoint(directory)
        check_target_shape(config, backbone, directory)
        vocab = DraftVocab.from_maps(state["d2t"], state["t2d"]) if "d2t" in state else None
        heads = cls(backbone, cls.Params(**config.get("params", {})), vocab)
        prefixed = {(k if k in ("d2t", "t2d") else f"heads.{k}"): v for k, v in state.items()}
        missing, unexpected = heads.load_state_dict(prefixed, strict=False)
        if missing or unexpected:
            raise DecodeBenchError(
                f"{cls.network} checkpoint {directory} does not fit: missing {missing}, unexpected {unexpected}"
            )
        return heads.eval()

    def _weighted_loss(
        self, logits_per_head: list[torch.Tensor], labels_per_head: list[torch.Tensor], decay: float
    ) -> tuple[torch.Tensor, Agreement]:
        loss = logits_per_head[0].new_zeros(())
        for i, (logits, labels) in enumerate(zip(logits_per_head, labels_per_head)):
            if logits.shape[0]:
                loss = loss + decay**i * F.cross_entropy(logits.float(), self.labels(labels), ignore_index=-1)
        first = logits_per_head[0]
        drafted = self.to_target(first.argmax(-1))
        return loss, Agreement(int((drafted == labels_per_head[0]).sum()), int(first.shape[0]))


class MedusaHeads(_Heads):
    network = "medusa"

    @dataclass
    class Params(HeadParams):
        num_heads: int = 5  # published Medusa-1 heads (medusa_num_heads 5)

    def __init__(self, backbone: Backbone, params: MedusaHeads.Params, vocab: DraftVocab | None = None):
        super().__init__()
        self.params = params
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(
            [
                nn.Sequential(
                    *[ResBlock(hidden) for _ in range(params.num_layers)], self._output_layer(backbone, vocab)
                )
                for _ in range(params.num_heads)
            ]
        )
        self._register_vocab(vocab)
        self.to(device=backbone.device, dtype=backbone.dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(q, hidden)`` → ``(num_heads, q, draft vocab)`` logits."""
        return torch.stack([head(features) for head in self.heads]).float()

    def loss(self, sequence: FeatureSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Head ``i`` at position ``t`` against the target's argmax at ``t + 1 + i`` (= token ``t + 2 + i``)."""
        features, target_next = sequence.features, sequence.target_next
        length, start = features.shape[0], max(sequence.answer_start - 1, 0)
        logits, labels = [], []
        for i, head in enumerate(self.heads):
            rows = slice(start, max(length - 1 - i, start))
            logits.append(head(features[rows]))
            labels.append(target_next[rows.start + 1 + i : rows.stop + 1 + i])
        return self._weighted_loss(logits, labels, self.params.head_decay)


class HydraHeads(_Heads):
    network = "hydra"

    @dataclass
    class Params(HeadParams):
        num_heads: int = 4  # Hydra++: 4 heads

    def __init__(self, backbone: Backbone, params: HydraHeads.Params, vocab: DraftVocab | None = None):
        super().__init__()
        self.params = params
        hidden = backbone.config.hidden_size
        self.heads = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear((i + 2) * hidden, hidden),
                    *[ResBlock(hidden) for _ in range(params.num_layers)],
                    self._output_layer(backbone, vocab),
                )
                for i in range(params.num_heads)
            ]
        )
        self._register_vocab(vocab)
        self._target = {"embed": backbone.embed_tokens}  # frozen, shared with the target
        self.to(device=backbone.device, dtype=backbone.dtype)

    def head_logits(self, index: int, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Head ``index`` on ``(q, hidden)`` features and ``(q, index + 1)`` preceding tokens (the last
        emitted one, then the earlier heads' choices) → ``(q, draft vocab)`` logits."""
        embedded = self._target["embed"](tokens).flatten(1)
        return self.heads[index](torch.cat([features, embedded], dim=-1)).float()

    def loss(self, sequence: FeatureSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Head ``i`` at position ``t``: feature ``f_t`` + tokens ``t+1 .. t+1+i`` (teacher forcing)
        against the target's argmax at ``t + 1 + i``."""
        features, ids, target_next = sequence.features, sequence.ids, sequence.target_next
        length, start = features.shape[0], max(sequence.answer_start - 1, 0)
        logits, labels = [], []
        for i in range(len(self.heads)):
            stop = max(length - 1 - i, start)
            tokens = ids[1:].unfold(0, i + 1, 1)[start:stop]  # row t: ids[t+1 .. t+1+i]
            logits.append(self.head_logits(i, features[start:stop], tokens))
            labels.append(target_next[start + 1 + i : stop + 1 + i])
        return self._weighted_loss(logits, labels, self.params.head_decay)
