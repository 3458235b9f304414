"""Fused decoder layers: one pre-norm SwiGLU layer in a few large ops (the ``tuned`` backend).

A step of a small model on a CPU spends a third of its time outside the matmuls: an HF decoder
layer runs ~56 top-level ops (three projections, the rotary embedding of q and of k as slices, a
negation and a concatenation each, a six-op RMSNorm, module calls with their hooks and keyword
plumbing), each costing microseconds of Python and dispatch. On SmolLM2-135M that is ~13 ms of a
~36 ms step (``decodebench-profile --breakdown-ks 1``), while the weights alone stream in ~23 ms.

For the families whose layers are exactly "RMSNorm → q/k/v → RoPE → attention → o → residual,
RMSNorm → SiLU(gate) · up → down → residual" (:data:`FUSABLE_FAMILIES`), :class:`FusedLayer` runs
the same arithmetic in ~20 ops:

* q, k and v come out of one linear over the concatenated weight (and bias), gate and up out of
  another; the modules' own weights become views into the fused ones, so no weight is copied and
  every other path (sublayer skipping, adapters copied from a layer, training) still reads them;
* RoPE rotates the q and k heads of the fused output together, with the step's cos and
  sign-folded sin tables built once for all layers (:class:`RotaryTables`): ``rotate_half(x) * sin``
  is ``roll(x, d/2) * (-sin₁, sin₂)`` exactly (a negation is exact in floating point);
* RMSNorm is ``F.rms_norm`` (one kernel instead of six ops);
* attention is ``F.scaled_dot_product_attention`` with the causal flag and mask transformers' sdpa
  path uses, on the :class:`KVCache` through its ``update`` protocol (so batched rows at their own
  lengths work unchanged); GQA attends on the kv heads with the query heads folded into the query
  rows, never repeating the cached K/V per query head.

Each output element is the same fp32 dot product, so results differ from the HF layer by summation
order only; the backend's exactness probe (logits within ``EXACT_RTOL`` of eager's, the same argmax)
checks it on every apply, and lossless methods stay token-for-token equal to AR because AR and
verification both run these layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from collections.abc import Sequence

    from decodebench.engine.backbone import Backbone

# Families whose decoder layer is plain pre-norm attention + SwiGLU MLP with half-rotation RoPE
# (no q/k norms, no soft-capping, no parallel residual, no multipliers).
FUSABLE_FAMILIES = ("llama", "mistral", "qwen2")


def fusion_refusal(backbone: Backbone) -> str | None:
    """Why ``backbone``'s layers cannot be fused, or None when they can."""
    config = backbone.config
    if backbone.family.name not in FUSABLE_FAMILIES:
        return f"family '{backbone.family.name}' (fused layers cover {', '.join(FUSABLE_FAMILIES)})"
    if backbone.dtype != torch.float32:
        return f"dtype {backbone.dtype} (fused layers are fp32: the CPU backends' kernels are)"
    if backbone.attn_implementation != "sdpa":
        return f"attention implementation '{backbone.attn_implementation}' (fused layers run sdpa)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "a non-SiLU activation or tensor-parallel slicing (pretraining_tp > 1)"
    for layer in backbone.layers:
        attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        parts = (
            [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
            + [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
            + [getattr(layer, name, None) for name in ("input_layernorm", "post_attention_layernorm")]
        )
        if any(part is None for part in parts) or hasattr(attention, "q_norm"):
            return f"layer type {type(layer).__name__} is not the plain pre-norm SwiGLU layer"
    return None


def _fuse(linears: list[torch.nn.Linear]) -> torch.nn.Linear:
    """One linear over the rows of ``linears``; each module's weight (and bias) becomes a view into it."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    has_bias = linears[0].bias is not None
    # built on the meta device: its own random initialisation would be thrown away at once
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", dtype=weight.dtype)
    with torch.no_grad():
        fused.weight = torch.nn.Parameter(weight, requires_grad=False)
        if has_bias:
            fused.bias = torch.nn.Parameter(
                torch.cat([linear.bias.detach() for linear in linears]), requires_grad=False
            )
        start = 0
        for linear in linears:
            rows = linear.out_features
            trainable = linear.weight.requires_grad
            linear.weight = torch.nn.Parameter(fused.weight[start : start + rows], requires_grad=trainable)
            if has_bias:
                linear.bias = torch.nn.Parameter(fused.bias[start : start + rows], requires_grad=trainable)
            start += rows
    return fused


class RotaryTables:
    """The step's ``(cos, sign-folded sin)`` with a head axis, shared by every fused layer: built on
    the first layer of a forward, reused while the position embeddings are the same tensors."""

    def __init__(self) -> None:
        self._source: torch.Tensor | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def build(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(1), signed.unsqueeze(1)

    def get(self, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = position_embeddings
        if torch.compiler.is_compiling():  # in a traced step: no Python state (it would be guarded on)
            return self.build(cos, sin)
        if cos is not self._source:
            self._source, self._tables = cos, self.build(cos, sin)
        return self._tables


class FusedLayer:
    """One decoder layer with fused q/k/v and gate/up linears (see the module docstring)."""

    def __init__(self, layer: torch.nn.Module, layer_index: int, config, rotary: RotaryTables):
        attention, mlp = layer.self_attn, layer.mlp
        if (attention.q_proj.bias is None) != (attention.v_proj.bias is None):
            raise ValueError("q/k/v projections must all have a bias or none")
        self.layer_index = layer_index
        self.rotary = rotary
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.intermediate = mlp.gate_proj.out_features
        self.attention_norm, self.mlp_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
        self.gate_up = _fuse([mlp.gate_proj, mlp.up_proj])
        self.o_proj, self.down_proj = attention.o_proj, mlp.down_proj

    def linears(self) -> list[torch.nn.Linear]:
        """The linears a step runs (what the CPU kernel backends swap)."""
        return [self.qkv, self.o_proj, self.gate_up, self.down_proj]

    @staticmethod
    def _norm(norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)

    def native_for(self, rows: int) -> bool:
        """Whether ``rows`` block rows (one sequence's, or all rows of a batch) run as the C++ decoder layer: where the
        tuned backend's kernel table picked the streamed kernel for all four linears (the layer
        runs its matmuls on that kernel), never inside a torch.compile trace."""
        return all(
            rows < len(getattr(linear, "kernel_by_rows", ())) and linear.kernel_by_rows[rows] == "streamed"
            for linear in self.linears()
        )

    def __call__(
        self, hidden: torch.Tensor, mask, cache, position_embeddings, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """``(batch, q, hidden)`` in and out; K/V of the block appended to ``cache``. ``sizes``: real
        tokens of each row's block (default ``q`` each); the C++ layer runs only those rows, the
        Python layer all of them (a padding row's output is never read)."""
        batch, q, _ = hidden.shape
        sizes = [q] * batch if sizes is None else list(sizes)
        # rows on a KVCache (the compiled step's cache view has no batch_size: never native); a batch
        # needs its boolean mask (rows at their own lengths; an additive float mask stays in Python)
        on_cache = not torch.compiler.is_compiling() and getattr(cache, "batch_size", None) == batch
        native = on_cache and (batch == 1 or (mask is not None and mask.dtype == torch.bool))
        if native and self.native_for(sum(sizes)):
            return self._native_layer(hidden, mask, cache, position_embeddings, sizes)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv.forward(self._norm(self.attention_norm, hidden))
        qkv = qkv.view(batch, q, heads + 2 * kv_heads, dim).transpose(1, 2)
        cos, signed_sin = self.rotary.get(position_embeddings)
        qk = qkv[:, : heads + kv_heads]
        qk = qk * cos + qk.roll(dim // 2, dims=-1) * signed_sin
        key, value = cache.update(qk[:, heads:], qkv[:, heads + kv_heads :], self.layer_index)
        attended = self._attend(qk[:, :heads], key, value, mask)
        hidden = hidden + self.o_proj.forward(attended.reshape(batch, q, heads * dim))
        gate_up = self.gate_up.forward(self._norm(self.mlp_norm, hidden))
        return hidden + self.down_proj.forward(
            F.silu(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :]
        )

    def _native_layer(self, hidden: torch.Tensor, mask, cache, position_embeddings, sizes: list[int]) -> torch.Tensor:
        """The whole layer as one ``decodebench::decode_layer`` call (engine/decode_layer.cpp) for one
        sequence or a batch of rows at their own cache lengths: the K/V of the block's real rows are
        written straight into the cache's buffers, each row's at its own length."""
        batch, q, _ = hidden.shape
        cos, sin = position_embeddings
        starts = cache.claim(self.layer_index, q)
        return torch.ops.decodebench.decode_layer(
            hidden.contiguous(),
            self.attention_norm.weight,
            self.qkv.weight,
            self.qkv.bias,
            self.o_proj.weight,
            self.o_proj.bias,
            self.mlp_norm.weight,
            self.gate_up.weight,
            self.gate_up.bias,
            self.down_proj.weight,
            self.down_proj.bias,
            cos.reshape(batch * q, -1).contiguous(),
            sin.reshape(batch * q, -1).contiguous(),
            cache.keys[self.layer_index],
            cache.values[self.layer_index],
            starts,
            sizes,
            mask,
            self.heads,
            self.kv_heads,
            self.attention_norm.variance_epsilon,
            self.scaling,
        )

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> torch.Tensor:
        """Attention as transformers' sdpa path runs it (causal flag, prefill crop), returning
        ``(batch, q, heads, head_dim)``. GQA with a mask attends on the kv heads with each one's
        query heads folded into its query rows (the mask repeated per head of the group): the same
        dot products as repeating K and V per query head, which transformers does, without copying
        the cached K/V every layer (that copy cost a 4-token verify ~7 ms of a ~52 ms step on
        SmolLM2-135M with a 300-token context)."""
        batch, heads, q, dim = query.shape
        groups = heads // self.kv_heads
        extra = {}
        if groups > 1:
            if mask is None:
                extra["enable_gqa"] = True
            else:  # attend on the kv heads, each head's query group folded into its query rows
                query = query.reshape(batch, self.kv_heads, groups * q, dim)
                if q > 1:  # row g·q + i of the folded query masks as query i
                    b, h, _, keys = mask.shape
                    mask = mask.unsqueeze(2).expand(b, h, groups, q, keys).reshape(b, h, groups * q, keys)
        causal = q > 1 and mask is None
        if causal and key.shape[2] > q:
            key, value = key[:, :, :q], value[:, :, :q]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=0.0, scale=self.scaling, is_causal=causal, **extra
        )
        return out.reshape(batch, heads, q, dim).transpose(1, 2)


def packs_padding(backbone: Backbone, rows: int = 8) -> bool:
    """Whether a batch forward of up to ``rows`` real rows runs only those rows (the C++ decoder
    layer packs each row's padding out), so a row without drafts costs one row, not the block width."""
    return backbone.fused_layers is not None and all(backbone.fused_layers[0].native_for(r) for r in range(1, rows + 1))


def install_fused_layers(backbone: Backbone) -> str | None:
    """Fuse ``backbone``'s layers (``backbone.fused_layers``); returns why not, or None when fused."""
    refusal = fusion_refusal(backbone)
    if refusal is None:
        rotary = RotaryTables()
        backbone.fused_layers = [
            FusedLayer(layer, index, backbone.config, rotary) for index, layer in enumerate(backbone.layers)
        ]
    return refusal


def remove_fused_layers(backbone: Backbone) -> None:
    """Back to the HF layers (their weights stay views of the fused ones: the same values)."""
    backbone.fused_layers = None
