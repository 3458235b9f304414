"""The engine revision stored with every measured curve and kernel table.

A verify-latency curve or a kernel table describes the code that measured it: after a change to the
decode step (a kernel, the fused layers, the cache) a stored one would steer ``auto`` and the CPU
presets by numbers of another engine. Each is stored with :func:`engine_revision`, a hash of the
sources of the step, and a stored one from another revision is measured again instead of read.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: the sources whose code runs in a forward step (their bytes make the revision)
STEP_SOURCES = (
    "architectures.py",
    "backbone.py",
    "backends.py",
    "fused_layers.py",
    "kernels.py",
    "kv_cache.py",
    "streamed.py",
    "streamed_linear.cpp",
    "decode_layer.cpp",
    "simd.h",
)


@functools.cache
def engine_revision() -> str:
    """12 hex digits of the SHA-1 over :data:`STEP_SOURCES` (in that order)."""
    digest = hashlib.sha1()
    for name in STEP_SOURCES:
        digest.update(name.encode())
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:12]
