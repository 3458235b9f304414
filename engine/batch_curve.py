"""The verify-latency surface T(B, k): one batched target forward of ``B`` rows × ``k`` chain tokens.

:mod:`decodebench.engine.profile` measures T(k) for one sequence; batched speculation needs the
same per batch size, because batching spends the spare compute speculation lives on: on a GPU
T(1, k) is flat up to large k, T(16, k) is not; on a CPU the curve steepens with B as well. The
cost model (:func:`cost_ratio`) and SmartSpec (:mod:`decodebench.engine.smartspec`) read
``T(B, k) / T(B, 1)``: what a step with ``k - 1`` drafts per row costs relative to a plain batched
AR step.

Stored next to the T(k) curves, as
``$DECODEBENCH_CACHE/profiles/<model>__<backend>__cpu__<threads>t__batch.json`` (device type instead
of threads off the CPU)::

    {"model": str, "backend": str, "device": str, "threads": int, "context": int,
     "batch_sizes": [...], "k": [...], "ms": [[T(B, k) for k] for B], "ratio": [[T(B, k)/T(B, 1)]]}

Measured on first use by :func:`ensure_batch_curve` (a short measurement: few repeats) where no
curve is stored; ``benchmarks/bench_batch.py`` measures one with more repeats.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from decodebench.engine.backbone import Backbone
from decodebench.engine.revision import engine_revision
from decodebench.engine.timing import now

log = logging.getLogger("decodebench")

BATCH_SIZES = (1, 2, 4, 8, 16)
BATCH_KS = (1, 2, 3, 4, 6, 8, 12)
FIRST_USE_REPEATS = 3  # a first-use curve: small, the surface only ranks a few budgets
CONTEXT = 175  # as the T(k) curve (profile.DEFAULT_CONTEXT): a Spec-Bench prompt's typical length


def batch_curve_path(backbone: Backbone, cache_dir: str | None) -> Path | None:
    """Where the T(B, k) surface of ``backbone``'s model and backend is stored (None: unnamed model)."""
    from decodebench.engine.profile import profile_path  # noqa: PLC0415 (profile imports the engine)

    if not getattr(backbone, "model_name", None):
        return None
    path = profile_path(backbone.model_name, backbone.backend, backbone.device.type, cache_dir)
    return path.with_name(path.stem + "__batch.json")


def measure_batch_curve(
    backbone: Backbone,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    ks: tuple[int, ...] = BATCH_KS,
    context: int = CONTEXT,
    repeats: int = FIRST_USE_REPEATS,
    warmup: int = 1,
) -> dict[str, Any]:
    """Median time of one :meth:`Backbone.forward_batch` of ``B`` rows × ``k`` chain tokens on
    ``context`` cached tokens per row, for every (B, k) (k measured round-robin within each B)."""
    vocab = backbone.config.vocab_size
    prefix = [(100 + 37 * i) % vocab for i in range(context)]
    block = [(200 + 13 * i) % vocab for i in range(max(ks))]
    ms: list[list[float]] = []
    for batch in batch_sizes:
        cache = backbone.new_cache(context + max(ks) + 64, batch_size=batch)
        backbone.forward_batch(torch.tensor([prefix] * batch), cache, last_logits_only=True)
        times: dict[int, list[float]] = {k: [] for k in ks}
        for repeat in range(repeats + warmup):
            for k in ks:
                start = now(backbone.device)
                backbone.forward_batch(torch.tensor([block[:k]] * batch), cache)
                if repeat >= warmup:
                    times[k].append(now(backbone.device) - start)
                cache.crop(context)
        ms.append([1000 * statistics.median(times[k]) for k in ks])
    return {
        "model": getattr(backbone, "model_name", None),
        "backend": backbone.backend,
        "device": backbone.device.type,
        "threads": torch.get_num_threads(),
        "context": context,
        "batch_sizes": list(batch_sizes),
        "k": list(ks),
        "ms": ms,
        "ratio": [[t / row[0] for t in row] for row in ms],
        "repeats": repeats,
        "engine_revision": engine_revision(),
    }


def ensure_batch_curve(backbone: Backbone, cache_dir: str | None, max_k: int = max(BATCH_KS)) -> dict[str, Any]:
    """The stored T(B, k) surface of ``backbone`` reaching blocks of ``max_k`` tokens; measured now
    (for the ks of :data:`BATCH_KS` up to ``max_k``; logged, and stored when the model has a catalogue
    name) when none is stored, the stored one stops short of ``max_k``, or another engine revision
    measured it (:mod:`decodebench.engine.revision`: a changed step, e.g. the batched C++ layer, makes
    the old surface wrong)."""
    path = batch_curve_path(backbone, cache_dir)
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        if stored.get("engine_revision") == engine_revision() and max(stored["k"]) >= max_k:
            return stored
    ks = tuple(sorted({*(k for k in BATCH_KS if k < max_k), max_k}))
    log.info(
        "no T(B, k) verify-latency surface stored for %s on %s: measuring one now (B = %s, k = %s, median of %d)",
        getattr(backbone, "model_name", None) or "this model",
        backbone.backend,
        ",".join(map(str, BATCH_SIZES)),
        ",".join(map(str, ks)),
        FIRST_USE_REPEATS,
    )
    curve = measure_batch_curve(backbone, ks=ks)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(curve, indent=1))
        log.info("stored %s", path)
    return curve


def cost_ratio(curve: dict[str, Any], batch: int, k: float) -> float:
    """T(B, k) / T(B, 1) for any batch size and (mean) block length: the measured batch size nearest
    above ``batch`` (the largest measured beyond it), linear in k between measured ks and beyond the last."""
    sizes = curve["batch_sizes"]
    row = next((i for i, b in enumerate(sizes) if b >= batch), len(sizes) - 1)
    points = list(zip(curve["k"], curve["ratio"][row]))
    if k <= points[0][0]:
        return float(points[0][1])
    for (k0, r0), (k1, r1) in zip(points, points[1:]):
        if k <= k1:
            return float(r0 + (r1 - r0) * (k - k0) / (k1 - k0))
    last_k, last_ratio = points[-1]
    return float(last_ratio) * k / last_k
