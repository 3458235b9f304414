"""The Clover drafter network (Xiao et al. 2024, "Clover: Regressive Lightweight Speculative Decoding
with Sequential Knowledge", arXiv 2405.00263; reference code XiaoBin1992/clover, whose ``clover2.py``
keeps the same three parts in Clover-2): Medusa-style heads made sequential.

* Augmenting block: one decoder layer of the target's own class, initialised from the target's LAST
  layer (as the reference does), plus a norm initialised from the target's final norm, run causally
  over the target's feature sequence ``F`` (last hidden states after the norm) → ``H``, the
  sequence knowledge every head reads. It runs once per committed token (its own KV cache).
* Attention decoder (the regressive connection, an RNN cell shared by all heads): from the state
  ``s`` and the embedding of the previously speculated token ``e``: ``x = fc([e; s])`` (initialised
  to pass ``s`` through), then ``s' = x + o(Attn(q(x), k(H_≤t), v(H_≤t)))`` — cross-attention of the
  current state over the sequence's augmented hidden states (the prompt and everything emitted).
  ``s_0 = H_t`` (the augmented state of the last committed position).
* Head ``i``: a residual block (Medusa's, zero-initialised), the output norm and the LM head (the
  target's, or the reduced draft vocabulary) on ``s_{i+1}``; it predicts the token ``t + 2 + i``
  from ``x_{t+1+i}``, the token head ``i - 1`` speculated (teacher-forced in training).

Training (:meth:`CloverNet.loss`): Σ_i decay^i · CE(head_i, target argmax), Medusa's weighting.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.kv_cache import KVCache
from decodebench.methods.draft_heads import DraftVocab, check_target_shape, load_checkpoint
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.methods.medusa_heads import ResBlock
from decodebench.registry import DecodeBenchError


class AttentionDecoder(nn.Module):
    """The regressive cell: ``(state, token embedding)`` + cross-attention over the sequence states."""

    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        if hidden % num_heads:
            raise DecodeBenchError(f"hidden size {hidden} is not divisible by {num_heads} attention heads")
        self.num_heads = num_heads
        self.fc = nn.Linear(2 * hidden, hidden)
        with torch.no_grad():  # start as "pass the state through" (the reference's part-eye init)
            self.fc.weight.zero_()
            self.fc.weight[:, hidden:] = torch.eye(hidden)
            self.fc.bias.zero_()
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        nn.init.zeros_(self.o.weight)  # the attention adds nothing until trained

    def keys_values(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(T, hidden)`` augmented states → per-head keys and values ``(heads, T, dim)``."""
        return self._split(self.k(sequence)), self._split(self.v(sequence))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], self.num_heads, -1).transpose(0, 1)

    def forward(
        self,
        state: torch.Tensor,
        embedded: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        visible: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(n, hidden)`` states and token embeddings → next states; ``visible`` ``(n, T)`` bool
        (None = every key is visible)."""
        x = self.fc(torch.cat([embedded, state], dim=-1))
        query = self._split(self.q(x))
        attended = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=None if visible is None else visible[None]
        )
        return x + self.o(attended.transpose(0, 1).reshape(x.shape))


class CloverNet(nn.Module):
    network = "clover"

    @dataclass
    class Params:
        num_heads: int = 5  # speculative heads (depth of the draft tree); the paper compares with Medusa's 5
        draft_vocab_size: int | None = None  # null = the target's full vocabulary
        head_decay: float = 0.8  # loss weight of head i: decay ** i (Medusa's weighting)

        def __post_init__(self) -> None:
            check(self.num_heads >= 1, "drafter.params.num_heads", self.num_heads, ">= 1")
            check(
                self.draft_vocab_size is None or self.draft_vocab_size >= 2,
                "drafter.params.draft_vocab_size",
                self.draft_vocab_size,
                ">= 2 or null",
            )
            check(0 < self.head_decay <= 1, "drafter.params.head_decay", self.head_decay, "(0, 1]")

    def __init__(self, backbone: Backbone, params: CloverNet.Params, vocab: DraftVocab | None = None):
        super().__init__()
        config = backbone.config
        hidden = config.hidden_size
        self.params = params
        self.vocab = vocab
        # augmenting block: the target's last layer (slot 0 of the drafter's own one-layer cache)
        layer = type(backbone.layers[-1])(config, 0)
        layer.load_state_dict(backbone.layers[-1].state_dict())
        self.augment = layer
        self.augment_norm = copy.deepcopy(backbone.norm)
        self.decoder = AttentionDecoder(hidden, config.num_attention_heads)
        self.heads = nn.ModuleList([ResBlock(hidden) for _ in range(params.num_heads)])
        self.head_norm = copy.deepcopy(backbone.norm)
        weight = backbone.lm_head.weight if vocab is None else backbone.lm_head.weight[vocab.ids]
        self.head = nn.Linear(hidden, weight.shape[0], bias=False)
        self.head.weight = nn.Parameter(weight.detach().clone())
        if vocab is not None:
            self.register_buffer("d2t", vocab.d2t)
            self.register_buffer("t2d", vocab.t2d)
            self.register_buffer("draft_index", vocab.draft_index(), persistent=False)
        # frozen, shared with the target (not stored in checkpoints)
        self._target = {"embed": backbone.embed_tokens, "rotary": backbone.rotary_emb, "backbone": backbone}
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- shape / checkpoint ------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": asdict(self.params),
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
            "draft_vocab_size": None if self.vocab is None else self.vocab.size,
        }

    @classmethod
    def load(cls, backbone: Backbone, directory) -> CloverNet:
        state, config = load_checkpoint(directory)
        check_target_shape(config, backbone, directory)
        if config.get("network") != cls.network:
            raise DecodeBenchError(f"checkpoint {directory} holds a {config.get('network')} drafter, not clover")
        vocab = DraftVocab.from_maps(state["d2t"], state["t2d"]) if "d2t" in state else None
        net = cls(backbone, cls.Params(**config.get("params", {})), vocab)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise DecodeBenchError(
                f"clover checkpoint {directory} does not fit: missing {missing}, unexpected {unexpected}"
            )
        return net.eval()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.vocab is None else draft_ids + self.d2t[draft_ids]

    # -- forward pieces ----------------------------------------------------------------------------
    def new_cache(self, backbone: Backbone, capacity: int = 512) -> KVCache:
        return KVCache(
            1,
            backbone.config.num_key_value_heads,
            backbone.head_dim,
            capacity,
            dtype=backbone.dtype,
            device=backbone.device,
        )

    def augmented(self, features: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """``(q, hidden)`` target features at ``positions`` → augmented states ``H`` (causal; on top of
        ``cache`` when given, which then holds the block's K/V)."""
        backbone = self._target["backbone"]
        hidden = features.to(self.head.weight.dtype)[None]
        prefix = 0 if cache is None else cache.length
        if cache is not None:
            cache.ensure_capacity(prefix + hidden.shape[1])
        mask = backbone._block_mask(prefix, positions, None, None)
        rotary = self._target["rotary"](hidden, positions[None]) if self._target["rotary"] is not None else None
        out = self.augment(
            hidden,
            attention_mask=mask,
            position_ids=positions[None],
            use_cache=cache is not None,
            position_embeddings=rotary,
            **backbone.cache_argument(cache),
        )
        out = out[0] if isinstance(out, tuple) else out
        return self.augment_norm(out)[0]

    def head_logits(self, index: int, state: torch.Tensor) -> torch.Tensor:
        """Head ``index`` on ``(n, hidden)`` states → ``(n, draft vocab)`` logits."""
        return self.head(self.head_norm(self.heads[index](state))).float()

    # -- training ----------------------------------------------------------------------------------
    def loss(self, sequence: FeatureSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Head ``i`` at position ``t``: ``s_0 = H_t``, tokens ``x_{t+1} .. x_{t+1+i}`` fed regressively
        (teacher forcing), against the target's argmax at ``t + 1 + i``."""
        features, ids, target_next = sequence.features, sequence.ids, sequence.target_next
        length = ids.shape[0]
        positions = torch.arange(length, device=features.device)
        states = self.augmented(features, positions, None)  # (T, hidden)
        keys, values = self.decoder.keys_values(states)
        start = max(sequence.answer_start - 1, 0)
        rows = torch.arange(start, max(length - 1, start), device=features.device)
        state = states[rows]
        loss, agreement = states.new_zeros(()), Agreement(0, 0)
        for i in range(len(self.heads)):
            rows = rows[rows + 1 + i < length]
            if not rows.numel():
                break
            state = state[: rows.shape[0]]
            visible = positions[None, :] <= rows[:, None]  # H_0 .. H_t
            state = self.decoder(state, self._target["embed"](ids[rows + 1 + i]), keys, values, visible)
            logits = self.head_logits(i, state)
            labels = target_next[rows + 1 + i]
            draft_labels = labels if self.vocab is None else self.draft_index[labels]
            loss = loss + self.params.head_decay**i * F.cross_entropy(logits, draft_labels, ignore_index=-1)
            if i == 0:
                drafted = self.to_target(logits.argmax(-1))
                agreement = Agreement(int((drafted == labels).sum()), int(labels.shape[0]))
        return loss, agreement
