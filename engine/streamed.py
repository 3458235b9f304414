"""The ``streamed`` linear kernel: each weight row read once for every row of a small block.

A decode step (1 row) and a verify block (k rows) are both bound by streaming the weights from
memory; BLAS libraries switch to compute-oriented kernels for a few rows that read the weights again
(on one Intel Xeon MKL's time jumps at 4 rows: T(8)/T(1) of a step is ~1.9). ``streamed_linear.cpp``
multiplies each weight row, as it streams by, against all rows of the block held in cache, so a
block costs about what one row costs, and a row's output is bitwise the same whatever block it is in
(AR and verification agree exactly). It is one more candidate of the tuned backend's per-bucket
measurement (:mod:`decodebench.engine.kernels`), chosen only where it is measured fastest.

The C++ source is compiled once per machine with ``-march=native`` by
``torch.utils.cpp_extension`` (a C++ compiler and ``ninja`` are needed) into
``<DecodeBench cache>/kernels/streamed/<cpu, torch>``. It is written with AVX-512 intrinsics (AVX2 +
FMA on CPUs without AVX-512): R weight rows in flight per task, the next rows prefetched into L2. A
machine without a compiler or without those instruction sets has no ``streamed`` kernel, and says
why (:func:`unavailable_reason`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger("decodebench")
# the streamed linear kernel and the fused decoder layer built on it (decode_layer.cpp; simd.h is shared)
SOURCES = [Path(__file__).with_name(name) for name in ("streamed_linear.cpp", "decode_layer.cpp")]
# fp contraction only where the source asks (std::fma); 512-bit vectors where the CPU has them (GCC
# prefers 256 on Intel by default: half the registers for the kernel's accumulators, measured slower)
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp"]


def build_directory(cache_dir: str | None = None) -> Path:
    """Per CPU model and PyTorch version: ``-march=native`` binaries must not move between machines."""
    from decodebench.config import default_cache_dir  # noqa: PLC0415
    from decodebench.runners.manifest import cpu_model  # noqa: PLC0415 (runners import the engine)

    key = hashlib.sha1(f"{cpu_model()}|{platform.machine()}|{torch.__version__}".encode()).hexdigest()[:12]
    return Path(cache_dir or default_cache_dir()) / "kernels" / "streamed" / key


@functools.cache
def _load():
    """The compiled extension, or the error that kept it from building (cached per process)."""
    from torch.utils import cpp_extension  # noqa: PLC0415

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        module = cpp_extension.load(
            name="decodebench_streamed",
            sources=[str(source) for source in SOURCES],
            extra_cflags=FLAGS,
            extra_ldflags=["-fopenmp"],  # at::parallel_for is OpenMP in these builds: without it one thread
            build_directory=str(directory),
        )
    except Exception as error:  # no compiler / ninja, or a build failure: the kernel is not offered
        reason = f"{type(error).__name__}: {error}".strip()[:400]
        log.warning("engine kernel 'streamed' unavailable here: %s", reason)
        return reason
    torch.library.register_fake("decodebench::streamed_linear")(_shape)
    torch.library.register_fake("decodebench::decode_layer")(_layer_shape)
    return module


def _shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The operator's output for tracing (torch.compile): ``x``'s shape with ``weight``'s out features."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _layer_shape(hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The fused decoder layer's output for tracing: the hidden states' shape."""
    return torch.empty_like(hidden)


def unavailable_reason() -> str | None:
    """Why ``streamed`` cannot run here (None when it can); builds it on first call."""
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine() not in ("x86_64", "AMD64") or capability not in ("AVX2", "AVX512"):
        return f"needs an x86-64 CPU with AVX2 or AVX-512 (this one: {platform.machine()}, {capability})"
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def streamed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for fp32 CPU tensors, computed by the streamed kernel.

    Raises:
        RuntimeError: the kernel cannot be built here (:func:`unavailable_reason`).
    """
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(f"the streamed linear kernel is unavailable here: {loaded}")
    return torch.ops.decodebench.streamed_linear(x, weight, bias)
