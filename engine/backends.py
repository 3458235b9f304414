"""Engine backends: how a :class:`Backbone` runs its forward (``engine.backend``).

On a CPU the verify-latency curve T(k) (time of one forward of k new tokens) decides whether
speculation pays. Eager PyTorch has two costs that flatten differently:

* ``eager``    — the HF modules as they are (the reference).
* ``packed``   — (CPU with MKL) every ``nn.Linear`` of the decoder layers and the LM head also
  holds its weight MKL-prepacked for a few fixed row counts (``torch.ops.mkl._mkl_reorder_linear_weight``
  / ``_mkl_linear``). A block of 4..32 rows is zero-padded to the next packed bucket; 1..3 rows
  (and prefill) use plain ``F.linear``. Removes MKL's kernel switch at k = 4 (the jump in the
  eager curve); no compilation; costs one extra weight copy per packed bucket.
* ``onednn``   — (CPU with oneDNN) every ``nn.Linear`` of the decoder layers and the LM head runs
  oneDNN's fp32 inner-product on a weight reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``). On this AMD EPYC it runs the
  linears of a 1-token step in half of MKL's time and stays nearly flat up to 16 rows (no kernel
  switch at any k), and a row's output does not depend on how many rows share the call. fp32
  throughout; results differ from eager's by rounding only (the exactness check). Autograd calls
  (adapter / head training through the backbone) use plain ``F.linear``.
* ``tuned``    — (CPU) the fastest of those linear kernels (and DecodeBench's own ``streamed`` one,
  :mod:`decodebench.engine.streamed`) for each row bucket, measured on this
  machine over all of the model's linear weights (:mod:`decodebench.engine.kernels`: e.g. MKL for
  1-3 rows and oneDNN above on one Intel Xeon, oneDNN everywhere on one AMD EPYC) and stored next to
  the curves, so a later run reuses the choice. A kernel's weight copy is made only when some bucket
  picks it. Its decoder layers run fused where the family allows (:mod:`decodebench.engine.fused_layers`:
  q/k/v and gate/up as one linear each, a third of HF's ops per layer).
* ``compiled`` — ``torch.compile`` of the whole decode step (embed → layers → norm → LM head) at
  static block sizes: the block is padded to a bucket (``engine.buckets``) and attention runs over a
  fixed-layout view of the preallocated :class:`KVCache` (the span is a dynamic dimension, so the
  growing context never recompiles). On a CPU with inductor *freezing*, which prepacks the weights
  as ``packed`` does and removes the Python/dispatcher overhead of a step. Every bucket is compiled
  once when the backend is applied (never inside a timed region) and inductor's cache lives under
  the DecodeBench cache, so a second run loads the kernels instead of compiling them. The graph traces
  the fused decoder layers where the family allows (as ``tuned``), and on a CPU freezing prepacks a
  bucket's weights only where ``tuned``'s kernel table says a packed / oneDNN weight beats plain MKL
  (on one Intel Xeon MKL on the plain weights wins 1-3 rows: a 1-token step 29.5 ms vs 34.0 ms
  for fused eager). Blocks larger
  than the largest bucket (prefill), layer subsets and hidden-state requests take the eager path
  over the same cache.

``auto`` picks the fastest of the backends with a cheap setup (eager, packed, onednn, tuned) for the
device (from stored latency profiles when there are any, else tuned > onednn > packed > eager) that
fits in memory (:func:`memory_refusal`) and passes the exactness check: on a probe sequence its
logits equal eager's within fp32 rounding and its argmax agrees. Tiny models (fewer than
``TINY_MODEL_PARAMETERS``) stay eager under ``auto``: compile time would never be repaid.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from decodebench.config import DEFAULT_BUCKETS, ConfigValueError
from decodebench.engine import streamed
from decodebench.engine.fused_layers import fusion_refusal, install_fused_layers, remove_fused_layers

if TYPE_CHECKING:
    from decodebench.engine.backbone import Backbone, ForwardOutput
    from decodebench.engine.kv_cache import KVCache

log = logging.getLogger("decodebench")

# Below 4 rows MKL's small-M SGEMM path is already flat (T(2)/T(1) = 1.07 here); packing pays from 4.
PACK_MIN_ROWS = 4
# Attention span granularity of the compiled step (keeps the span dimension away from 0/1).
SPAN_STEP = 64
TINY_MODEL_PARAMETERS = 20_000_000
# A backend's weight copies must fit in this share of the memory available when it is applied
# (the rest: activations, caches, other processes' growth); beyond it the backend is skipped.
MEMORY_HEADROOM = 0.8
# Exactness check: |backend - eager| <= EXACT_RTOL * max|eager logit| and the same argmax per row.
EXACT_RTOL = 1e-4


@dataclass
class BackendInfo:
    """What was applied to a Backbone (goes to the run manifest)."""

    requested: str  # the engine.backend value (may be "auto")
    name: str  # the backend in use
    device: str
    buckets: list[int]  # block sizes with a static fast path (packed: packed row counts)
    setup_s: float  # packing / compiling every bucket + the exactness probe, outside timed regions
    max_abs_logit_diff: float | None = None  # vs eager on the probe (None for eager)
    argmax_agrees: bool | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # backend -> why auto skipped it
    extra_weight_bytes: int = 0  # backend weight copies (packed / reordered), beyond the model's own
    kernels: dict | None = None  # tuned: the kernel table (engine/kernels.py KernelTable.to_dict())
    # tuned: "fused" when the decoder layers run as engine/fused_layers.py FusedLayer, else why not
    layers: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def backends_for(device: str | torch.device) -> list[str]:
    """Backends that exist on ``device`` (packed needs a CPU with MKL, onednn one with oneDNN)."""
    kind = torch.device(device).type
    if kind == "cpu":
        return [
            "eager",
            *(["packed"] if torch._C.has_mkl else []),
            *(["onednn"] if torch.backends.mkldnn.is_available() else []),
            "tuned",
            "compiled",
        ]
    return ["eager", "compiled"]


def check_backend_name(name: str, device: str | torch.device, key: str = "engine.backend") -> None:
    allowed = ["auto", *backends_for(device)]
    if name not in allowed:
        raise ConfigValueError(
            f"invalid value for '{key}': {name!r} (allowed on {torch.device(device).type}: {' | '.join(allowed)})"
        )


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """Smallest bucket holding ``rows`` rows, or None when the block is larger than every bucket."""
    return next((b for b in sorted(buckets) if b >= rows), None)


# -- packed ------------------------------------------------------------------------------------
class _BackendLinear(torch.nn.Linear):
    """An ``nn.Linear`` carrying a backend's copy of its weight in ``backend_attribute``.

    A deep copy (Kangaroo's adapter copies a decoder layer, then trains or loads its weights) is a
    plain ``nn.Linear``: the backend copy would go stale once the copy's weight changes, and oneDNN's
    is an opaque tensor that cannot be deep-copied at all.
    """

    backend_attribute = ""

    def __deepcopy__(self, memo):
        plain = torch.nn.Linear.__new__(torch.nn.Linear)
        memo[id(self)] = plain
        state = {key: value for key, value in self.__dict__.items() if key != self.backend_attribute}
        plain.__dict__.update(copy.deepcopy(state, memo))
        return plain


class PackedLinear(_BackendLinear):
    """An ``nn.Linear`` that also keeps its weight MKL-prepacked for fixed row counts.

    Installed by swapping the instance's class (parameters, names and weight tying unchanged);
    :func:`remove_backend` swaps it back. ``packed`` maps a row count to the packed weight.
    """

    packed: dict[int, torch.Tensor]
    backend_attribute = "packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        bucket = bucket_for(rows, self.packed) if rows >= PACK_MIN_ROWS else None
        if bucket is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)
        if bucket > rows:
            flat = torch.cat([flat, flat.new_zeros(bucket - rows, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, self.packed[bucket], self.weight, self.bias, bucket)
        return out[:rows].reshape(*x.shape[:-1], self.out_features)


# -- onednn -------------------------------------------------------------------------------------
class OneDNNLinear(_BackendLinear):
    """An ``nn.Linear`` that also keeps its weight in oneDNN's blocked layout (``onednn`` backend).

    Installed by swapping the instance's class like :class:`PackedLinear`; the original weight
    stays (weight tying, layer-skipping methods and training read it).
    """

    onednn_weight: torch.Tensor
    backend_attribute = "onednn_weight"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.onednn_weight, self.bias, "none", [], "")


def _apply_onednn(backbone: Backbone) -> None:
    _onednn_linears(linears_of(backbone))


def _onednn_linears(linears: Sequence[torch.nn.Linear]) -> None:
    for linear in linears:
        if type(linear) is not torch.nn.Linear or linear.weight.dtype != torch.float32:
            continue
        with torch.no_grad():
            linear.onednn_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        linear.__class__ = OneDNNLinear


def _remove_onednn(backbone: Backbone) -> None:
    for linear in linears_of(backbone):
        if isinstance(linear, OneDNNLinear):
            linear.__class__ = torch.nn.Linear
            del linear.onednn_weight


def linears_of(backbone: Backbone) -> list[torch.nn.Linear]:
    """Every ``nn.Linear`` a step runs in the decoder layers, then the LM head (what the CPU
    backends swap): the fused q/k/v and gate/up linears where the layers are fused."""
    if backbone.fused_layers is not None:
        found = [linear for fused in backbone.fused_layers for linear in fused.linears()]
    else:
        found = [m for layer in backbone.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return [*found, backbone.lm_head]


def _apply_packed(backbone: Backbone, buckets: Sequence[int]) -> list[int]:
    # rows 4..7 pad to 8: a 4-row pack would cost one more weight copy for little gain
    packed_buckets = sorted({max(b, 8) for b in buckets if b >= PACK_MIN_ROWS})
    _pack_linears(linears_of(backbone), packed_buckets)
    return packed_buckets


def _pack_linears(linears: Sequence[torch.nn.Linear], packed_buckets: Sequence[int]) -> None:
    for linear in linears:
        if type(linear) is not torch.nn.Linear:
            continue
        with torch.no_grad():
            weight = linear.weight.detach()
            linear.packed = {b: torch.ops.mkl._mkl_reorder_linear_weight(weight, b) for b in packed_buckets}
        linear.__class__ = PackedLinear


def _remove_packed(backbone: Backbone) -> None:
    for linear in linears_of(backbone):
        if isinstance(linear, PackedLinear):
            linear.__class__ = torch.nn.Linear
            del linear.packed


# -- tuned ----------------------------------------------------------------------------------------
#: kernels of the tuned table that run on the module's own weight (no prepacked copy)
UNPACKED_KERNELS = ("mkl", "streamed")


class TunedLinear(_BackendLinear):
    """An ``nn.Linear`` running each block size with the kernel measured fastest for it here.

    ``kernel_by_rows[r]`` is the kernel of an ``r``-row block (``r`` <= the largest bucket; larger
    blocks run ``F.linear``) and ``pad_rows[r]`` the row count its ``mkl_packed`` weight was packed
    for; ``backend_weights`` holds the copies (``"onednn"`` and one ``mkl_packed`` entry per bucket).
    """

    kernel_by_rows: list[str]
    pad_rows: list[int]
    backend_weights: dict
    backend_attribute = "backend_weights"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows >= len(self.kernel_by_rows) or (
            torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        ):
            return F.linear(x, self.weight, self.bias)
        kernel = self.kernel_by_rows[rows]
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self.backend_weights["onednn"], self.bias, "none", [], "")
        if kernel == "mkl":
            return F.linear(x, self.weight, self.bias)
        if kernel == "streamed":  # the operator itself (loaded by _apply_tuned): torch.compile traces it
            return torch.ops.decodebench.streamed_linear(x, self.weight, self.bias)
        bucket = self.pad_rows[rows]
        flat = x.reshape(rows, self.in_features)
        if bucket > rows:
            flat = torch.cat([flat, flat.new_zeros(bucket - rows, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, self.backend_weights[bucket], self.weight, self.bias, bucket)
        return out[:rows].reshape(*x.shape[:-1], self.out_features)


def _tuned_table(backbone: Backbone, buckets: Sequence[int], cache_dir: str | None):
    """The stored kernel table of this model / CPU / threads / buckets, else one measured (and stored) now."""
    from decodebench.engine import kernels  # noqa: PLC0415 (kernels imports this module)

    model = getattr(backbone, "model_name", None)
    path = kernels.kernels_path(model, backbone.device.type, cache_dir) if model else None
    table = kernels.load_kernel_table(path, buckets) if path else None
    if table is None:
        table = kernels.measure_kernels(backbone, buckets)
        log.info("engine backend tuned: kernels measured in %.1f s: %s", table.measure_s, table.summary())
        if path:
            kernels.store_kernel_table(table, path)
    else:
        log.info("engine backend tuned: kernels from %s: %s", path, table.summary())
    return table


def _tuned_extra_bytes(backbone: Backbone, table) -> int:
    """Bytes of the weight copies :func:`_apply_tuned` makes for ``table``."""
    copies = ("onednn" in table.choice.values()) + sum(k == "mkl_packed" for k in table.choice.values())
    linears = [m for m in linears_of(backbone) if m.weight.dtype == torch.float32]
    return copies * sum(m.weight.numel() * m.weight.element_size() for m in linears)


def _apply_tuned(backbone: Backbone, table, kernels: Sequence[str] | None = None) -> None:
    """Make every fp32 linear a :class:`TunedLinear` following ``table``; a block size whose kernel is
    not in ``kernels`` (None: all) runs plain ``F.linear`` (the compiled step: inductor's own linear)."""
    chosen = [table.kernel(rows) for rows in range(1, table.buckets[-1] + 1)]
    kernel_by_rows = ["mkl", *(k if kernels is None or k in kernels else "mkl" for k in chosen)]
    pad_rows = [0, *(next(b for b in table.buckets if b >= rows) for rows in range(1, table.buckets[-1] + 1))]
    if "streamed" in kernel_by_rows and (reason := streamed.unavailable_reason()) is not None:
        raise RuntimeError(f"the kernel table picks the streamed kernel, which is unavailable here: {reason}")
    _tune_linears(linears_of(backbone), kernel_by_rows, pad_rows)


def _tune_linears(linears: Sequence[torch.nn.Linear], kernel_by_rows: list[str], pad_rows: list[int]) -> None:
    """Make each fp32 ``nn.Linear`` a :class:`TunedLinear` running ``kernel_by_rows[r]`` for ``r`` rows
    (``mkl_packed`` on a weight packed for ``pad_rows[r]`` rows)."""
    packed_for = sorted({pad_rows[rows] for rows, kernel in enumerate(kernel_by_rows) if kernel == "mkl_packed"})
    for linear in linears:
        if type(linear) is not torch.nn.Linear or linear.weight.dtype != torch.float32:
            continue
        weights: dict = {}
        with torch.no_grad():
            weight = linear.weight.detach()
            if "onednn" in kernel_by_rows:
                weights["onednn"] = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            for bucket in packed_for:
                weights[bucket] = torch.ops.mkl._mkl_reorder_linear_weight(weight, bucket)
        linear.kernel_by_rows, linear.pad_rows, linear.backend_weights = kernel_by_rows, pad_rows, weights
        linear.__class__ = TunedLinear


def follow_backend(backbone: Backbone, network: torch.nn.Module) -> str:
    """Run a drafter network's fp32 linears (its fc, decoder layer, heads) with the kernels the
    target's linears run: the tuned backend's kernel per row count, oneDNN's weight layout or MKL's
    packed weights (eager and the compiled step's non-streamed rows: plain ``F.linear``). A draft only
    steers what is accepted, so the target's verification keeps every method lossless; on a CPU the
    drafter's 1-4-row products are bound by streaming its weights, as the target's are (measured: the
    8192-token EAGLE head 2-3x faster on the streamed kernel than on MKL). Returns what was followed.
    Call it once the network is loaded (a TunedLinear keeps copies of the weights it had then)."""
    reference = backbone.lm_head
    linears = [m for m in network.modules() if type(m) is torch.nn.Linear]
    if isinstance(reference, TunedLinear):
        _tune_linears(linears, reference.kernel_by_rows, reference.pad_rows)
        return "tuned: " + ",".join(sorted(set(reference.kernel_by_rows[1:])))
    if isinstance(reference, OneDNNLinear):
        _onednn_linears(linears)
        return "onednn"
    if isinstance(reference, PackedLinear):
        _pack_linears(linears, sorted(reference.packed))
        return "packed"
    return "eager"


def _remove_tuned(backbone: Backbone) -> None:
    for linear in linears_of(backbone):
        if isinstance(linear, TunedLinear):
            linear.__class__ = torch.nn.Linear
            del linear.kernel_by_rows, linear.pad_rows, linear.backend_weights


# -- memory ----------------------------------------------------------------------------------------
def available_memory_bytes() -> int | None:
    """``MemAvailable`` of /proc/meminfo (Linux), else None (no check possible)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def extra_weight_bytes(backbone: Backbone, name: str, buckets: Sequence[int], table=None) -> int:
    """Bytes of the weight copies backend ``name`` adds to ``backbone`` (0 for eager; compiled's
    frozen copies are counted as one copy of the linears on a CPU)."""
    linears = [m for m in linears_of(backbone) if m.weight.dtype == torch.float32]
    weights = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if name == "packed":
        return weights * len({max(b, 8) for b in buckets if b >= PACK_MIN_ROWS})
    if name == "onednn":
        return weights
    if name == "compiled" and backbone.device.type == "cpu":  # a frozen copy where a bucket prepacks
        return weights if table is None or any(table.kernel(b) not in UNPACKED_KERNELS for b in buckets) else 0
    if name == "tuned" and table is not None:
        return _tuned_extra_bytes(backbone, table)
    return 0


def memory_refusal(needed: int, available: int | None) -> str | None:
    """Why a backend needing ``needed`` more bytes does not fit (None when it does or is unknown)."""
    if available is None or needed <= MEMORY_HEADROOM * available:
        return None
    return (
        f"its weight copies need {needed / 2**30:.2f} GiB, more than {MEMORY_HEADROOM:.0%} of the "
        f"{available / 2**30:.2f} GiB available (MemAvailable)"
    )


# -- compiled ----------------------------------------------------------------------------------
class _SlotWriter:
    """The HF cache protocol over fixed-size cache views: the block's K/V go to ``write_index``
    (a tensor, so a new position never recompiles) and attention sees the whole view."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_index: torch.Tensor):
        self.keys, self.values, self.write_index = keys, values, write_index

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.write_index, key_states)
        self.values[layer_idx].index_copy_(2, self.write_index, value_states)
        return self.keys[layer_idx], self.values[layer_idx]


class CompiledStep:
    """The compiled decode step of a Backbone; ``backbone.fast_forward`` calls it.

    One graph per bucket (block size); the attention span (a multiple of ``SPAN_STEP`` covering the
    cached tokens and the block) is marked dynamic, so context growth never recompiles.
    """

    def __init__(self, backbone: Backbone, buckets: Sequence[int], table=None):
        self.backbone = backbone
        self.buckets = sorted(buckets)
        # every CompiledStep shares the code object of ``_step``: one graph per bucket per model (target,
        # draft, tests with several models) must stay under dynamo's recompile limit (default 8), past
        # which it would silently run eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # On a CPU, inductor freezing prepacks the linear weights unless told not to; the tuned kernel
        # table (measured here) says per bucket whether a packed / oneDNN weight beats plain MKL or the
        # streamed kernel (the graph calls it where the table picks it, _install): one Intel Xeon runs
        # a 1-token step 13 % faster with MKL on the plain weights in the graph than with packed ones.
        self.prepack: dict[int, bool] = {}
        self.compiled: dict[bool, object] = {}
        for bucket in self.buckets:
            prepack = backbone.device.type == "cpu" and (table is None or table.kernel(bucket) not in UNPACKED_KERNELS)
            self.prepack[bucket] = prepack
            if prepack not in self.compiled:
                options = {"freezing": True, "cpp.weight_prepack": prepack} if backbone.device.type == "cpu" else {}
                self.compiled[prepack] = torch.compile(self._step, dynamic=False, fullgraph=True, options=options)

    def _step(self, ids, positions, mask, write_index, keys, values):
        """ids, positions: (1, bucket); mask: (1, 1, bucket, span); keys/values: per layer
        (1, kv_heads, span, head_dim) views. Returns normed hidden (bucket, hidden), logits (bucket, vocab)."""
        bb = self.backbone
        writer = _SlotWriter(keys, values, write_index)
        hidden = bb.embed(ids)
        position_embeddings = bb.position_embeddings(hidden, positions)
        for layer_index in range(bb.num_layers):
            hidden = bb._layer(
                layer_index, hidden, mask, positions, writer, bb._layer_rotary(position_embeddings, layer_index)
            )
        normed = bb.norm(hidden)[0]
        return normed, bb.head(normed)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, block_mask: torch.Tensor | None, cache: KVCache, logits_rows
    ) -> ForwardOutput | None:
        """Run the block through the compiled step, or return None when it has no fast path."""
        from decodebench.engine.backbone import ForwardOutput

        bb = self.backbone
        q = ids.shape[0]
        bucket = bucket_for(q, self.buckets)
        length = cache.lengths[0]
        if bucket is None or cache.batch_size != 1 or any(n != length for n in cache.lengths):
            return None
        if any(w is not None and length + bucket > w for w in bb.layer_windows):
            return None
        span = -(-(length + bucket) // SPAN_STEP) * SPAN_STEP
        cache.ensure_capacity(span)
        device = bb.device
        # rows: the q real tokens, then padding rows that see only themselves (never seen by real rows)
        allowed = torch.zeros(bucket, span, dtype=torch.bool)
        allowed[:q, :length] = True
        allowed[:q, length : length + q] = (
            torch.ones(q, q, dtype=torch.bool).tril_() if block_mask is None else block_mask.cpu().to(torch.bool)
        )
        pad = torch.arange(q, bucket)
        allowed[pad, length + pad] = True
        mask = allowed[None, None].to(device)
        if bb.attn_implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=bb.dtype, device=device).masked_fill_(~mask, torch.finfo(bb.dtype).min)
        padded_ids = torch.cat([ids, ids.new_zeros(bucket - q)])
        padded_positions = torch.cat([positions, positions[-1] + 1 + torch.arange(bucket - q, device=device)])
        write_index = torch.arange(length, length + bucket, device=device)
        keys = [k[:, :, :span] for k in cache.keys]
        values = [v[:, :, :span] for v in cache.values]
        for tensor in (mask, *keys, *values):
            torch._dynamo.mark_dynamic(tensor, tensor.dim() - 2 if tensor is not mask else 3)
        step = self.compiled[self.prepack[bucket]]
        normed, logits = step(padded_ids[None], padded_positions[None], mask, write_index, keys, values)
        cache.lengths = [length + q] * cache.num_layers
        normed, logits = normed[:q].clone(), logits[:q]
        if logits_rows is not None:
            logits = logits[logits_rows]
            if logits.dim() == 1:
                logits = logits[None]
        return ForwardOutput(logits=logits.float(), last_hidden=normed)


def _set_inductor_cache(cache_dir: str | None) -> None:
    """Compiled artefacts persist across runs under ``<DecodeBench cache>/inductor`` (unless the user
    already chose TORCHINDUCTOR_CACHE_DIR)."""
    from torch._inductor.runtime import cache_dir_utils

    from decodebench.config import default_cache_dir

    path = Path(cache_dir or default_cache_dir()) / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    # inductor writes its own default (/tmp/torchinductor_<user>) into the environment on first use
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(cache_dir_utils.default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)


# -- applying ------------------------------------------------------------------------------------
def _probe(backbone: Backbone, buckets: Sequence[int]) -> list[torch.Tensor]:
    """Logits of a fixed probe: a 40-token prefill, then one block per bucket (and k=2, 3) on top."""
    vocab = backbone.config.vocab_size
    prefix = [(7 * i + 3) % vocab for i in range(40)]
    cache = backbone.new_cache(128)
    out = []
    for k in sorted({1, 2, 3, *buckets}):
        cache.reset()
        backbone.forward(prefix, cache, logits_rows=slice(-1, None))
        out.append(backbone.forward([(11 * i + 5) % vocab for i in range(k)], cache).logits)
    return out


def remove_backend(backbone: Backbone) -> None:
    """Back to eager (the profiler applies every backend in turn to one model)."""
    _remove_packed(backbone)
    _remove_onednn(backbone)
    _remove_tuned(backbone)
    remove_fused_layers(backbone)
    backbone.fast_forward = None
    backbone.backend = "eager"


def _install(backbone: Backbone, name: str, buckets: Sequence[int], table=None) -> list[int]:
    if name == "tuned":
        refusal = install_fused_layers(backbone)
        if refusal is not None:
            log.info("engine backend tuned: decoder layers not fused: %s", refusal)
        _apply_tuned(backbone, table)
        return list(table.buckets)
    if name == "packed":
        return _apply_packed(backbone, buckets)
    if name == "onednn":
        _apply_onednn(backbone)
        return []
    if name == "compiled":
        refusal = install_fused_layers(backbone)  # the graph traces the fused layers: fewer ops to compile
        if refusal is not None:
            log.info("engine backend compiled: decoder layers not fused: %s", refusal)
        if table is not None:  # streamed buckets call DecodeBench's kernel inside the graph
            _apply_tuned(backbone, table, kernels=("streamed",))
        backbone.fast_forward = CompiledStep(backbone, buckets, table)
        return sorted(buckets)
    return []


def _preference(backbone: Backbone, model_name: str | None, cache_dir: str | None) -> list[str]:
    """auto's candidates, best first: by stored profiles (mean ms over the measured k <= 8), else
    tuned > onednn > packed > eager; tiny models: eager only. ``compiled`` is opt-in (``engine.backend=compiled``):
    its setup costs minutes per model on a CPU (one graph per bucket), more than a typical run."""
    available = [b for b in backends_for(backbone.device) if b != "compiled"]
    if sum(p.numel() for p in backbone.model.parameters()) < TINY_MODEL_PARAMETERS:
        return ["eager"]
    if model_name:
        from decodebench.engine.profile import load_latency_curve  # noqa: PLC0415 (circular at import time)

        curves = {
            b: load_latency_curve(model_name, b, device=backbone.device.type, cache_dir=cache_dir) for b in available
        }
        # typical decode blocks: AR (k=1) up to an 8-token verify
        measured = {
            b: statistics.mean(ms for k, ms in zip(c["k"], c["ms"]) if k <= 8)
            for b, c in curves.items()
            if c and min(c["k"]) <= 8
        }
        if measured:
            return sorted(available, key=lambda b: measured.get(b, float("inf")))
    return [b for b in ("tuned", "onednn", "packed", "eager") if b in available]


def apply_backend(
    backbone: Backbone,
    name: str = "auto",
    *,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    model_name: str | None = None,
    cache_dir: str | None = None,
    check: bool = True,
) -> BackendInfo:
    """Install backend ``name`` (or the best one for ``auto``) on ``backbone``.

    Compiles / packs every bucket and runs the exactness probe before returning, so no compilation
    happens later inside a timed region. An explicitly named backend that fails the check raises;
    ``auto`` falls back to the next candidate.

    Raises:
        ConfigValueError: unknown backend for the device, or a named backend failing the check.
    """
    check_backend_name(name, backbone.device)
    if any(b < 1 for b in buckets):
        raise ConfigValueError(f"invalid value for 'engine.buckets': {list(buckets)} (allowed: integers >= 1)")
    remove_backend(backbone)
    backbone.model_name = model_name or getattr(backbone, "model_name", None)
    candidates = _preference(backbone, model_name, cache_dir) if name == "auto" else [name]
    if "compiled" in candidates:
        _set_inductor_cache(cache_dir)
    rejected: dict[str, str] = {}
    reference = None
    for candidate in candidates:
        started = time.perf_counter()
        if candidate == "eager":
            backbone.backend = "eager"
            return BackendInfo(name, "eager", str(backbone.device), [], 0.0, rejected=rejected)
        try:
            # compiled on a CPU reads the kernel table too: whether freezing prepacks a bucket's weights
            needs_table = candidate == "tuned" or (candidate == "compiled" and backbone.device.type == "cpu")
            table = _tuned_table(backbone, buckets, cache_dir) if needs_table else None
        except Exception as error:  # a kernel that fails to run on this CPU makes auto fall back
            if name != "auto":
                raise
            rejected[candidate] = f"kernel measurement failed: {type(error).__name__}: {error}"[:500]
            log.warning("engine backend tuned: %s; trying the next one", rejected[candidate])
            continue
        extra = extra_weight_bytes(backbone, candidate, buckets, table)
        refusal = memory_refusal(extra, available_memory_bytes())
        if refusal is not None:
            if name != "auto":
                raise ConfigValueError(f"engine.backend={candidate} does not fit in memory here: {refusal}")
            rejected[candidate] = f"does not fit in memory: {refusal}"
            log.warning("engine backend %s skipped: %s", candidate, rejected[candidate])
            continue
        if reference is None and check:
            reference = _probe(backbone, buckets)
        try:
            installed = _install(backbone, candidate, buckets, table)
            backbone.backend = candidate
            ours = _probe(backbone, buckets)  # compiles every bucket
        except Exception as error:  # a compiler failure makes auto fall back
            remove_backend(backbone)
            if name != "auto":
                raise
            rejected[candidate] = f"{type(error).__name__}: {error}"[:500]
            log.warning("engine backend %s failed (%s); trying the next one", candidate, rejected[candidate])
            continue
        info = BackendInfo(name, candidate, str(backbone.device), installed, round(time.perf_counter() - started, 3))
        info.extra_weight_bytes = extra
        info.kernels = table.to_dict() if table is not None else None
        if candidate in ("tuned", "compiled"):
            info.layers = "fused" if backbone.fused_layers is not None else fusion_refusal(backbone)
        if reference is not None:
            diff = max((a - b).abs().max().item() for a, b in zip(ours, reference))
            scale = max(r.abs().max().item() for r in reference)
            info.max_abs_logit_diff = diff
            info.argmax_agrees = all(torch.equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(ours, reference))
            if not info.argmax_agrees or diff > EXACT_RTOL * max(scale, 1.0):
                reason = f"exactness check failed: max |logit diff| {diff:.3g}, argmax agrees {info.argmax_agrees}"
                remove_backend(backbone)
                if name != "auto":
                    raise ConfigValueError(f"engine.backend={candidate}: {reason}")
                rejected[candidate] = reason
                log.warning("engine backend %s: %s; trying the next one", candidate, reason)
                continue
        info.rejected = rejected
        log.info(
            "engine backend %s (%s): setup %.1f s, max |logit diff| vs eager %s",
            candidate,
            backbone.device,
            info.setup_s,
            info.max_abs_logit_diff,
        )
        return info
    backbone.backend = "eager"
    return BackendInfo(name, "eager", str(backbone.device), [], 0.0, rejected=rejected)
