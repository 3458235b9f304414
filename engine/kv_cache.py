"""Harness-owned KV cache: preallocated per layer, with an explicit length per layer.

HF decoder layers only need an object with ``update(key, value, layer_idx) -> (K_all, V_all)``;
this class is that object. Owning it (instead of ``DynamicCache``) gives what speculative methods
need and HF's cache lacks:

* per-layer lengths — layer skipping and early exit leave some layers shorter than others
  (``DynamicCache.get_seq_length`` reads layer 0 only and ``crop`` cuts every layer);
* ``crop(n)`` after a rejected chain, ``compact(base, kept)`` after a tree verification keeps the
  accepted path's entries contiguous;
* preallocation (no ``torch.cat`` per step) and a cheap ``reset`` between requests;
* per-row lengths in a batch (batched speculation: rows accept different numbers of drafts).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Per-layer key/value buffers of shape ``(batch_size, kv_heads, capacity, head_dim)``.

    Values may have their own width (``value_head_dim``): multi-head latent attention (DeepSeek-V3)
    caches its compressed KV latent as the "key" and the shared rotary key as the "value".

    A batch (``batch_size > 1``, :meth:`Backbone.forward_batch`) keeps a length per layer AND row
    (``row_lengths[layer][b]``): row ``b``'s slot ``s`` holds position ``s`` and its entries are
    contiguous from slot 0 (right padding: rows that accepted fewer drafts simply end earlier).
    A forward appends each row's block at that row's own length (one scatter per layer), and
    ``lengths[layer]`` is the longest row (the slice attention reads; the mask hides each row's
    tail). With one row, ``row_lengths`` is read from ``lengths`` (the single source).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        batch_size: int = 1,
        value_head_dim: int | None = None,
    ):
        self.batch_size = batch_size
        self.allocated_rows = batch_size  # rows that leave the batch (keep_rows) come back on reset
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.value_head_dim = head_dim if value_head_dim is None else value_head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = [0] * num_layers
        self._row_lengths = [[0] * batch_size for _ in range(num_layers)]
        self._allocate(capacity)

    # -- sizing -------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        # buffers for every allocated row; the first ``batch_size`` of them are the live rows (keep_rows)
        shape = (self.allocated_rows, self.num_kv_heads, capacity, self.head_dim)
        value_shape = (*shape[:3], self.value_head_dim)
        # zeros, not empty: the compiled backend attends over whole fixed-size views with masks, and a
        # masked NaN left in uninitialised memory would still poison the softmax (0 * NaN = NaN)
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_values = [torch.zeros(value_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for layer, length in enumerate(self.lengths):
            if length:
                new_keys[layer][: self.batch_size, :, :length] = self.keys[layer][:, :, :length]
                new_values[layer][: self.batch_size, :, :length] = self.values[layer][:, :, :length]
        self._all_rows = (new_keys, new_values)
        self.keys = [k[: self.batch_size] for k in new_keys]
        self.values = [v[: self.batch_size] for v in new_values]
        self.capacity = capacity

    def ensure_capacity(self, needed: int) -> None:
        """Grow (doubling) so that ``needed`` positions fit; existing entries are kept."""
        if needed > self.capacity:
            self._allocate(max(needed, 2 * self.capacity))

    def reset(self) -> None:
        """Forget every entry (buffers are kept for the next request)."""
        self.lengths = [0] * self.num_layers
        if self.batch_size != self.allocated_rows:  # the rows keep_rows let go: the same buffers again
            self.batch_size = self.allocated_rows
            self.keys, self.values = list(self._all_rows[0]), list(self._all_rows[1])
        self._row_lengths = [[0] * self.batch_size for _ in range(self.num_layers)]

    @property
    def row_lengths(self) -> list[list[int]]:
        """``row_lengths[layer][b]``: entries of row ``b`` in ``layer``."""
        if self.batch_size == 1:
            return [[n] for n in self.lengths]
        return self._row_lengths

    @row_lengths.setter
    def row_lengths(self, value: list[list[int]]) -> None:
        self._row_lengths = [list(lengths) for lengths in value]
        self.lengths = [max(lengths, default=0) for lengths in self._row_lengths]

    # -- the HF cache protocol used inside attention ----------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(batch, kv_heads, q, head_dim)`` states to layer ``layer_idx``; return all of them."""
        q = key_states.shape[2]
        starts = self.claim(layer_idx, q)
        end = max(starts) + q
        if min(starts) == max(starts):
            self.keys[layer_idx][:, :, end - q : end] = key_states
            self.values[layer_idx][:, :, end - q : end] = value_states
        else:  # rows of a batch at different lengths: each row's block lands at its own length
            slots = torch.tensor(starts, device=self.device)[:, None] + torch.arange(q, device=self.device)
            slots = slots[:, None, :, None]  # (batch, 1, q, 1)
            self.keys[layer_idx].scatter_(2, slots.expand_as(key_states), key_states)
            self.values[layer_idx].scatter_(2, slots.expand_as(value_states), value_states)
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def claim(self, layer_idx: int, q: int) -> list[int]:
        """Grow every row of layer ``layer_idx`` by ``q`` entries at the row's own length and return
        those lengths (where each row's entries start). :meth:`update` writes the entries; the fused
        C++ decoder layer writes them into ``keys[layer_idx]`` / ``values[layer_idx]`` itself."""
        starts = list(self.row_lengths[layer_idx]) if self.batch_size > 1 else [self.lengths[layer_idx]]
        end = max(starts) + q
        self.ensure_capacity(end)
        self._row_lengths[layer_idx] = [start + q for start in starts]
        self.lengths[layer_idx] = end
        return starts

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    # -- speculative bookkeeping -------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Committed length of layer 0 (never skipped by any method): the next token's position."""
        return self.lengths[0]

    def crop(self, length: int, layers: Sequence[int] | None = None) -> None:
        """Keep the first ``length`` entries of each (given) layer; shorter layers are untouched."""
        for layer in range(self.num_layers) if layers is None else layers:
            self.lengths[layer] = min(self.lengths[layer], length)
            self._row_lengths[layer] = [min(n, length) for n in self._row_lengths[layer]]

    def compact(self, base: int, kept_offsets: Sequence[int]) -> None:
        """Keep entries ``base + kept_offsets`` (ascending), moved to ``base .. base+len(kept)-1``.

        Used after tree verification: the accepted path's nodes are scattered in the verified
        block; every layer keeps exactly those and drops the rest.
        """
        kept = list(kept_offsets)
        if kept == list(range(len(kept))):  # already a prefix: a crop is enough
            self.crop(base + len(kept))
            return
        index = torch.tensor([base + k for k in kept], device=self.device)
        for layer in range(self.num_layers):
            if self.lengths[layer] <= base:
                continue
            # index_select copies first, so overlapping source/destination ranges are safe
            self.keys[layer][:, :, base : base + len(kept)] = self.keys[layer].index_select(2, index)
            self.values[layer][:, :, base : base + len(kept)] = self.values[layer].index_select(2, index)
            self.lengths[layer] = base + len(kept)
            self._row_lengths[layer] = [base + len(kept)] * self.batch_size

    # -- batches: one length per row ---------------------------------------------------------------
    def row_length(self, row: int) -> int:
        """Committed length of row ``row`` (layer 0): the position of its next token."""
        return self.row_lengths[0][row]

    @torch.inference_mode()
    def commit_rows(self, bases: Sequence[int], kept_offsets: Sequence[Sequence[int]]) -> None:
        """Per row ``b``: keep entries ``bases[b] + kept_offsets[b]`` (ascending), moved to
        ``bases[b] ..`` — :meth:`compact` for every row of a batch at once (one gather and one
        scatter per layer when some row keeps a non-prefix path, e.g. a tree branch)."""
        if len(bases) != self.batch_size or len(kept_offsets) != self.batch_size:
            raise ValueError(f"commit_rows needs {self.batch_size} rows")
        moves = any(list(kept) != list(range(len(kept))) for kept in kept_offsets)
        width = max(len(kept) for kept in kept_offsets)
        if moves and width:
            # pad short rows with their last kept entry: what lands past a row's new length is never read
            source = [
                [bases[b] + k for k in kept] + [bases[b] + kept[-1]] * (width - len(kept))
                for b, kept in enumerate(kept_offsets)
            ]
            source_slots = torch.tensor(source, device=self.device)[:, None, :, None]
            target_slots = (torch.tensor(bases, device=self.device)[:, None] + torch.arange(width, device=self.device))[
                :, None, :, None
            ]
        row_lengths = self.row_lengths
        for layer in range(self.num_layers):
            ran = [row_lengths[layer][b] > bases[b] for b in range(self.batch_size)]
            if not any(ran):
                continue
            if moves and width:
                for buffers in (self.keys, self.values):
                    shape = (self.batch_size, buffers[layer].shape[1], width, buffers[layer].shape[3])
                    moved = buffers[layer].gather(2, source_slots.expand(shape))  # a copy: overlaps are safe
                    buffers[layer].scatter_(2, target_slots.expand(shape), moved)
            row_lengths[layer] = [
                bases[b] + len(kept_offsets[b]) if ran[b] else row_lengths[layer][b] for b in range(self.batch_size)
            ]
        self.row_lengths = row_lengths

    @torch.inference_mode()
    def keep_rows(self, rows: Sequence[int]) -> None:
        """Drop every row not in ``rows`` (finished sequences leave the batch and stop costing work);
        the kept rows are renumbered ``0 .. len(rows)-1`` in the given order. In place: the kept rows
        move to the front of the same buffers (a new copy per call would leave every earlier copy
        alive wherever a row view of it is still held, e.g. by a finished row's drafter)."""
        index = torch.tensor(list(rows), device=self.device)
        kept_rows = len(rows)
        for layer in range(self.num_layers):
            end = self.lengths[layer]
            for buffers, live in zip(self._all_rows, (self.keys, self.values)):
                if end:  # index_select copies first: a kept row may move onto another's slot
                    buffers[layer][:kept_rows, :, :end] = live[layer][:, :, :end].index_select(0, index)
                live[layer] = buffers[layer][:kept_rows]
        kept = [[lengths[r] for r in rows] for lengths in self.row_lengths]
        self.batch_size = len(rows)
        self.row_lengths = kept

    def row_view(self, row: int) -> KVCache:
        """A one-row cache over row ``row``'s buffers (writes land in this cache), at its lengths:
        self-speculative drafters draft on it exactly as on a single sequence's cache. It cannot
        grow: the caller makes room first (``ensure_capacity``)."""
        view = RowView.__new__(RowView)
        view.__dict__.update(self.__dict__)
        view.batch_size = 1
        view.keys = [k[row : row + 1] for k in self.keys]
        view.values = [v[row : row + 1] for v in self.values]
        view.lengths = [lengths[row] for lengths in self.row_lengths]
        view._row_lengths = [[n] for n in view.lengths]  # its own lists: the view never edits the batch's
        view.allocated_rows = 1
        return view


class RowView(KVCache):
    """One row of a batched :class:`KVCache` (:meth:`KVCache.row_view`); shares its buffers."""

    def _allocate(self, capacity: int) -> None:
        raise RuntimeError(
            f"a row view of a batched KV cache cannot grow past its {self.capacity} slots; "
            "ensure capacity on the batched cache first"
        )
