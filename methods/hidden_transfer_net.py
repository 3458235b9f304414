"""Hidden Transfer's trained transfer layers (Wu et al. 2024, "Parallel Decoding via Hidden Transfer
for Lossless Large Language Model Acceleration", arXiv 2404.12022; no public code).

At the transfer layer ``l`` (the config names it; default the middle layer) the hidden state
``h_n^l`` of a position ``n`` (the input of layer ``l``) is mapped by one linear layer per future
offset ``j = 1 .. k`` to a pseudo hidden state ``p_{n,j} = W_j h_n^l`` standing for the not yet known
token ``n + j``. The pseudo states run through the target's remaining layers ``l .. L-1`` together
with the real tokens: pseudo ``(n, j)`` sits at position ``n + j`` and attends to the real positions
``<= n`` and to the pseudo states ``(n, 1 .. j)``; the real tokens never see them. The target's own
final norm and LM head turn ``p_{n,j}`` into a prediction of token ``n + j + 1``. The target stays
frozen; only the ``W_j`` (initialised to the identity: "the next token looks like this one") train.

Training (:meth:`HiddenTransferNet.loss`): the target's lower layers run once per corpus sequence
(cached, no gradient), then one masked forward of the upper layers over the real states and every
answer position's ``k`` pseudo states; loss Σ_j decay^(j-1) · CE(logits_{n,j}, target argmax at
``n + j``), the gradient flowing through the frozen upper layers into the transfer layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.methods.draft_heads import check_target_shape, load_checkpoint
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.registry import DecodeBenchError


def pseudo_layout(parents: list[int], depths: list[int], future: int) -> tuple[torch.Tensor, list[int]]:
    """``(q + q·k, q + q·k)`` bool mask and position offsets for ``q`` real nodes (a tree: ancestors
    only) followed by ``k`` pseudo states per node, node-major: pseudo ``(i, j)`` sees node ``i``'s
    ancestors, node ``i`` itself and pseudo ``(i, 1 .. j)``, at offset ``depth(i) + j``."""
    from decodebench.engine.tree import ancestor_mask

    q = len(parents)
    total = q * (1 + future)
    mask = torch.zeros(total, total, dtype=torch.bool)
    real = ancestor_mask(parents)
    mask[:q, :q] = real
    offsets = list(depths)
    for i in range(q):
        for j in range(future):
            row = q + i * future + j
            mask[row, :q] = real[i]
            mask[row, q + i * future : row + 1] = True
            offsets.append(depths[i] + j + 1)
    return mask, offsets


class HiddenTransferNet(nn.Module):
    network = "hidden_transfer"

    @dataclass
    class Params:
        transfer_layer: int | None = None  # layer whose INPUT is transferred; null = num_layers // 2
        num_future: int = 3  # pseudo hidden states per position = draft depth
        future_decay: float = 0.8  # loss weight of offset j: decay ** (j - 1)

        def __post_init__(self) -> None:
            check(
                self.transfer_layer is None or self.transfer_layer >= 1,
                "drafter.params.transfer_layer",
                self.transfer_layer,
                ">= 1 or null",
            )
            check(self.num_future >= 1, "drafter.params.num_future", self.num_future, ">= 1")
            check(0 < self.future_decay <= 1, "drafter.params.future_decay", self.future_decay, "(0, 1]")

    def __init__(self, backbone: Backbone, params: HiddenTransferNet.Params, vocab=None):
        super().__init__()
        if vocab is not None:
            raise DecodeBenchError(
                "hidden_transfer drafts with the target's own LM head: drafter.params.draft_vocab_size does not apply"
            )
        layers = backbone.num_layers
        self.layer = layers // 2 if params.transfer_layer is None else params.transfer_layer
        if not 1 <= self.layer < layers:
            raise DecodeBenchError(
                f"drafter.params.transfer_layer={self.layer} must be in [1, {layers - 1}] for a {layers}-layer target"
            )
        self.params = params
        hidden = backbone.config.hidden_size
        self.transfer = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(params.num_future)])
        with torch.no_grad():
            for linear in self.transfer:
                linear.weight.copy_(torch.eye(hidden))
                linear.bias.zero_()
        self._lower: dict[int, torch.Tensor] = {}  # id(sequence) -> its layer-l input (training cache)
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- shape / checkpoint ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": {**asdict(self.params), "transfer_layer": self.layer},
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
            "num_hidden_layers": backbone.num_layers,
        }

    @classmethod
    def load(cls, backbone: Backbone, directory) -> HiddenTransferNet:
        state, config = load_checkpoint(directory)
        check_target_shape(config, backbone, directory)
        if config.get("network") != cls.network:
            raise DecodeBenchError(f"checkpoint {directory} holds a {config.get('network')} drafter, not {cls.network}")
        if int(config.get("num_hidden_layers", backbone.num_layers)) != backbone.num_layers:
            raise DecodeBenchError(
                f"checkpoint {directory} was made for a {config['num_hidden_layers']}-layer target, "
                f"this one has {backbone.num_layers}"
            )
        net = cls(backbone, cls.Params(**config.get("params", {})))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DecodeBenchError(
                f"{cls.network} checkpoint {directory} does not fit: missing {missing}, unexpected {unexpected}"
            )
        return net.eval()

    # -- forward pieces ----------------------------------------------------------------------------
    def pseudo_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(q, hidden)`` layer-``l`` inputs → ``(q·k, hidden)`` pseudo states, node-major."""
        return torch.stack([linear(hidden) for linear in self.transfer], dim=1).reshape(-1, hidden.shape[-1])

    def _lower_states(self, sequence: FeatureSequence, backbone: Backbone) -> torch.Tensor:
        """The target's input to layer ``l`` at every position of ``sequence`` (computed once)."""
        key = id(sequence)
        if key not in self._lower:
            ids = sequence.ids.to(backbone.device)
            out = backbone.forward(
                ids,
                backbone.new_cache(ids.shape[0] + 8),
                plan=_lower_plan(self.layer),
                logits_rows=slice(0, 0),
                output_hidden_states=True,
            )
            self._lower[key] = out.hidden_states[-1].clone()
        return self._lower[key]

    def _upper(self, backbone: Backbone, hidden: torch.Tensor, mask: torch.Tensor, offsets: list[int]) -> torch.Tensor:
        """The target's layers ``l .. L-1`` + final norm on ``(q, hidden)`` states with a ``(q, q)``
        block mask (no cache), differentiable; returns the normed ``(q, hidden)``."""
        positions = torch.tensor(offsets, device=hidden.device)
        attention = backbone._block_mask(0, positions, mask.to(hidden.device), None)
        x = hidden[None]
        for index in range(self.layer, backbone.num_layers):
            rotary = backbone.layer_position_embeddings(x, positions[None], index)
            out = backbone.layers[index](
                x,
                attention_mask=attention,
                position_ids=positions[None],
                position_embeddings=rotary,
                **backbone.parts.layer_kwargs,
            )
            x = out[0] if isinstance(out, tuple) else out
        return backbone.norm(x)[0]

    # -- training ----------------------------------------------------------------------------------
    def loss(self, sequence: FeatureSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Pseudo states of every answer position ``n`` (offsets ``1 .. k``) through the upper layers
        beside the real states; CE against the target's argmax at ``n + j``."""
        lower = self._lower_states(sequence, backbone)
        length, k = lower.shape[0], self.params.num_future
        start = max(sequence.answer_start - 1, 0)
        rows = torch.arange(start, max(length - 1, start))  # n with at least the label of j = 1
        q, r = length, rows.shape[0]
        total = q + r * k
        mask = torch.zeros(total, total, dtype=torch.bool)
        mask[:q, :q] = torch.ones(q, q, dtype=torch.bool).tril_()
        offsets = list(range(q))
        for index, n in enumerate(rows.tolist()):
            for j in range(k):
                row = q + index * k + j
                mask[row, : n + 1] = True
                mask[row, q + index * k : row + 1] = True
                offsets.append(n + j + 1)
        pseudo = self.pseudo_states(lower[rows.to(lower.device)])
        normed = self._upper(backbone, torch.cat([lower, pseudo]), mask, offsets)
        logits = backbone.head(normed[q:]).float().reshape(r, k, -1)
        target_next = sequence.target_next.to(logits.device)
        loss, agreement = logits.new_zeros(()), Agreement(0, 0)
        for j in range(k):
            valid = rows + j + 1 < length  # the label of (n, j+1) is the argmax at n + j + 1
            if not bool(valid.any()):
                break
            labels = target_next[(rows + j + 1)[valid]]
            head = logits[valid.to(logits.device), j]
            loss = loss + self.params.future_decay**j * F.cross_entropy(head, labels)
            if j == 0:
                agreement = Agreement(int((head.argmax(-1) == labels).sum()), int(labels.shape[0]))
        return loss, agreement


def _lower_plan(layer: int):
    from decodebench.engine.backbone import ForwardPlan

    return ForwardPlan(layers=range(layer))
