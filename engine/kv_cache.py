"""Harness-owned KV cache: preallocated per layer, with an explicit length per layer.

HF decoder layers only need an object with ``update(key, value, layer_idx) -> (K_all, V_all)``;
this class is that object. Owning it (instead of ``DynamicCache``) gives what speculative methods
need and HF's cache lacks:

* per-layer lengths — layer skipping and early exit leave some layers shorter than others
  (``DynamicCache.get_seq_length`` reads layer 0 only and ``crop`` cuts every layer);
* ``crop(n)`` after a rejected chain, ``compact(base, kept)`` after a tree verification keeps the
  accepted path's entries contiguous;
* preallocation (no ``torch.cat`` per step) and a cheap ``reset`` between requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Per-layer key/value buffers of shape ``(batch_size, kv_heads, capacity, head_dim)``.

    Values may have their own width (``value_head_dim``): multi-head latent attention (DeepSeek-V3)
    caches its compressed KV latent as the "key" and the shared rotary key as the "value".

    A batch (``batch_size > 1``, :meth:`Backbone.forward_batch`) is left-padded: every row has the
    same slot count per layer, and ``padding[b]`` leading slots of row ``b`` are padding (masked
    out; slot ``s`` holds position ``s - padding[b]``).
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
        self.padding = [0] * batch_size  # leading padding slots per row (left padding)
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
        self._allocate(capacity)

    # -- sizing -------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        shape = (self.batch_size, self.num_kv_heads, capacity, self.head_dim)
        value_shape = (*shape[:3], self.value_head_dim)
        # zeros, not empty: the compiled backend attends over whole fixed-size views with masks, and a
        # masked NaN left in uninitialised memory would still poison the softmax (0 * NaN = NaN)
        new_keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        new_values = [torch.zeros(value_shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        for layer, length in enumerate(self.lengths):
            if length:
                new_keys[layer][:, :, :length] = self.keys[layer][:, :, :length]
                new_values[layer][:, :, :length] = self.values[layer][:, :, :length]
        self.keys, self.values, self.capacity = new_keys, new_values, capacity

    def ensure_capacity(self, needed: int) -> None:
        """Grow (doubling) so that ``needed`` positions fit; existing entries are kept."""
        if needed > self.capacity:
            self._allocate(max(needed, 2 * self.capacity))

    def reset(self) -> None:
        """Forget every entry (buffers are kept for the next request)."""
        self.lengths = [0] * self.num_layers
        self.padding = [0] * self.batch_size

    # -- the HF cache protocol used inside attention ----------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(batch, kv_heads, q, head_dim)`` states to layer ``layer_idx``; return all of them."""
        start = self.lengths[layer_idx]
        end = start + key_states.shape[2]
        self.ensure_capacity(end)
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

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
