"""Kangaroo (Liu et al. 2024, arXiv 2404.18911; Equationliu/Kangaroo): self-speculative decoding
with double early exiting.

Draft model = the target's first ``exit_layer`` decoder layers (the shallow sub-network, shared
weights) + a trained adapter — one attention block and two RMS norms:
``out = norm_out(h + attention(norm_in(h)))`` — + the target's own LM head. Double early exit:
the draft exits the layer stack at ``exit_layer`` (first exit), and drafting stops as soon as the
draft's top-1 probability falls below ``confidence_threshold`` (second exit; as in the reference,
that low-confidence token is still proposed and verified, so every step drafts at least one token)
or after ``max_draft_tokens``. The target verifies the chain in one forward (greedy
longest prefix; drafts are deterministic, so sampling stays lossless too).

The adapter is trained on the training pipeline, ``decodebench-train drafter=kangaroo``
(:mod:`decodebench.methods.kangaroo_net`), and stored in ``<cache>/drafters/<model>/kangaroo/``; it
is initialised from the target's layer ``exit_layer`` attention and input norm and the final norm.

Caches (the paper's reuse): the shallow layers run on the decode loop's own cache (the drafter's
``target_cache``), so the K/V they write for the root and the drafts are exactly what the target
would compute. ``propose`` hides them again, and :meth:`verify_forward` (inherited from
:class:`~decodebench.methods.early_exit_spec.EarlyExitDrafter`, LayerSkip's reuse) brings them back
and continues the verification from the cached shallow hidden states: layers ``exit_layer .. L-1``
only. The adapter has its own one-layer cache (:class:`AdapterState`); the prompt's shallow states
are computed once at the first draft (``exit_layer`` layers over the prompt).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from decodebench.config import check
from decodebench.engine.architectures import UnsupportedArchitectureError, cache_keyword
from decodebench.engine.backbone import Backbone, ForwardPlan
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import Proposal
from decodebench.engine.kv_cache import KVCache
from decodebench.methods.draft_heads import (
    check_target_shape,
    checkpoint_dir,
    load_checkpoint,
    model_key,
    require_checkpoint,
    train_command,
)
from decodebench.methods.early_exit_spec import EarlyExitDrafter, PendingDraft
from decodebench.registry import DecodeBenchError

log = logging.getLogger("decodebench")


class KangarooAdapter(nn.Module):
    """One attention block + two RMS norms on top of the shallow sub-network's hidden states.

    Reuses the target architecture's own attention and norm modules (copied from the target's
    layer ``exit_layer`` and final norm), so RoPE, GQA and biases match the model family.
    """

    def __init__(self, input_norm: nn.Module, attention: nn.Module, output_norm: nn.Module, exit_layer: int):
        super().__init__()
        self.input_norm = input_norm
        self.attention = attention
        self.output_norm = output_norm
        self.exit_layer = exit_layer
        self.attention.layer_idx = exit_layer  # its slot in the drafter's cache
        self.cache_keyword = cache_keyword(attention)  # ``cache`` from transformers 5.25, ``past_key_values`` before

    @staticmethod
    def check_architecture(backbone: Backbone, exit_layer: int) -> None:
        """The adapter is the target layer's pre-attention norm + attention + the final norm.

        Raises:
            UnsupportedArchitectureError: the family's layers have no pre-attention norm (post-norm
                OLMo 2 / EXAONE 4, Falcon's ``ln_attn``).
        """
        layer = backbone.layers[exit_layer]
        if getattr(layer, "input_layernorm", None) is None or getattr(layer, "self_attn", None) is None:
            raise UnsupportedArchitectureError(
                f"method 'kangaroo' builds its adapter from a layer's input_layernorm + self_attn, which "
                f"'{backbone.config.model_type}' layers ({type(layer).__name__}) do not have"
            )

    @classmethod
    def from_backbone(cls, backbone: Backbone, exit_layer: int) -> KangarooAdapter:
        """A fresh adapter initialised from the target's layer ``exit_layer`` and final norm."""
        cls.check_architecture(backbone, exit_layer)
        layer = backbone.layers[exit_layer]
        adapter = cls(
            copy.deepcopy(layer.input_layernorm),
            copy.deepcopy(layer.self_attn),
            copy.deepcopy(backbone.norm),
            exit_layer,
        )
        return adapter.to(device=backbone.device, dtype=backbone.dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        position_embeddings,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``(batch, q, hidden)`` shallow hidden states → ``(batch, q, hidden)`` LM-head input.

        ``attention_mask`` None with ``cache`` None means causal (sdpa's ``is_causal``)."""
        attended, _ = self.attention(
            hidden_states=self.input_norm(hidden),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            **{self.cache_keyword: cache},
        )
        return self.output_norm(hidden + attended)


def load_adapter(directory: Path, backbone: Backbone) -> KangarooAdapter:
    """The adapter of a ``decodebench-train drafter=kangaroo`` checkpoint, for ``backbone``."""
    state, config = load_checkpoint(directory)
    check_target_shape(config, backbone, directory)
    adapter = KangarooAdapter.from_backbone(backbone, int(config["exit_layer"]))
    try:
        adapter.load_state_dict(state)
    except RuntimeError as error:
        raise DecodeBenchError(
            f"Kangaroo adapter {directory} does not fit this model ({error}); retrain it with "
            f"{train_command('kangaroo', model_key(backbone))}"
        ) from error
    return adapter.eval()


class AdapterState:
    """The adapter's own one-layer KV cache (slot ``exit_layer``) and the token ids it holds.

    The shallow layers need no cache of their own: they ARE the target's first ``exit_layer``
    layers, so drafting runs them on the decode loop's cache (exact K/V, reused by verification).
    """

    def __init__(self, backbone: Backbone, adapter: KangarooAdapter, capacity: int = 512):
        self.backbone = backbone
        self.adapter = adapter
        self.cache = backbone.new_cache(capacity, num_layers=adapter.exit_layer + 1)
        self.fed: list[int] = []

    def reset(self) -> None:
        self.cache.reset()
        self.fed = []

    def crop_to(self, context: Sequence[int]) -> int:
        """Keep the entries whose tokens agree with ``context``; returns how many are kept."""
        limit = min(len(self.fed), len(context))
        common = 0
        while common < limit and self.fed[common] == context[common]:
            common += 1
        self.cache.crop(common)
        del self.fed[common:]
        return common

    @torch.inference_mode()
    def feed(self, tokens: Sequence[int], shallow: torch.Tensor) -> torch.Tensor:
        """Append tokens given their shallow hidden states ``(q, hidden)`` (output of layer
        ``exit_layer - 1``); returns the ``(vocab,)`` draft logits after the last one."""
        base = len(self.fed)
        hidden = shallow[None]
        positions = torch.arange(base, base + hidden.shape[1], device=self.backbone.device)
        mask = self.backbone._block_mask(base, positions, None, None)
        rotary = self.backbone.layer_position_embeddings(hidden, positions[None], self.adapter.exit_layer)
        out = self.adapter(hidden, rotary, mask, self.cache)
        self.fed.extend(int(t) for t in tokens)
        return self.backbone.head(out[0, -1]).float()


class KangarooDrafter(EarlyExitDrafter):
    @dataclass
    class Params:
        exit_layer: int = 2  # shallow sub-network depth (paper: 2 layers)
        max_draft_tokens: int = 6  # paper: at most 6 draft steps
        confidence_threshold: float = 0.6  # paper: stop drafting when top-1 prob < 0.6
        checkpoint: str | None = None  # adapter folder; null = <cache>/drafters/<model>/kangaroo

        def __post_init__(self) -> None:
            check(self.exit_layer >= 1, "method.params.exit_layer", self.exit_layer, ">= 1")
            check(self.max_draft_tokens >= 1, "method.params.max_draft_tokens", self.max_draft_tokens, ">= 1")
            check(
                0.0 <= self.confidence_threshold < 1.0,
                "method.params.confidence_threshold",
                self.confidence_threshold,
                "[0, 1)",
            )

    def __init__(self, params: KangarooDrafter.Params):
        super().__init__()
        self.params = params
        self.adapter_state: AdapterState | None = None

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        self.check_exit_layer(self.params.exit_layer)
        KangarooAdapter.check_architecture(backbone, self.params.exit_layer)
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), "kangaroo"), "kangaroo", "kangaroo", model_key(backbone)
            )
        )
        adapter = load_adapter(directory, backbone)
        if adapter.exit_layer != self.params.exit_layer:
            raise DecodeBenchError(
                f"kangaroo: the adapter at {directory} was trained for exit_layer="
                f"{adapter.exit_layer}, the method is configured with exit_layer="
                f"{self.params.exit_layer}; retrain with {train_command('kangaroo', model_key(backbone))} "
                f"drafter.params.exit_layer={self.params.exit_layer}"
            )
        kernels = follow_backend(backbone, adapter)
        self.adapter_state = AdapterState(backbone, adapter)
        log.info("kangaroo: adapter %s (its linears: %s)", directory, kernels)

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.adapter_state.reset()

    def _shallow(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """Run the shallow layers for ``tokens`` at the end of the target cache (writing their K/V);
        returns ``[embedding, out_0, .., out_{exit-1}]``, each ``(q, hidden)``."""
        out = self.backbone.forward(
            list(tokens),
            self.target_cache,
            plan=ForwardPlan(layers=range(self.params.exit_layer)),
            output_hidden_states=True,
            logits_rows=slice(0, 0),
        )
        return out.hidden_states

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        cache, state, exit_layer = self.target_cache, self.adapter_state, self.params.exit_layer
        committed = len(context) - 1
        self.pending = None
        if cache is None or cache.length != committed:
            raise RuntimeError(
                "kangaroo drafts on the decode loop's cache, which must hold exactly the committed "
                f"context ({committed} tokens)"
            )
        budget = min(self.params.max_draft_tokens, max_tokens)
        if budget <= 0:
            return Proposal()
        # 1. the adapter's K/V for committed tokens it has not seen (the prompt; a last accepted
        #    draft): recompute their shallow states, rewriting identical shallow K/V in place
        seen = state.crop_to(context[:committed])
        if seen < committed:
            cache.crop(seen, layers=range(exit_layer))
            state.feed(context[seen:committed], self._shallow(context[seen:committed])[-1])
        # 2. draft: shallow layers on the target cache + adapter + LM head; as in the reference, the
        #    first token is always drafted, and a token whose top-1 probability falls below the
        #    threshold is still proposed (the target verifies it) but ends the draft
        token, tokens, states = context[-1], [], []
        while True:
            layer_states = self._shallow([token])
            states.append(layer_states)
            probs = torch.softmax(state.feed([token], layer_states[-1]), dim=-1)
            confidence, best = probs.max(dim=-1)
            tokens.append(int(best))
            if float(confidence) < self.params.confidence_threshold or len(tokens) == budget:
                break
            token = int(best)
        # 3. hide the drafted shallow K/V from the loop; verify_forward brings back the accepted part
        cache.crop(committed)
        self.pending = PendingDraft(committed, exit_layer, [context[-1], *tokens][: len(states)], states)
        return Proposal(tokens=tokens)
