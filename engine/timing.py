"""Wall-clock timing that is honest on every device.

``time.perf_counter`` on the CPU; on CUDA the device is synchronised before each reading so a
timed region includes the kernels it launched.
"""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Current time in seconds after all queued work on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter()
