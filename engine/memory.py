"""Peak memory of a run: its peak RSS (CPU) and, on CUDA, the device's peak allocated and reserved
bytes (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) since the last reset.

A sweep runs many cells in one process (Hydra's basic launcher), so the process's lifetime peak RSS
(``getrusage``) would give every cell the largest peak of any cell before it. On Linux the run's own
peak is measured instead: :func:`reset_peak_memory` resets the kernel's high-water mark (``5`` into
``/proc/self/clear_refs``, Linux >= 4.0) and :func:`peak_memory` reads it (``VmHWM`` in
``/proc/self/status``). Where that cannot be done, the lifetime peak is reported and
``peak_rss_scope`` says ``process`` instead of ``run``.
"""

from __future__ import annotations

import re
import resource
import sys
from pathlib import Path
from typing import Any

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
_scope = {"rss": "process"}  # "run" once this process's high-water mark has been reset


def _cuda_device(device: str | torch.device) -> torch.device | None:
    device = torch.device(device)
    return device if device.type == "cuda" else None


def _reset_rss_high_water_mark() -> bool:
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _rss_high_water_mark() -> int | None:
    """``VmHWM`` of this process in bytes (None where /proc has none)."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def reset_peak_memory(device: str | torch.device) -> None:
    """Start counting the run's peak here (the runner calls it before loading the model): the RSS
    high-water mark (Linux) and, on CUDA, the device's peak counters."""
    if _reset_rss_high_water_mark() and _rss_high_water_mark() is not None:
        _scope["rss"] = "run"
    cuda = _cuda_device(device)
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)


def peak_memory(device: str | torch.device) -> dict[str, Any]:
    """``peak_rss_bytes`` since :func:`reset_peak_memory` (``peak_rss_scope`` ``run``; ``process``: the
    process's lifetime peak, where the mark cannot be reset) and, on CUDA, ``peak_gpu_allocated_bytes``
    and ``peak_gpu_reserved_bytes`` since the reset (null elsewhere)."""
    rss = _rss_high_water_mark() if _scope["rss"] == "run" else None
    if rss is None:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = lifetime if sys.platform == "darwin" else lifetime * 1024
    info: dict[str, Any] = {
        "peak_rss_bytes": rss,
        "peak_rss_scope": _scope["rss"],
        "peak_gpu_allocated_bytes": None,
        "peak_gpu_reserved_bytes": None,
    }
    cuda = _cuda_device(device)
    if cuda is not None:
        info["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated(cuda))
        info["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved(cuda))
    return info
