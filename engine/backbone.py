"""Backbone: the engine's own forward loop over a Hugging Face decoder-only model's layers.

No modeling code is copied: the loop calls the library's own modules
(``embed_tokens`` → ``rotary_emb`` → each ``DecoderLayer`` → ``norm`` → ``lm_head``); where a family
keeps them and what it applies around them is in :mod:`decodebench.engine.architectures` (the
families it lists run exactly; others are refused when the Backbone is built). Owning the loop lets
methods run a layer subset (skipping, early exit), read hidden states of any layer, and verify
token trees with a custom mask against the harness-owned :class:`KVCache`.

transformers 5.x facts this relies on: a decoder layer returns a plain tensor (or a tuple whose
first item is the hidden state); RoPE arrives only through ``position_embeddings=(cos, sin)``;
attention calls ``<cache>.update(k, v, idx)`` on the object passed as the layer's cache argument
(``cache`` from 5.25, ``past_key_values`` before); sdpa takes a bool mask (True = attend), eager an
additive float mask.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from decodebench.engine.architectures import (
    FAMILIES,
    ResidualHalves,
    UnsupportedArchitectureError,
    cache_geometry,
    model_parts,
    sliding_windows,
)
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.tree import ancestor_mask, check_parents, is_chain, tree_depths


@dataclass
class ForwardOutput:
    """Result of one forward over a block of ``q`` new tokens."""

    logits: torch.Tensor  # (q_selected, vocab): rows for the requested positions
    # hidden_states[i] = output of layer i-1 before the final norm ([0] = embeddings), (q, hidden);
    # only when requested.
    hidden_states: list[torch.Tensor] | None = None
    last_hidden: torch.Tensor | None = None  # (q, hidden) after the final norm


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


@dataclass(frozen=True)
class BlockLayout:
    """How the ``q`` tokens of one block attend to each other and where they sit.

    The default is a causal chain starting at ``cache.length``. ``parents`` makes the block a token
    tree (parent pointers within the block, ``-1`` = attached to the prefix); ``mask`` with
    ``offsets`` is any ``(q, q)`` bool mask among the new tokens (True = attend) with each token's
    position offset from the block start (e.g. LADE's Jacobi lookahead branch, which is not a tree).
    ``start`` is the position of the block's first token (default ``cache.length``).
    """

    parents: Sequence[int] | None = None
    mask: torch.Tensor | None = None
    offsets: Sequence[int] | None = None
    start: int | None = None

    def __post_init__(self) -> None:
        if self.parents is not None and self.mask is not None:
            raise ValueError("a block layout takes parents or a mask, not both")
        if (self.mask is None) != (self.offsets is None):
            raise ValueError("a block mask needs its position offsets (and offsets need a mask)")


CHAIN = BlockLayout()


@dataclass
class ForwardPlan:
    """Which part of the model a forward runs (default: everything, which keeps it exact).

    Lossy methods (``lossless: false``: SkipDecode, FFN-SkipLLM) return a reduced plan from
    ``Drafter.forward_plan`` and never draft, so each of their steps emits one token from a reduced
    forward through the same decode loop; self-speculative drafters run reduced plans to draft.
    """

    layers: Sequence[int] | None = None  # decoder layers to run, ascending (None = all)
    mlp_gate: MlpGate | None = None  # per-layer MLP skipping decided during the forward
    # layers whose attention / MLP sublayer is skipped (the residual passes through; a skipped
    # attention writes no K/V), e.g. SWIFT's draft
    skip_attention: Collection[int] = ()
    skip_mlp: Collection[int] = ()

    @property
    def splits_layers(self) -> bool:
        """True when some layer runs as its two residual halves instead of the layer's own forward."""
        return self.mlp_gate is not None or bool(self.skip_attention) or bool(self.skip_mlp)


FULL_MODEL = ForwardPlan()


class Backbone:
    """Wraps an HF ``*ForCausalLM`` and runs its decoder layers in our own loop.

    Raises (on construction):
        UnsupportedArchitectureError: a family (or variant) the loop cannot run exactly.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.parts = model_parts(model)
        self.family = self.parts.family
        self.embed_tokens = self.parts.embed_tokens
        self.layers = self.parts.layers
        self.norm = self.parts.norm
        self.rotary_emb = self.parts.rotary_emb
        self.lm_head = self.parts.lm_head
        self.config = model.config
        self.num_layers = len(self.layers)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # Set by decodebench.engine.backends.apply_backend: the backend in use, the catalogue name
        # (for stored latency curves) and the compiled step (None = every block takes the loop below).
        self.backend = "eager"
        self.model_name: str | None = None
        self.fast_forward = None
        # Set by the tuned backend: engine/fused_layers.py FusedLayer per layer (None = the HF layers).
        self.fused_layers: list | None = None
        self.attn_implementation = self.config._attn_implementation
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"attention implementation '{self.attn_implementation}' is not supported by the "
                "engine's masks; load the model with attn_implementation='sdpa' or 'eager'"
            )
        self.cache_geometry = cache_geometry(self.config, self.family)
        self.head_dim = self.cache_geometry.key_dim
        self.halves = self.family.residual_halves(self.config)
        self.layer_windows: list[int | None] = sliding_windows(self.config, self.parts.layer_types)

    # -- what an architecture allows -----------------------------------------------------------
    def require_residual_halves(self, method: str) -> ResidualHalves:
        """The layers' residual halves, for methods that skip or gate a sublayer (SWIFT, FFN-SkipLLM).

        Raises:
            UnsupportedArchitectureError: the family's layers have no such halves (parallel
                attention/MLP residual: both read the same input).
        """
        if self.halves is None:
            able = sorted(
                name for name, family in FAMILIES.items() if family.halves is not None or family.halves_for is not None
            )
            raise UnsupportedArchitectureError(
                f"method '{method}' skips attention / MLP sublayers, but '{self.config.model_type}' layers run "
                f"attention and MLP in parallel on the same input (no separate residual halves to skip). "
                f"Families with sublayer skipping: {', '.join(able)}"
            )
        return self.halves

    # -- cache -----------------------------------------------------------------------------------
    def new_cache(self, capacity: int, batch_size: int = 1, num_layers: int | None = None) -> KVCache:
        geometry = self.cache_geometry
        return KVCache(
            batch_size=batch_size,
            num_layers=self.num_layers if num_layers is None else num_layers,
            num_kv_heads=geometry.heads,
            head_dim=geometry.key_dim,
            value_head_dim=geometry.value_dim,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )

    # -- pieces of the forward -----------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``(batch, q)`` ids → ``(batch, q, hidden)`` first-layer input (the family's multiplier applied)."""
        hidden = self.embed_tokens(ids)
        multiplier = self.parts.embedding_multiplier
        return hidden if multiplier == 1.0 else hidden * multiplier

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Rotary ``(cos, sin)`` per layer type (one shared entry unless the family has per-layer RoPE)."""
        if self.rotary_emb is None:
            return {}
        if self.parts.rotary_per_layer_type:
            return {kind: self.rotary_emb(hidden, position_ids, kind) for kind in set(self.parts.layer_types)}
        return {None: self.rotary_emb(hidden, position_ids)}

    def _layer_rotary(self, position_embeddings: dict, layer_index: int):
        if not position_embeddings:
            return None
        if self.parts.rotary_per_layer_type:
            return position_embeddings[self.parts.layer_types[layer_index]]
        return position_embeddings[None]

    def layer_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_index: int):
        """The rotary ``(cos, sin)`` layer ``layer_index`` uses (e.g. for an adapter copied from it)."""
        return self._layer_rotary(self.position_embeddings(hidden, position_ids), layer_index)

    def cache_argument(self, cache) -> dict:
        """The cache keyword argument of the decoder layers and their attention modules (``cache``
        from transformers 5.25, ``past_key_values`` before, ``layer_past`` for GPT-NeoX / Falcon)."""
        return {self.parts.cache_keyword: cache}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on final-normed states, with the family's logit transform (scale, soft-cap)."""
        return self.parts.finish_logits(self.lm_head(hidden))

    # -- masks -----------------------------------------------------------------------------------
    def _block_mask(
        self,
        prefix_length: int,
        positions: torch.Tensor,
        block: torch.Tensor | None,
        window: int | None,
    ) -> torch.Tensor | None:
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
        layout: BlockLayout = CHAIN,
        plan: ForwardPlan = FULL_MODEL,
        logits_rows: slice | Sequence[int] | None = None,
        output_hidden_states: bool = False,
        input_hidden: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run ``q`` new tokens through the model on top of ``cache`` and append their K/V.

        Args:
            input_ids: ``(q,)`` token ids of the block, in topological order for a tree.
            cache: KV cache; every layer that runs appends ``q`` entries.
            layout: how the block's tokens attend to each other and where they start (default: a
                causal chain at ``cache.length``; :class:`BlockLayout`).
            plan: which layers / sublayers run (default: all; :class:`ForwardPlan`).
            logits_rows: which rows of the block get logits (default: all). Prefill asks only for
                the last row, which saves a ``(prompt, vocab)`` matmul.
            output_hidden_states: also return every layer's input/output hidden states.
            input_hidden: ``(q, hidden)`` states fed to the first layer run instead of the token
                embeddings, to continue a forward from an intermediate layer (early-exit
                verification); ``input_ids`` then only sets ``q``.

        Returns:
            ForwardOutput with ``logits`` of shape ``(rows, vocab)``.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(-1)
        q = ids.shape[0]
        block_mask, position_offsets = layout.mask, layout.offsets
        if layout.parents is not None:
            parents = layout.parents
            if len(parents) != q:
                raise ValueError(f"parents has {len(parents)} entries for {q} tokens")
            check_parents(parents)
            if not is_chain(parents):
                block_mask, position_offsets = ancestor_mask(parents), tree_depths(parents)
        if block_mask is not None and (block_mask.shape != (q, q) or len(position_offsets) != q):
            raise ValueError(f"block_mask must be ({q}, {q}) with {q} position_offsets")
        base = cache.length if layout.start is None else layout.start
        offsets = (
            torch.tensor(position_offsets, device=self.device)
            if block_mask is not None
            else torch.arange(q, device=self.device)
        )
        positions = base + offsets
        cache.ensure_capacity(max(cache.lengths) + q)
        if (
            self.fast_forward is not None
            and plan.layers is None
            and not plan.splits_layers
            and not output_hidden_states
            and input_hidden is None
            and layout.start is None
        ):
            fast = self.fast_forward(ids, positions, block_mask, cache, logits_rows)
            if fast is not None:  # None: no static fast path for this block (e.g. prefill)
                return fast

        if input_hidden is None:
            hidden = self.embed(ids[None])  # (1, q, hidden)
        else:
            hidden = input_hidden.reshape(1, q, -1).to(self.dtype)
        position_embeddings = self.position_embeddings(hidden, positions[None])
        all_hidden = [hidden[0]] if output_hidden_states else None
        masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        for layer_index in range(self.num_layers) if plan.layers is None else plan.layers:
            key = (cache.lengths[layer_index], self.layer_windows[layer_index])
            if key not in masks:
                masks[key] = self._block_mask(key[0], positions, block_mask, key[1])
            rotary = self._layer_rotary(position_embeddings, layer_index)
            if layer_index in plan.skip_attention or layer_index in plan.skip_mlp or plan.mlp_gate is not None:
                hidden = self._halves(
                    layer_index,
                    hidden,
                    masks[key],
                    positions[None],
                    cache,
                    rotary,
                    attention=layer_index not in plan.skip_attention,
                    mlp=layer_index not in plan.skip_mlp,
                    gate=plan.mlp_gate,
                )
            else:
                hidden = self._layer(layer_index, hidden, masks[key], positions[None], cache, rotary)
            if output_hidden_states:
                all_hidden.append(hidden[0])
        normed = self.norm(hidden)[0]  # (q, hidden)
        rows = normed if logits_rows is None else normed[logits_rows]
        logits = self.head(rows)
        if logits.dim() == 1:
            logits = logits[None]
        return ForwardOutput(logits=logits.float(), hidden_states=all_hidden, last_hidden=normed)

    def _layer(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        mask,
        position_ids: torch.Tensor,
        cache,
        position_embeddings,
        sizes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One decoder layer's own forward (``(batch, q, hidden)`` in and out; ``sizes``: real tokens
        of each row's padded block, which a fused layer may run alone)."""
        if self.fused_layers is not None:
            return self.fused_layers[layer_index](hidden, mask, cache, position_embeddings, sizes)
        out = self.layers[layer_index](
            hidden,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            position_embeddings=position_embeddings,
            **self.cache_argument(cache),
            **self.parts.layer_kwargs,
        )
        return out[0] if isinstance(out, tuple) else out

    def _halves(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        mask,
        position_ids: torch.Tensor,
        cache: KVCache,
        position_embeddings,
        attention: bool,
        mlp: bool,
        gate: MlpGate | None = None,
    ) -> torch.Tensor:
        """One decoder layer as its two residual halves (:class:`ResidualHalves` of the family):
        the attention half unless ``attention`` is False, then the MLP half unless ``mlp`` is False
        or ``gate`` says to skip it (SWIFT's sublayer skipping, FFN-SkipLLM's gate)."""
        halves = self.require_residual_halves("sublayer skipping")
        layer = self.layers[layer_index]
        multiplier = getattr(self.config, halves.residual_multiplier_key) if halves.residual_multiplier_key else 1.0

        def norm(name: str | None, x: torch.Tensor) -> torch.Tensor:
            return x if name is None else getattr(layer, name)(x)

        if attention:
            update, _ = layer.self_attn(
                hidden_states=norm(halves.attention_norm, hidden),
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                position_embeddings=position_embeddings,
                **self.cache_argument(cache),
            )
            hidden = hidden + norm(halves.attention_post_norm, update) * multiplier
        if mlp and (gate is None or gate.run_mlp(layer_index, hidden)):
            update = layer.mlp(norm(halves.mlp_norm, hidden))
            if isinstance(update, tuple):  # MoE blocks that also return router scores (gpt-oss)
                update = update[0]
            after = hidden + norm(halves.mlp_post_norm, update) * multiplier
            if gate is not None:
                gate.observe(layer_index, hidden, after)
            hidden = after
        return hidden

    # -- batched forward (one block per row, rows at their own lengths) ----------------------------
    def row_blocks(
        self, layouts: Sequence[BlockLayout], sizes: Sequence[int], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(batch, width, width)`` bool block masks and ``(batch, width)`` position offsets for rows
        of ``sizes[b]`` real tokens laid out as ``layouts[b]``, padded to ``width``: a padding query
        sees only itself (never an empty softmax row) and no real query sees it."""
        batch = len(sizes)
        masks = torch.zeros(batch, width, width, dtype=torch.bool)
        offsets = torch.zeros(batch, width, dtype=torch.long)
        masks[:, range(width), range(width)] = True
        for row, (layout, size) in enumerate(zip(layouts, sizes)):
            block, row_offsets = layout.mask, layout.offsets
            if layout.parents is not None:
                if len(layout.parents) != size:
                    raise ValueError(f"row {row}: parents has {len(layout.parents)} entries for {size} tokens")
                check_parents(layout.parents)
                block, row_offsets = ancestor_mask(layout.parents), tree_depths(layout.parents)
            if block is None:
                block, row_offsets = torch.ones(size, size, dtype=torch.bool).tril_(), range(size)
            if tuple(block.shape) != (size, size) or len(row_offsets) != size:
                raise ValueError(f"row {row}: block mask must be ({size}, {size}) with {size} position offsets")
            masks[row, :size, :size] = block.to(torch.bool).cpu()
            offsets[row, :size] = torch.as_tensor(list(row_offsets), dtype=torch.long)
        return masks, offsets

    def _rows_mask(
        self, prefix_lengths: Sequence[int], positions: torch.Tensor, block: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """``(batch, 1, q, max(prefix) + q)`` mask of one block per row: row ``b``'s queries see its
        ``prefix_lengths[b]`` cached entries (within a sliding ``window``) and, at slots
        ``prefix_lengths[b] + j``, the block tokens ``block[b]`` allows; nothing past them."""
        batch, q = positions.shape
        prefix = torch.tensor(list(prefix_lengths), device=self.device)
        total = int(max(prefix_lengths)) + q
        key_slots = torch.arange(total, device=self.device)
        mask = (key_slots[None, None, :] < prefix[:, None, None]).expand(batch, q, total).clone()
        block_slots = prefix[:, None] + torch.arange(q, device=self.device)  # (batch, q)
        mask.scatter_(2, block_slots[:, None, :].expand(batch, q, q), block)
        if window is not None:
            key_positions = key_slots.expand(batch, total).clone().scatter_(1, block_slots, positions)
            mask &= (positions[:, :, None] - key_positions[:, None, :]) < window
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
        sizes: Sequence[int] | None = None,
        layouts: Sequence[BlockLayout] | None = None,
        plan: ForwardPlan = FULL_MODEL,
        logits_rows: slice | Sequence[int] | None = None,
        last_logits_only: bool = False,
        output_hidden_states: bool = False,
        input_hidden: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """One block per row of a batch, each on top of that row's own cache length.

        Row ``b`` holds ``sizes[b]`` real tokens (the rest of its ``q`` slots are padding), laid out
        as ``layouts[b]`` (a chain, a tree or a mask, as in :meth:`forward`), at positions
        ``cache.row_length(b) + offset``. Every layer that runs appends ``q`` slots to each row at
        the row's length; entries past a row's real tokens are junk the caller drops
        (:meth:`KVCache.commit_rows`). Sliding windows are applied per layer as in :meth:`forward`.

        Args:
            input_ids: ``(batch, q)`` token ids (anything in padding slots).
            cache: a cache from ``new_cache(capacity, batch_size=batch)``.
            sizes: real tokens per row (default: ``q`` each).
            layouts: per row (default: causal chains).
            plan: as in :meth:`forward`.
            logits_rows: which block rows get logits, the same for every row (default: all).
            last_logits_only: logits only for each row's last real token (a prefill).
            output_hidden_states: also return every layer's input/output hidden states.
            input_hidden: ``(batch, q, hidden)`` states fed to the first layer run instead of the
                token embeddings (as in :meth:`forward`; ``input_ids`` then only sets the shape).

        Returns:
            ForwardOutput with ``logits`` ``(batch, rows, vocab)`` (zeros in padding rows, whose logits
            are not computed), ``last_hidden`` ``(batch, q,
            hidden)`` and ``hidden_states[i]`` ``(batch, q, hidden)`` when requested.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 2 or ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids must be (batch={cache.batch_size}, q), got {tuple(ids.shape)}")
        batch, q = ids.shape
        sizes = [q] * batch if sizes is None else list(sizes)
        layouts = [CHAIN] * batch if layouts is None else list(layouts)
        if len(sizes) != batch or len(layouts) != batch or max(sizes) > q:
            raise ValueError(f"need {batch} sizes (each <= {q}) and {batch} layouts")
        block, offsets = self.row_blocks(layouts, sizes, q)
        bases = [cache.row_length(b) if layouts[b].start is None else layouts[b].start for b in range(batch)]
        positions = torch.tensor(bases)[:, None] + offsets  # (batch, q)
        positions, block = positions.to(self.device), block.to(self.device)
        cache.ensure_capacity(max(cache.lengths) + q)
        hidden = self.embed(ids) if input_hidden is None else input_hidden.to(self.dtype)  # (batch, q, hidden)
        position_embeddings = self.position_embeddings(hidden, positions)
        all_hidden = [hidden] if output_hidden_states else None
        row_lengths = [list(lengths) for lengths in cache.row_lengths]  # before the block, per layer
        masks: dict[tuple, torch.Tensor] = {}
        for layer_index in range(self.num_layers) if plan.layers is None else plan.layers:
            key = (tuple(row_lengths[layer_index]), self.layer_windows[layer_index])
            if key not in masks:
                masks[key] = self._rows_mask(key[0], positions, block, key[1])
            rotary = self._layer_rotary(position_embeddings, layer_index)
            if plan.splits_layers:
                hidden = self._halves(
                    layer_index,
                    hidden,
                    masks[key],
                    positions,
                    cache,
                    rotary,
                    attention=layer_index not in plan.skip_attention,
                    mlp=layer_index not in plan.skip_mlp,
                    gate=plan.mlp_gate,
                )
            else:
                hidden = self._layer(layer_index, hidden, masks[key], positions, cache, rotary, sizes)
            if output_hidden_states:
                all_hidden.append(hidden)
        normed = self.norm(hidden)  # (batch, q, hidden)
        if last_logits_only:
            rows = normed[torch.arange(batch, device=self.device), torch.tensor(sizes, device=self.device) - 1][:, None]
        elif logits_rows is None and sum(sizes) < batch * q:  # the head on the real rows only; padding gets 0
            real = torch.arange(q, device=self.device)[None, :] < torch.tensor(sizes, device=self.device)[:, None]
            packed = self.head(normed[real]).float()
            logits = packed.new_zeros(batch, q, packed.shape[-1])
            logits[real] = packed
            return ForwardOutput(logits=logits, hidden_states=all_hidden, last_hidden=normed)
        else:
            rows = normed if logits_rows is None else normed[:, logits_rows]
        logits = self.head(rows)
        if logits.dim() == 2:
            logits = logits[:, None]
        return ForwardOutput(logits=logits.float(), hidden_states=all_hidden, last_hidden=normed)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Early-exit logits: the shared final norm and LM head on an intermediate hidden state."""
        with torch.inference_mode():
            return self.head(self.norm(hidden)).float()
