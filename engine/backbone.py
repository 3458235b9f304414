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
from typing import Collection, Optional, Sequence

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


class MlpGate:
    """Decides, during one forward, whether each layer's MLP (FFN) block runs (FFN-SkipLLM).

    With a gate, a layer runs as two residual halves (attention, then MLP) and the MLP half is
    skipped when :meth:`run_mlp` says so; attention always runs, so every layer's K/V is written.
    Subclasses keep their own per-forward state (e.g. "FFNs saturated, skip the next k").
    """

    def run_mlp(self, layer_index: int, hidden: torch.Tensor) -> bool:
        """``hidden``: ``(batch, q, hidden)`` residual stream after the layer's attention half."""
        return True

    def observe(self, layer_index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        """Called after a run MLP half with the residual stream before and after it."""


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
        # Set by decodebench.engine.backends.apply_backend: the backend in use, the catalogue name
        # (for stored latency curves) and the compiled step (None = every block takes the loop below).
        self.backend = "eager"
        self.model_name: Optional[str] = None
        self.fast_forward = None
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
    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        return KVCache(
            batch_size=batch_size,
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
        # built on the device: only the (q, q) block among the new tokens may come from the host
        mask = torch.ones(q, prefix_length + q, dtype=torch.bool, device=self.device)
        if block is None:
            mask[:, prefix_length:].tril_()
        else:
            mask[:, prefix_length:] = block
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
        mlp_gate: Optional[MlpGate] = None,
        skip_attention: Collection[int] = (),
        skip_mlp: Collection[int] = (),
        input_hidden: Optional[torch.Tensor] = None,
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
            mlp_gate: per-layer MLP (FFN) skipping decided during the forward (lossy methods).
            skip_attention, skip_mlp: layers whose attention / MLP sublayer is skipped (the
                residual passes through; a skipped attention writes no K/V), e.g. SWIFT's draft.
            input_hidden: ``(q, hidden)`` states fed to the first layer run instead of the token
                embeddings, to continue a forward from an intermediate layer (early-exit
                verification); ``input_ids`` then only sets ``q``.

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
        if (self.fast_forward is not None and layers is None and not output_hidden_states and mlp_gate is None
                and not skip_attention and not skip_mlp and input_hidden is None and position_offset is None):
            fast = self.fast_forward(ids, positions, block_mask, cache, logits_rows)
            if fast is not None:  # None: no static fast path for this block (e.g. prefill)
                return fast

        if input_hidden is None:
            hidden = self.embed_tokens(ids[None])  # (1, q, hidden)
        else:
            hidden = input_hidden.reshape(1, q, -1).to(self.dtype)
        position_embeddings = self.rotary_emb(hidden, positions[None])
        all_hidden = [hidden[0]] if output_hidden_states else None
        masks: dict[tuple[int, Optional[int]], Optional[torch.Tensor]] = {}
        for layer_index in range(self.num_layers) if layers is None else layers:
            key = (cache.lengths[layer_index], self.layer_windows[layer_index])
            if key not in masks:
                masks[key] = self._block_mask(key[0], positions, block_mask, key[1])
            if layer_index in skip_attention or layer_index in skip_mlp:
                hidden = self._sublayers(layer_index, hidden, masks[key], positions[None], cache,
                                         position_embeddings, attention=layer_index not in skip_attention,
                                         mlp=layer_index not in skip_mlp)
            elif mlp_gate is None:
                hidden = self.layers[layer_index](
                    hidden,
                    attention_mask=masks[key],
                    position_ids=positions[None],
                    past_key_values=cache,
                    use_cache=True,
                    position_embeddings=position_embeddings,
                )
            else:
                hidden = self._gated_layer(layer_index, hidden, masks[key], positions[None], cache,
                                           position_embeddings, mlp_gate)
            if output_hidden_states:
                all_hidden.append(hidden[0])
        normed = self.norm(hidden)[0]  # (q, hidden)
        rows = normed if logits_rows is None else normed[logits_rows]
        logits = self.lm_head(rows)
        if logits.dim() == 1:
            logits = logits[None]
        return ForwardOutput(logits=logits.float(), hidden_states=all_hidden, last_hidden=normed)

    def _gated_layer(self, layer_index: int, hidden: torch.Tensor, mask, position_ids: torch.Tensor,
                     cache: KVCache, position_embeddings, gate: MlpGate) -> torch.Tensor:
        """One decoder layer as its two residual halves (the Llama/Qwen2/Mistral layer structure:
        ``input_layernorm → self_attn``, then ``post_attention_layernorm → mlp``), the MLP half
        only when ``gate`` says so."""
        layer = self.layers[layer_index]
        attention, _ = layer.self_attn(
            hidden_states=layer.input_layernorm(hidden), attention_mask=mask, position_ids=position_ids,
            past_key_values=cache, use_cache=True, position_embeddings=position_embeddings,
        )
        hidden = hidden + attention
        if gate.run_mlp(layer_index, hidden):
            after = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            gate.observe(layer_index, hidden, after)
            hidden = after
        return hidden

    def _sublayers(self, layer_index: int, hidden: torch.Tensor, mask, position_ids: torch.Tensor,
                   cache: KVCache, position_embeddings, attention: bool, mlp: bool) -> torch.Tensor:
        """One decoder layer with its attention and/or MLP residual half left out (SWIFT's
        sublayer skipping); same two halves as :meth:`_gated_layer`."""
        layer = self.layers[layer_index]
        if attention:
            update, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden), attention_mask=mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, position_embeddings=position_embeddings,
            )
            hidden = hidden + update
        if mlp:
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden

    # -- batched forward (left padding) ----------------------------------------------------------
    def _padded_mask(self, prefix_length: int, q: int, padding: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, q, prefix + q)`` mask of a causal block over a left-padded batch: a query
        sees the non-padding keys up to itself; a padding query sees only itself (never an empty
        row, whose softmax would be NaN)."""
        total = prefix_length + q
        query_slots = torch.arange(prefix_length, total, device=self.device)
        key_slots = torch.arange(total, device=self.device)
        causal = key_slots[None, :] <= query_slots[:, None]  # (q, total)
        real_key = key_slots[None, :] >= padding[:, None]  # (batch, total)
        mask = (causal[None] & real_key[:, None]) | (key_slots[None, :] == query_slots[:, None])[None]
        mask = mask[:, None]
        if self.attn_implementation == "eager":
            return torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(
                ~mask, torch.finfo(self.dtype).min
            )
        return mask

    @torch.inference_mode()
    def forward_batch(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        *,
        layers: Optional[Sequence[int]] = None,
        logits_rows: Optional[slice | Sequence[int]] = None,
        mlp_gate: Optional[MlpGate] = None,
    ) -> ForwardOutput:
        """A causal block of ``q`` tokens for each of ``batch`` left-padded sequences.

        Slot ``s`` of row ``b`` holds position ``s - cache.padding[b]``; slots before
        ``cache.padding[b]`` are padding, never attended to by real tokens. Sliding windows are
        not applied (batched decoding is for full-attention models).

        Args:
            input_ids: ``(batch, q)`` token ids (padding ids in the padding slots).
            cache: a cache made with ``new_cache(capacity, batch_size=batch)``; every layer that
                runs appends ``q`` slots to all rows.
            layers, logits_rows, mlp_gate: as in :meth:`forward`.

        Returns:
            ForwardOutput with ``logits`` of shape ``(batch, rows, vocab)`` and ``last_hidden``
            ``(batch, q, hidden)``.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2 or ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids must be (batch={cache.batch_size}, q), got {tuple(ids.shape)}")
        q = ids.shape[1]
        padding = torch.tensor(cache.padding, device=self.device)
        base = cache.length
        positions = (base + torch.arange(q, device=self.device))[None, :] - padding[:, None]
        positions = positions.clamp_(min=0)  # (batch, q); padding slots get position 0
        cache.ensure_capacity(max(cache.lengths) + q)
        hidden = self.embed_tokens(ids)  # (batch, q, hidden)
        position_embeddings = self.rotary_emb(hidden, positions)
        masks: dict[int, torch.Tensor] = {}
        for layer_index in range(self.num_layers) if layers is None else layers:
            prefix = cache.lengths[layer_index]
            if prefix not in masks:
                masks[prefix] = self._padded_mask(prefix, q, padding)
            if mlp_gate is None:
                hidden = self.layers[layer_index](
                    hidden, attention_mask=masks[prefix], position_ids=positions, past_key_values=cache,
                    use_cache=True, position_embeddings=position_embeddings,
                )
            else:
                hidden = self._gated_layer(layer_index, hidden, masks[prefix], positions, cache,
                                           position_embeddings, mlp_gate)
        normed = self.norm(hidden)  # (batch, q, hidden)
        rows = normed if logits_rows is None else normed[:, logits_rows]
        logits = self.lm_head(rows)
        if logits.dim() == 2:
            logits = logits[:, None]
        return ForwardOutput(logits=logits.float(), last_hidden=normed)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Early-exit logits: the shared final norm and LM head on an intermediate hidden state."""
        with torch.inference_mode():
            return self.lm_head(self.norm(hidden)).float()
