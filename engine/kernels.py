"""Linear kernels per block size, measured on the machine at hand (the ``tuned`` backend).

Which fp32 GEMM kernel runs a block of ``k`` rows fastest depends on the CPU, not on the model: on
one Intel Xeon MKL's small-M path wins for 1-3 rows and jumps at 4 (where a prepacked MKL weight or
oneDNN stays flat); on one AMD EPYC oneDNN wins everywhere. So the choice is measured here, per
weight shape of the model and per row bucket, among the kernels this PyTorch build has:

* ``mkl``        — ``F.linear`` (MKL's SGEMM/SGEMV on the plain weight; the eager reference);
* ``mkl_packed`` — ``torch.ops.mkl._mkl_linear`` on a weight MKL-prepacked for exactly the bucket's
  row count (the block is zero-padded up to it; one weight copy per bucket that picks it);
* ``onednn``     — ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once into oneDNN's
  blocked layout (one weight copy, shared by every bucket that picks it);
* ``streamed``   — DecodeBench's own kernel (:mod:`decodebench.engine.streamed`, compiled here once):
  each weight row streamed once against every row of the block, on the plain weight (no copy);
  a row's output is bitwise independent of the block it is in.

A measurement runs the model's real weights (every layer's and the LM head, as in a decode step), so
they come from memory as in a step, not from a warm L2 cache as in a one-matrix loop.
The choice (and every time measured) is stored next to the verify-latency curves as
``<model>__tuned__<device>__<threads>t.kernels.json`` with the CPU model; a stored choice made on
another CPU, thread count or bucket set is measured again.

Exactness: every kernel computes the same fp32 dot products; they differ by summation order only.
Only oneDNN and ``streamed`` keep a row's output bitwise independent of the rows sharing the call
(``rows_bitwise`` in the table says which, measured); the backend passes the same exactness probe as
every other backend (logits within ``EXACT_RTOL`` of eager's, the same argmax per row).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from decodebench.engine import streamed
from decodebench.engine.revision import engine_revision

if TYPE_CHECKING:
    from decodebench.engine.backbone import Backbone

# Row counts always measured one by one: where MKL's small-M path switches kernels (k = 4 here).
SMALL_ROWS = (1, 2, 3)
KERNEL_REPEATS = 5  # median of 5 passes over the shape's weights per (bucket, kernel)
KERNEL_WARMUP = 1
# A kernel with a weight copy replaces plain mkl only when it is at least this much faster (timing
# noise must not buy a copy of the weights); among kernels within it of the fastest, the one with
# the fewest copies wins: streamed, mkl (none; streamed first: its rows are bitwise independent of the
# block, so AR and verification agree exactly) < onednn (one, shared by its buckets) < mkl_packed (one
# per bucket).
MIN_GAIN = 0.10
FEWEST_COPIES_FIRST = ("streamed", "mkl", "onednn", "mkl_packed")
# The streamed kernel is also what runs the fused C++ decoder layer (engine/fused_layers.py
# native_for: a block whose four linears all pick it skips the Python layer's glue, ~40 % of a
# 1-token step on the Intel Xeon: 25 vs 42 ms), which timing the linears alone does not see. So it
# wins within this margin of the fastest: a noisy pass (11 % slower at 1 row once) must not send AR
# steps back to the Python layer.
STREAMED_MARGIN = 0.25


def kernels_available() -> list[str]:
    """The linear kernels this PyTorch build has on a CPU (``mkl`` is plain ``F.linear``)."""
    return [
        "mkl",
        *(["mkl_packed"] if torch._C.has_mkl else []),
        *(["onednn"] if torch.backends.mkldnn.is_available() else []),
        *(["streamed"] if streamed.unavailable_reason() is None else []),
    ]


def row_buckets(buckets: Sequence[int]) -> list[int]:
    """Row buckets with a kernel choice: 1, 2, 3 and every ``engine.buckets`` value above 3 (a block
    of k rows uses the smallest bucket >= k; larger blocks, e.g. prefill, run ``mkl``)."""
    return sorted({*SMALL_ROWS, *(b for b in buckets if b > max(SMALL_ROWS))})


def shape_key(linear: torch.nn.Linear) -> str:
    return f"{linear.out_features}x{linear.in_features}"


@dataclass
class KernelTable:
    """The kernel of each (weight shape, row bucket), with what it was chosen from."""

    buckets: list[int]  # row buckets (ascending); rows > buckets[-1] run mkl
    choice: dict[str, str]  # str(bucket) -> kernel
    us: dict[str, dict[str, float]]  # str(bucket) -> kernel -> µs of one pass over every linear weight
    rows_bitwise: dict[str, bool]  # kernel -> a row's output equals its 1-row call bitwise, every bucket
    cpu: str
    threads: int
    measure_s: float
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    engine_revision: str = ""  # the engine that measured it (decodebench.engine.revision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def kernel(self, rows: int) -> str:
        """The kernel of a block of ``rows`` rows (mkl above the largest bucket)."""
        bucket = next((b for b in self.buckets if b >= rows), None)
        return "mkl" if bucket is None else self.choice[str(bucket)]

    def summary(self) -> str:
        """The kernel of each bucket, e.g. ``k<=1: mkl | k<=2: mkl | ... | k<=8: onednn``."""
        return " | ".join(f"k<={bucket}: {self.choice[str(bucket)]}" for bucket in self.buckets)


def _interleaved_us(runners: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median µs of each runner, timed round-robin (machine noise hits every kernel alike)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for repeat in range(repeats + KERNEL_WARMUP):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            if repeat >= KERNEL_WARMUP:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e6 for name, values in times.items()}


def pick_kernel(timed: dict[str, float]) -> str:
    """The kernel of one (shape, bucket) from its times: ``streamed`` within ``STREAMED_MARGIN`` of the
    fastest, else the fewest weight copies among those within ``MIN_GAIN`` of the fastest (so plain
    mkl unless another kernel is clearly faster)."""
    best = min(timed.values())
    if "streamed" in timed and timed["streamed"] <= best * (1 + STREAMED_MARGIN):
        return "streamed"
    return next(k for k in FEWEST_COPIES_FIRST if k in timed and timed[k] <= best * (1 + MIN_GAIN))


def _runner(kernel: str, weights: list[torch.Tensor], rows: int, onednn: list[torch.Tensor] | None):
    """A function running ``rows`` rows through every weight of ``weights`` with ``kernel``
    (``onednn``: the weights already reordered for oneDNN)."""
    x = torch.randn(rows, weights[0].shape[1], generator=torch.Generator().manual_seed(rows))
    if kernel == "mkl":
        return lambda: [F.linear(x, w) for w in weights]
    if kernel == "onednn":
        return lambda: [torch.ops.mkldnn._linear_pointwise(x, c, None, "none", [], "") for c in onednn]
    if kernel == "streamed":
        return lambda: [streamed.streamed_linear(x, w) for w in weights]
    packed = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    return lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, rows) for p, w in zip(packed, weights)]


def _rows_bitwise(kernel: str, weight: torch.Tensor, buckets: Sequence[int]) -> bool:
    """Does a row's output equal the 1-row call's bitwise, for every bucket's row count?"""
    x = torch.randn(max(buckets), weight.shape[1], generator=torch.Generator().manual_seed(7))

    def run(rows: int) -> torch.Tensor:
        block = x[:rows]
        if kernel == "mkl":
            return F.linear(block, weight)
        if kernel == "streamed":
            return streamed.streamed_linear(block, weight)
        if kernel == "onednn":
            return torch.ops.mkldnn._linear_pointwise(
                block, torch.ops.mkldnn._reorder_linear_weight(weight, None), None, "none", [], ""
            )
        return torch.ops.mkl._mkl_linear(
            block, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows), weight, None, rows
        )

    one = run(1)
    return all(torch.equal(run(rows)[:1], one) for rows in buckets)


def measure_kernels(backbone: Backbone, buckets: Sequence[int], repeats: int = KERNEL_REPEATS) -> KernelTable:
    """Time every available kernel on every row bucket over all of ``backbone``'s linear weights
    (decoder layers + LM head: one pass = the linear work of one decode step) and pick one kernel
    per bucket (:func:`pick_kernel`). The kernels are timed round-robin within a bucket.

    One kernel per bucket for the whole model, not per weight shape: a per-shape choice would follow
    timing noise into more weight copies for gains inside that noise.
    """
    from decodebench.engine.backends import linears_of  # noqa: PLC0415 (backends imports this module)
    from decodebench.runners.manifest import cpu_model  # noqa: PLC0415 (runners import the engine)

    started = time.perf_counter()
    candidates = kernels_available()
    rows_list = row_buckets(buckets)
    by_shape: dict[str, list[torch.Tensor]] = {}
    for linear in linears_of(backbone):
        if linear.weight.dtype == torch.float32:
            by_shape.setdefault(shape_key(linear), []).append(linear.weight.detach())
    choice: dict[str, str] = {}
    us: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        onednn = (
            {
                key: [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
                for key, weights in by_shape.items()
            }
            if "onednn" in candidates
            else {}
        )
        for rows in rows_list:
            runners = {}
            for kernel in candidates:
                parts = [_runner(kernel, weights, rows, onednn.get(key)) for key, weights in by_shape.items()]
                runners[kernel] = lambda parts=parts: [part() for part in parts]
            us[str(rows)] = {kernel: round(value, 1) for kernel, value in _interleaved_us(runners, repeats).items()}
            choice[str(rows)] = pick_kernel(us[str(rows)])
            del runners
        del onednn
        sample = next(iter(by_shape.values()))[0]
        rows_bitwise = {kernel: _rows_bitwise(kernel, sample, rows_list) for kernel in candidates}
    return KernelTable(
        buckets=rows_list,
        choice=choice,
        us=us,
        rows_bitwise=rows_bitwise,
        cpu=cpu_model(),
        threads=torch.get_num_threads(),
        measure_s=round(time.perf_counter() - started, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        engine_revision=engine_revision(),
    )


def kernels_path(model: str, device: str = "cpu", cache_dir: str | None = None, threads: int | None = None) -> Path:
    """Where ``tuned``'s kernel table of ``model`` is stored: next to its verify-latency curve."""
    from decodebench.engine.profile import profile_path  # noqa: PLC0415 (profile imports the backends)

    curve = profile_path(model, "tuned", device, cache_dir, threads)
    return curve.with_name(curve.stem + ".kernels.json")


def load_kernel_table(path: Path, buckets: Sequence[int]) -> KernelTable | None:
    """The stored table when it was measured on this CPU at this thread count for these buckets,
    among the kernels available now (a kernel added or gone since means measuring again), by this
    engine revision."""
    from decodebench.runners.manifest import cpu_model  # noqa: PLC0415

    if not path.is_file():
        return None
    try:
        table = KernelTable(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    same = table.cpu == cpu_model() and table.threads == torch.get_num_threads()
    if table.engine_revision != engine_revision():  # the kernels themselves may have changed
        return None
    candidates = set(next(iter(table.us.values()), {}))
    if candidates and candidates != set(kernels_available()):
        return None
    return table if same and table.buckets == row_buckets(buckets) else None


def store_kernel_table(table: KernelTable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table.to_dict(), indent=2))
