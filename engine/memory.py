"""Peak memory of a run: the process's peak RSS (CPU) and, on CUDA, the device's peak allocated and
reserved bytes (``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) since the last reset."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def _cuda_device(device: str | torch.device) -> torch.device | None:
    device = torch.device(device)
    return device if device.type == "cuda" else None


def reset_peak_memory(device: str | torch.device) -> None:
    """Start counting the device's peak here (the runner calls it before loading the model)."""
    cuda = _cuda_device(device)
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)


def peak_memory(device: str | torch.device) -> dict[str, Any]:
    """``peak_rss_bytes`` (the process, whole lifetime) and, on CUDA, ``peak_gpu_allocated_bytes`` and
    ``peak_gpu_reserved_bytes`` since :func:`reset_peak_memory` (null elsewhere)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info: dict[str, Any] = {
        "peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024,
        "peak_gpu_allocated_bytes": None,
        "peak_gpu_reserved_bytes": None,
    }
    cuda = _cuda_device(device)
    if cuda is not None:
        info["peak_gpu_allocated_bytes"] = int(torch.cuda.max_memory_allocated(cuda))
        info["peak_gpu_reserved_bytes"] = int(torch.cuda.max_memory_reserved(cuda))
    return info
