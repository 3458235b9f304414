"""The EAGLE-3 drafter network (Li et al. 2025, arXiv 2503.01840; SafeAILab/EAGLE ``main``,
``eagle/traineagle3/cnets.py`` for training, ``eagle/model/cnets.py`` for inference).

Differences from EAGLE-1/2 (:mod:`~decodebench.methods.eagle_net`):

* **multi-layer features**: the target's hidden states entering three of its layers — low, middle
  and high, by default ``[2, L // 2, L - 3]`` as the reference collects them — are concatenated
  ``(3h)`` and fused by ``fc`` (Linear 3h → h, no bias). Feature regression is dropped: the
  drafter's own hidden state is free to be whatever predicts tokens best;
* **the decoder layer reads [embedding; hidden] (2h)**: ``input_layernorm`` normalises the token
  embedding, ``hidden_norm`` the fused (or own previous) hidden state, q/k/v project the 2h
  concatenation, the residual is the hidden state; then ``post_attention_layernorm`` + gated MLP.
  The layer is Llama-shaped whatever the target family (as the reference's ``LlamaDecoderLayeremb``);
  its rotary embedding is the target's;
* **own head**: ``norm`` + ``lm_head`` (h → draft vocabulary), trained; the reduced vocabulary's
  ``d2t`` / ``t2d`` map draft ids to target ids (:class:`~decodebench.methods.draft_heads.DraftVocab`).
  ``lm_head`` starts from the target's LM-head rows of the draft vocabulary (the reference starts
  from random weights with 68k ShareGPT conversations; here a few thousand tokens);
* **training-time test** (:meth:`Eagle3Net.loss`): the drafter is unrolled ``ttt_steps`` times (7
  in the reference). Step 0 reads the fused target features; step ``s`` reads, at row ``t``, its
  own output of step ``s - 1`` at row ``t`` and the embedding of token ``x_{t+1+s}`` at position
  ``t + s``, and predicts the target's distribution at position ``t + 1 + s``. Its attention sees
  step 0's keys of rows ``0..t`` (the committed prefix) and, of every step ``1..s``, row ``t``'s key
  only — the keys the same chain has in a draft tree at inference. Loss: soft cross-entropy against
  the target's distribution restricted to the draft vocabulary, on answer positions whose target
  argmax is in the draft vocabulary, step ``s`` weighted ``step_decay ** s`` (0.8 in the reference).

Inference is EAGLE-2's dynamic tree (:class:`~decodebench.methods.eagle3.Eagle3Drafter`): committed
tokens carry their fused target features ``(3h)``, draft nodes their parent's predicted hidden
state ``(h)``; :meth:`Eagle3Net.forward` takes either.

Weight names follow the published EAGLE-3 checkpoints (``fc.weight``, ``midlayer.hidden_norm.weight``,
``midlayer.input_layernorm.weight``, ``midlayer.self_attn.{q,k,v,o}_proj.weight``,
``midlayer.post_attention_layernorm.weight``, ``midlayer.mlp.{gate,up,down}_proj.weight``,
``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d``); the token embedding is the target's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.kv_cache import KVCache
from decodebench.methods.draft_heads import DraftVocab
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.registry import DecodeBenchError


def reference_layers(num_layers: int) -> list[int]:
    """The layers whose inputs the reference fuses: 2, L // 2 and L - 3 (low, middle, high)."""
    return sorted({2, num_layers // 2, num_layers - 3})


@dataclass
class LayeredSequence:
    """A corpus sequence with the target's fused multi-layer features (computed once per training run)."""

    sequence: FeatureSequence
    fused: torch.Tensor  # (T, 3h): inputs of the three named target layers, concatenated


class Eagle3Attention(nn.Module):
    """Attention over the ``2h`` [embedding; hidden] input with the target's head layout."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def project(self, x: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, 2h)`` → rotated queries ``(1, heads, q, d)``, keys and values ``(1, kv_heads, q, d)``."""
        q = x.shape[0]
        query = self.q_proj(x).view(1, q, self.heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(x).view(1, q, self.kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(x).view(1, q, self.kv_heads, self.head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *rotary)
        return query, key, value

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """``(1, heads, q, d)`` → ``(q, h)``."""
        return self.o_proj(attended.transpose(1, 2).reshape(attended.shape[2], -1))

    def expand(self, states: torch.Tensor) -> torch.Tensor:
        return states.repeat_interleave(self.heads // self.kv_heads, dim=1)


class Eagle3Layer(nn.Module):
    """The reference's ``LlamaDecoderLayeremb``: one decoder layer on [norm(embedding); norm(hidden)]."""

    def __init__(self, config, head_dim: int):
        super().__init__()
        hidden, eps = config.hidden_size, getattr(config, "rms_norm_eps", 1e-6)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.self_attn = Eagle3Attention(hidden, config.num_attention_heads, config.num_key_value_heads, head_dim)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(hidden, config.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(config.intermediate_size, hidden, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def attention_input(self, embeddings: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embeddings), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        """Residual over the hidden input, then the MLP block."""
        hidden = hidden + attention_out
        normed = self.post_attention_layernorm(hidden)
        return hidden + self.mlp.down_proj(self.act(self.mlp.gate_proj(normed)) * self.mlp.up_proj(normed))


class Eagle3Net(nn.Module):
    network = "eagle3"  # checkpoint folder and ``drafter=`` name
    attn_implementation = "sdpa"  # masks handed to forward: bool (True = attend)

    @dataclass
    class Params:
        draft_vocab_size: int | None = 32000  # reference (LLaMA-3.1-8B, 128k vocabulary); null = full
        layers: list[int] | None = None  # target layers whose INPUTS are fused; null = [2, L // 2, L - 3]
        ttt_steps: int = 7  # training-time-test unroll (reference self.length = 7)
        step_decay: float = 0.8  # loss weight of unroll step s: step_decay ** s (reference 0.8)

        def __post_init__(self) -> None:
            check(
                self.draft_vocab_size is None or self.draft_vocab_size >= 2,
                "drafter.params.draft_vocab_size",
                self.draft_vocab_size,
                ">= 2 or null",
            )
            check(
                self.layers is None or len(self.layers) == 3,
                "drafter.params.layers",
                self.layers,
                "three target layer indices (low, middle, high) or null",
            )
            check(self.ttt_steps >= 1, "drafter.params.ttt_steps", self.ttt_steps, ">= 1")
            check(0 < self.step_decay <= 1, "drafter.params.step_decay", self.step_decay, "(0, 1]")

    def __init__(self, backbone: Backbone, params: Eagle3Net.Params, vocab: DraftVocab | None = None):
        super().__init__()
        config = backbone.config
        hidden, num_layers = config.hidden_size, backbone.num_layers
        layers = list(params.layers) if params.layers is not None else reference_layers(num_layers)
        if len(set(layers)) != 3 or not all(0 <= i < num_layers for i in layers):
            raise DecodeBenchError(
                f"drafter.params.layers: EAGLE-3 fuses the inputs of three distinct target layers in "
                f"[0, {num_layers}), got {layers}; name them explicitly (e.g. drafter.params.layers=[0,1,2])"
            )
        self.params, self.vocab, self.feature_layers = params, vocab, sorted(layers)
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config, backbone.head_dim)
        self.norm = LlamaRMSNorm(hidden, eps=getattr(config, "rms_norm_eps", 1e-6))
        head = backbone.lm_head.weight if vocab is None else backbone.lm_head.weight[vocab.ids]
        self.lm_head = nn.Linear(hidden, head.shape[0], bias=False)
        self.lm_head.weight = nn.Parameter(head.detach().clone())
        vocab = vocab or DraftVocab(ids=torch.arange(config.vocab_size), target_size=config.vocab_size)
        self.register_buffer("d2t", vocab.d2t)
        self.register_buffer("t2d", vocab.t2d)
        self.register_buffer("draft_ids", vocab.ids, persistent=False)
        # frozen, shared with the target (not stored in checkpoints)
        self._target = {"embed": backbone.embed_tokens, "rotary": backbone.rotary_emb, "head": backbone.lm_head}
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- shape / checkpoint ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": {**asdict(self.params), "layers": self.feature_layers},
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
            "num_hidden_layers": 1,
            "draft_vocab_size": int(self.lm_head.weight.shape[0]),
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # -- target features ---------------------------------------------------------------------------
    def fuse_input(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """``(q, 3h)`` from a target forward's ``hidden_states`` (``[i]`` = input of layer ``i``)."""
        return torch.cat([hidden_states[i] for i in self.feature_layers], dim=-1)

    @torch.no_grad()
    def prepare(self, sequence: FeatureSequence, backbone: Backbone) -> LayeredSequence:
        """The trainer's per-sequence hook: one teacher-forced target forward for the fused features
        (the stored corpus keeps only the last hidden state)."""
        ids = sequence.ids
        forward = backbone.forward(ids, backbone.new_cache(ids.shape[0] + 8), output_hidden_states=True)
        return LayeredSequence(sequence, self.fuse_input(forward.hidden_states).detach().clone())

    # -- forward (inference) -----------------------------------------------------------------------
    def new_cache(self, backbone: Backbone, capacity: int = 512) -> KVCache:
        return KVCache(
            1,
            backbone.config.num_key_value_heads,
            backbone.head_dim,
            capacity,
            dtype=backbone.dtype,
            device=backbone.device,
        )

    def _rotary(self, like: torch.Tensor, positions: torch.Tensor):
        return self._target["rotary"](like[None], positions[None])

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache,
    ) -> torch.Tensor:
        """``(q, 3h)`` fused target features (committed tokens) or ``(q, h)`` own hidden states (draft
        nodes) with the ``(q,)`` tokens after them at ``positions`` → ``(q, h)`` hidden states whose
        head gives the next token. ``attention_mask``: ``(1, 1, q, cached + q)`` bool or additive
        float; None = causal over the new rows (everything cached is visible)."""
        hidden = features.to(self.fc.weight.dtype)
        if hidden.shape[-1] != self.fc.weight.shape[0]:
            hidden = self.fc(hidden)
        layer = self.midlayer
        x = layer.attention_input(self._target["embed"](tokens), hidden)
        query, key, value = layer.self_attn.project(x, self._rotary(hidden, positions))
        keys, values = cache.update(key, value, 0)
        q = tokens.shape[0]
        if attention_mask is None and q > 1:
            attention_mask = torch.ones(q, keys.shape[2], dtype=torch.bool, device=keys.device)
            attention_mask[:, keys.shape[2] - q :].tril_()
            attention_mask = attention_mask[None, None]
        attended = F.scaled_dot_product_attention(
            query, layer.self_attn.expand(keys), layer.self_attn.expand(values), attn_mask=attention_mask
        )
        return layer.finish(hidden, layer.self_attn.output(attended))

    def draft_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """``(q, h)`` hidden states → ``(q, draft vocab)`` logits."""
        return self.lm_head(self.norm(predicted)).float()

    def next_feature(self, predicted: torch.Tensor) -> torch.Tensor:
        """A draft node's hidden state is what its children read."""
        return predicted

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    # -- training: training-time test --------------------------------------------------------------
    def unroll(self, item: LayeredSequence) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The TTT unroll over one sequence: per step ``s``, the ``(n, h)`` hidden states of rows
        ``t = 0 .. n-1`` (``n = T - 1`` pairs ``(features_t, x_{t+1})``) and the ``(n,)`` position
        whose target distribution each row predicts (``t + 1 + s``; past the end where > n)."""
        ids = item.sequence.ids
        n = ids.shape[0] - 1
        device = self.fc.weight.device
        layer, attn = self.midlayer, self.midlayer.self_attn
        rows = torch.arange(n, device=device)
        causal = rows[None, :] <= rows[:, None]  # (n, n): step 0's keys of rows 0..t
        scale = 1.0 / math.sqrt(attn.head_dim)
        hidden = self.fc(item.fused[:-1].to(device))
        keys, values, out = [], [], []
        for step in range(self.params.ttt_steps):
            # row t reads token x_{t+1+step} (padding past the end) at position t + step
            tokens = torch.zeros(n, dtype=torch.long, device=device)
            tokens[: n - step] = ids[1 + step :].to(device)
            x = layer.attention_input(self._target["embed"](tokens), hidden)
            query, key, value = attn.project(x, self._rotary(hidden, rows + step))
            keys.append(attn.expand(key))
            values.append(attn.expand(value))
            prefix = ((query @ keys[0].transpose(2, 3)) * scale).masked_fill(~causal, float("-inf"))
            own = [(query * k).sum(-1, keepdim=True) * scale for k in keys[1:]]  # row t's key of each later step
            weights = torch.softmax(torch.cat([prefix, *own], dim=-1), dim=-1)
            attended = weights[..., :n] @ values[0]
            for j, v in enumerate(values[1:]):
                attended = attended + weights[..., n + j : n + j + 1] * v
            hidden = layer.finish(hidden, attn.output(attended))
            out.append((hidden, rows + 1 + step))
        return out

    def answer_rows(self, item: LayeredSequence, target_positions: torch.Tensor) -> torch.Tensor:
        """Rows predicting a target distribution inside the sequence at an answer position."""
        return (target_positions <= item.sequence.ids.shape[0] - 1) & (
            target_positions >= item.sequence.answer_start - 1
        )

    def loss(self, item: LayeredSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Σ_s step_decay^s · soft CE of unroll step s against the target's distribution over the
        draft vocabulary (answer positions whose target argmax is drafted-able, per step-0 position),
        and step 0's top-1 agreement with the target's argmax (``noise`` is unused: EAGLE-3 adds no
        feature noise)."""
        device = self.fc.weight.device
        with torch.no_grad():  # the target's distribution at every position, over the draft vocabulary
            target_logits = self._target["head"](item.sequence.features.to(device)).float()
            target_p = torch.softmax(target_logits[:, self.draft_ids], dim=-1)
            in_vocab = self.t2d[target_logits.argmax(-1)]
        target_next = item.sequence.target_next.to(device)
        total, agreement = torch.zeros((), device=device), Agreement(0, 0)
        steps = self.unroll(item)
        for s, (hidden, positions) in enumerate(steps):
            answer = self.answer_rows(item, positions)
            if s == 0:
                agreement = Agreement(0, max(int(answer.sum()), 1))
            rows = answer & in_vocab[positions.clamp(max=in_vocab.shape[0] - 1)]
            if not bool(rows.any()):
                continue
            log_q = torch.log_softmax(self.draft_logits(hidden[rows]), dim=-1)
            ce = -(target_p[positions[rows]] * log_q).sum(-1)
            total = total + self.params.step_decay**s * ce.sum() / agreement.positions
            if s == 0:
                drafted = self.to_target(log_q.argmax(-1))
                agreement.correct = int((drafted == target_next[positions[rows]]).sum())
        return total, agreement

    @torch.no_grad()
    def step_agreement(self, items: list[LayeredSequence]) -> list[float]:
        """Per unroll step, the fraction of answer positions where the drafter's own-prediction chain
        drafts the target's argmax (the acceptance the TTT unroll trains for)."""
        correct = [0] * self.params.ttt_steps
        counted = [0] * self.params.ttt_steps
        for item in items:
            target_next = item.sequence.target_next.to(self.fc.weight.device)
            for s, (hidden, positions) in enumerate(self.unroll(item)):
                rows = self.answer_rows(item, positions)
                drafted = self.to_target(self.draft_logits(hidden[rows]).argmax(-1))
                correct[s] += int((drafted == target_next[positions[rows]]).sum())
                counted[s] += int(rows.sum())
        return [c / max(k, 1) for c, k in zip(correct, counted)]
