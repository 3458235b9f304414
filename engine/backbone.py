"""Backbone: the engine's own forward loop over a Hugging Face decoder-only model's layers.

No modeling code is copied: the loop calls the library's own modules
(``embed_tokens`` → ``rotary_emb`` → each ``DecoderLayer`` → ``norm`` → ``lm_head``), so any
Llama-family model (Llama, SmolLM2, Qwen2/2.5, Mistral) works. Owning the loop lets methods run a
layer subset (skipping, early exit), read hidden states of any layer, and verify token trees
with a custom mask against the harness-owned :class:`KVCache`.

transformers 5.x facts this relies on: a decoder layer returns a plain tensor; RoPE arrives only
through ``position_embeddings=(cos, sin)``; attention calls ``past_key_values.update(k, v, idx)``;
sdpa takes a bool mask (True = attend), eager an additive float mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from decodebench.engine.kv_cache import KVCache
from decodebench.engine.tree import ancestor_mask, check_parents, is_chain, tree_depths


@dataclass
class ForwardOutput:
    """Result of one forward over a block of ``q`` new tokens."""

    logits: torch.Tensor  # (q_selected, vocab): rows for the requested positions
    # hidden_states[i] = output of layer i-1 before the final norm ([0] = embeddings), (q, hidden);
    # only when requested.
    hidden_states: Optional[list[torch.Tensor]] = None
    last_hidden: Optional[torch.Tensor] = None  # (q, hidden) after the final norm


class Backbone:
    """Wraps an HF ``*ForCausalLM`` and runs its decoder layers in our own loop."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = model.lm_head
        self.config = model.config
        self.num_layers = len(self.layers)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.attn_implementation = self.config._attn_implementation
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attention implementation '{self.attn_implementation}' is not supported by the "
                "engine's masks; load the model with attn_implementation='sdpa' or 'eager'"
            )
        self.head_dim = getattr(self.config, "head_dim", None) or (
            self.config.hidden_size // self.config.num_attention_heads
        )
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"] * self.num_layers
        window = getattr(self.config, "sliding_window", None)
        # Mistral-style configs apply the window to every layer; Qwen2 only to "sliding_attention"
        # layers (and only when use_sliding_window is set).
        if getattr(self.config, "use_sliding_window", True) is False:
            window = None
        self.layer_windows: list[Optional[int]] = [
            window if (kind == "sliding_attention" or self.config.model_type == "mistral") else None
            for kind in layer_types
        ]

    # -- cache -----------------------------------------------------------------------------------
    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(
            num_layers=self.num_layers,
            num_kv_heads=self.config.num_key_value_heads,
            head_dim=self.head_dim,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )

    # -- masks -----------------------------------------------------------------------------------
    def _block_mask(
        self,
        prefix_length: int,
        positions: torch.Tensor,
        block: Optional[torch.Tensor],
        window: Optional[int],
    ) -> Optional[torch.Tensor]:
        """Attention mask for ``q`` new tokens over ``prefix_length`` cached ones.

        ``block`` is the ``(q, q)`` bool mask among the new tokens (``None`` = causal chain).
        Returns ``None`` where the attention kernel's own default is exact (one query token, or a
        causal chain over an empty cache with sdpa); otherwise ``(1, 1, q, prefix + q)`` — bool for
        sdpa, additive float for eager.
        """
        q = positions.shape[0]
        within_window = window is None or prefix_length + q <= window
        if within_window and (q == 1 or (block is None and prefix_length == 0 and self.attn_implementation == "sdpa")):
            return None
        if block is None:
            block = torch.ones(q, q, dtype=torch.bool).tril_()
        mask = torch.cat([torch.ones(q, prefix_length, dtype=torch.bool), block.cpu()], dim=1).to(self.device)
        if not within_window:
            key_positions = torch.cat([torch.arange(prefix_length, device=self.device), positions])
            mask &= (positions[:, None] - key_positions[None, :]) < window
        mask = mask[None, None]
        if self.attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min
            )
        return mask

    # -- forward ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        cache: KVCache,
        *,
        parents: Optional[Sequence[int]] = None,
        block_mask: Optional[torch.Tensor] = None,
        position_offsets: Optional[Sequence[int]] = None,
        layers: Optional[Sequence[int]] = None,
        logits_rows: Optional[slice | Sequence[int]] = None,
        output_hidden_states: bool = False,
        position_offset: Optional[int] = None,
    ) -> ForwardOutput:
        """Run ``q`` new tokens through the model on top of ``cache`` and append their K/V.

        Args:
            input_ids: ``(q,)`` token ids of the block, in topological order for a tree.
            cache: KV cache; every layer that runs appends ``q`` entries.
            parents: tree parent pointers within the block (``-1`` = attached to the prefix);
                ``None`` = a causal chain.
            block_mask, position_offsets: instead of ``parents``, any ``(q, q)`` bool mask among the
                new tokens (True = attend) with each token's position offset from the block start
                (e.g. LADE's Jacobi lookahead branch, which is not a tree).
            layers: indices of the decoder layers to run (default: all), e.g. a skip set.
            logits_rows: which rows of the block get logits (default: all). Prefill asks only for
                the last row, which saves a ``(prompt, vocab)`` matmul.
            output_hidden_states: also return every layer's input/output hidden states.
            position_offset: position of the block's first token; default ``cache.length``.

        Returns:
            ForwardOutput with ``logits`` of shape ``(rows, vocab)``.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(-1)
        q = ids.shape[0]
        if parents is not None:
            if len(parents) != q:
                raise ValueError(f"parents has {len(parents)} entries for {q} tokens")
            check_parents(parents)
            if not is_chain(parents):
                block_mask, position_offsets = ancestor_mask(parents), tree_depths(parents)
        if block_mask is not None and (block_mask.shape != (q, q) or position_offsets is None
                                       or len(position_offsets) != q):
            raise ValueError(f"block_mask must be ({q}, {q}) with {q} position_offsets")
        base = cache.length if position_offset is None else position_offset
        offsets = (torch.tensor(position_offsets, device=self.device) if block_mask is not None
                   else torch.arange(q, device=self.device))
        positions = base + offsets
        cache.ensure_capacity(max(cache.lengths) + q)

        hidden = self.embed_tokens(ids[None])  # (1, q, hidden)
        position_embeddings = self.rotary_emb(hidden, positions[None])
        all_hidden = [hidden[0]] if output_hidden_states else None
        masks: dict[tuple[int, Optional[int]], Optional[torch.Tensor]] = {}
        for layer_index in range(self.num_layers) if layers is None else layers:
            key = (cache.lengths[layer_index], self.layer_windows[layer_index])
            if key not in masks:
                masks[key] = self._block_mask(key[0], positions, block_mask, key[1])
            hidden = self.layers[layer_index](
                hidden,
                attention_mask=masks[key],
                position_ids=positions[None],
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
            if output_hidden_states:
                all_hidden.append(hidden[0])
        normed = self.norm(hidden)[0]  # (q, hidden)
        rows = normed if logits_rows is None else normed[logits_rows]
        logits = self.lm_head(rows)
        if logits.dim() == 1:
            logits = logits[None]
        return ForwardOutput(logits=logits.float(), hidden_states=all_hidden, last_hidden=normed)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Early-exit logits: the shared final norm and LM head on an intermediate hidden state."""
        with torch.inference_mode():
            return self.lm_head(self.norm(hidden)).float()
