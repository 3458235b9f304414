"""``decodebench-profile``: the verify-latency curve T(k)/T(1) of each engine backend here.

On a CPU this curve, not the drafter, decides whether speculation pays: a draft budget is worth it
only where (expected accepted + 1) / (T(k)/T(1)) > 1. For every backend asked for, the profiler
applies it to the model (compile / pack time reported apart), measures the median time of one
forward of k chain tokens on top of a ``context``-token cache (the k are measured round-robin, so
machine noise hits every k alike), and compares the backend's argmax with eager's on the same
blocks (how often they differ across backends; within one backend lossless methods are exact).

Each curve is stored as ``$DECODEBENCH_CACHE/profiles/<model>__<backend>__cpu__<threads>t.json``
(CPU: the thread count changes the curve's shape) or ``<model>__<backend>__<device type>.json``::

    {"model": str, "backend": str, "device": str, "threads": int, "context": int,
     "k": [...], "ms": [...], "ratio": [...], "measured_by": "decodebench-profile" | "first use",
     "engine_revision": str, ...extras,
     "draft": {"model": str, "ms": float, "cost_ratio": float}}   # models with a draft (--draft)

and read back by :func:`load_latency_curve` (``auto`` backend choice, the CPU presets' budgets).
A curve measured by another engine revision (:mod:`decodebench.engine.revision`: a hash of the
step's sources) is not read. A CPU curve stored before curves were keyed by threads (no ``__<threads>t``) is read when its
``threads`` field matches. A run whose ``cpu`` preset sizes its drafts from the curve and finds
none measures a short one first (:func:`ensure_latency_curve`, called by the runner before timing).

Usage: decodebench-profile [--model smollm2-135m] [--backend all] [--context 175]
       [--ks 1,2,3,4,5,6,8,12,16,32] [--repeats 10] [--threads N] [--draft MODEL|none] [--out extra.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from decodebench.config import ConfigValueError, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import DEFAULT_BUCKETS, apply_backend, backends_for, linears_of, remove_backend
from decodebench.engine.memory import peak_memory
from decodebench.engine.revision import engine_revision
from decodebench.engine.timing import now
from decodebench.registry import DecodeBenchError

log = logging.getLogger("decodebench")

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32)
# The short curve measured on first use (a few seconds): the block sizes the cpu presets choose
# among (k <= 16: longer blocks cost > 1.5 steps on every CPU curve measured so far), few repeats.
FIRST_USE_KS = (1, 2, 3, 4, 6, 8, 12, 16)
FIRST_USE_REPEATS = 5
DEFAULT_CONTEXT = 175
# Curve sanity (a curve that cannot be right is measured again, then refused, never stored):
# a block of k > 1 tokens costs at least this share of one token's step (it does strictly more work);
MIN_BLOCK_RATIO = 0.5
# a smaller block is never this many times slower than a larger one (one k hit by machine noise);
MAX_INVERSION = 1.5
# and the spread of one k's repeats stays below this (median absolute deviation / median).
MAX_RELATIVE_MAD = 0.5
CURVE_ATTEMPTS = 3  # measurements of a curve before it is refused
# Fewer repeats than this per k are not checked (one sample says nothing about noise; tests use 1):
# such a curve is stored with "checked": false.
MIN_CHECKED_REPEATS = 3
BREAKDOWN_REPEATS = 5  # profiled steps per block size in the step breakdown


class CurveRefusedError(DecodeBenchError):
    """A verify-latency curve failed its sanity checks on every attempt (not stored)."""


def curve_problems(samples: dict[int, list[float]]) -> list[str]:
    """Why a measured curve cannot be right (empty when it is plausible).

    Args:
        samples: seconds of every timed repeat per block size k.
    """
    medians = {k: statistics.median(v) for k, v in samples.items() if v}
    ks = sorted(medians)
    problems = []
    if 1 in medians:
        for k in ks:
            if k > 1 and medians[k] < MIN_BLOCK_RATIO * medians[1]:
                problems.append(
                    f"T({k})/T(1) = {medians[k] / medians[1]:.2f} < {MIN_BLOCK_RATIO}: a {k}-token block cannot cost "
                    "less than half of one token's step"
                )
    for smaller, larger in zip(ks, ks[1:]):
        if medians[smaller] > MAX_INVERSION * medians[larger]:
            problems.append(
                f"T({smaller}) = {medians[smaller] * 1e3:.1f} ms is {medians[smaller] / medians[larger]:.1f}x "
                f"T({larger}) = {medians[larger] * 1e3:.1f} ms: one block size far slower than a larger one"
            )
    for k in ks:
        if len(samples[k]) >= 3:
            mad = statistics.median(abs(t - medians[k]) for t in samples[k])
            if mad > MAX_RELATIVE_MAD * medians[k]:
                problems.append(f"k={k}: repeats spread {mad / medians[k]:.0%} around their median (machine too busy)")
    return problems


# A draft model's 1-token step streams its weights as the target's does: its cost ratio is at least
# this share of the parameter ratio (the 0.5B/1.5B pair read 0.003, memory pressure).
DRAFT_MIN_SHARE_OF_PARAMETERS = 0.5


def draft_problem(draft: Backbone, target: Backbone, cost_ratio: float) -> str | None:
    """Why a draft's measured cost ratio T_draft(1)/T_target(1) cannot be right (None when plausible)."""
    parameters = sum(p.numel() for p in draft.model.parameters()) / sum(p.numel() for p in target.model.parameters())
    floor = DRAFT_MIN_SHARE_OF_PARAMETERS * parameters
    if cost_ratio < floor:
        return (
            f"draft cost ratio {cost_ratio:.3f} < {floor:.3f} ({DRAFT_MIN_SHARE_OF_PARAMETERS} x its parameter "
            f"ratio {parameters:.3f}): one of the two steps was not measured in steady state"
        )
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (Linux /proc), else None."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


def profile_path(
    model: str, backend: str, device: str = "cpu", cache_dir: str | None = None, threads: int | None = None
) -> Path:
    """Where the curve of ``model`` / ``backend`` / device type is stored; on a CPU keyed by
    ``threads`` too (default: torch's current intra-op thread count)."""
    kind = torch.device(device).type
    suffix = f"__{threads or torch.get_num_threads()}t" if kind == "cpu" else ""
    return Path(cache_dir or default_cache_dir()) / "profiles" / f"{model}__{backend}__{kind}{suffix}.json"


def _legacy_profile_path(model: str, backend: str, device: str, cache_dir: str | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "profiles" / f"{model}__{backend}__{torch.device(device).type}.json"


def _read_curve(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        curve = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not curve.get("k") or len(curve["k"]) != len(curve.get("ratio", [])):
        return None
    if curve.get("engine_revision") != engine_revision():
        _warn_stale(path, curve.get("engine_revision"))
        return None
    return curve


@functools.cache
def _warn_stale(path: Path, revision: str | None) -> None:
    log.warning(
        "%s was measured by engine revision %s, not this one (%s): not used; it is measured again where needed "
        "(decodebench-profile)",
        path,
        revision or "(none stored)",
        engine_revision(),
    )


def stored_curve_path(
    model: str, backend: str, device: str = "cpu", cache_dir: str | None = None, threads: int | None = None
) -> Path | None:
    """The file :func:`load_latency_curve` reads, or None when no curve is stored."""
    path = profile_path(model, backend, device, cache_dir, threads)
    if _read_curve(path) is not None:
        return path
    legacy = _legacy_profile_path(model, backend, device, cache_dir)
    curve = _read_curve(legacy) if legacy != path else None
    if curve is not None and (
        torch.device(device).type != "cpu" or curve.get("threads") == (threads or torch.get_num_threads())
    ):
        return legacy
    return None


def load_latency_curve(
    model: str, backend: str, device: str = "cpu", cache_dir: str | None = None, threads: int | None = None
) -> dict[str, Any] | None:
    """The stored curve of ``model`` under ``backend`` on this device type (on a CPU: at ``threads``,
    default the current thread count), or None when not profiled."""
    path = stored_curve_path(model, backend, device, cache_dir, threads)
    return None if path is None else _read_curve(path)


def measure(
    backbone: Backbone, context: int, ks: list[int], repeats: int, warmup: int = 2
) -> tuple[dict[int, float], dict[int, torch.Tensor]]:
    """Median seconds of one forward of ``k`` chain tokens on ``context`` cached tokens, and the
    argmax of each block (for cross-backend agreement)."""
    samples, argmax = measure_samples(backbone, context, ks, repeats, warmup)
    return {k: statistics.median(values) if values else float("nan") for k, values in samples.items()}, argmax


def measure_checked(
    backbone: Backbone, context: int, ks: list[int], repeats: int, warmup: int = 2
) -> tuple[dict[int, float], dict[int, torch.Tensor], int]:
    """:func:`measure`, repeated while :func:`curve_problems` finds the curve implausible (up to
    ``CURVE_ATTEMPTS``); returns the medians, the argmax and the attempts it took.

    Raises:
        CurveRefusedError: still implausible after the last attempt (the message says why).
    """
    problems: list[str] = []
    for attempt in range(1, CURVE_ATTEMPTS + 1):
        samples, argmax = measure_samples(backbone, context, ks, repeats, warmup)
        problems = curve_problems(samples) if repeats >= MIN_CHECKED_REPEATS else []
        if not problems:
            return {k: statistics.median(v) if v else float("nan") for k, v in samples.items()}, argmax, attempt
        log.warning(
            "verify-latency curve attempt %d/%d is implausible: %s", attempt, CURVE_ATTEMPTS, "; ".join(problems)
        )
    raise CurveRefusedError(
        f"verify-latency curve of {getattr(backbone, 'model_name', None)} on {backbone.backend} refused after "
        f"{CURVE_ATTEMPTS} attempts (not stored): {'; '.join(problems)}. Measure it again on a quieter machine "
        "(decodebench-profile)"
    )


def measure_samples(
    backbone: Backbone, context: int, ks: list[int], repeats: int, warmup: int = 2
) -> tuple[dict[int, list[float]], dict[int, torch.Tensor]]:
    """Seconds of every timed forward of ``k`` chain tokens (k measured round-robin) and the argmax
    of each block."""
    vocab = backbone.config.vocab_size
    prefix = [(100 + 37 * i) % vocab for i in range(context)]
    cache = backbone.new_cache(context + max(ks) + 64)
    backbone.forward(prefix, cache, logits_rows=slice(-1, None))
    times: dict[int, list[float]] = {k: [] for k in ks}
    argmax: dict[int, torch.Tensor] = {}
    for repeat in range(repeats + warmup):
        for k in ks:
            block = [(200 + 13 * i) % vocab for i in range(k)]
            start = now(backbone.device)  # synchronised on CUDA, like the decode loop's timers
            out = backbone.forward(block, cache)
            if repeat >= warmup:
                times[k].append(now(backbone.device) - start)
            argmax[k] = out.logits.argmax(-1).cpu()
            cache.crop(context)
    return times, argmax


# Top-level profiler events of a decode step, by where the time goes (the step breakdown).
LINEAR_OPS = (
    "aten::linear",
    "aten::matmul",
    "aten::mm",
    "aten::addmm",
    "mkl::_mkl_linear",
    "mkldnn::_linear_pointwise",
    "decodebench::streamed_linear",
)
ATTENTION_OPS = ("scaled_dot_product", "aten::softmax", "aten::_softmax", "aten::bmm", "aten::baddbmm")
NATIVE_LAYER_OPS = ("decodebench::decode_layer",)  # a whole decoder layer in C++ (engine/decode_layer.cpp)
LM_HEAD_LABEL = "decodebench::lm_head"
CACHE_WRITE_LABEL = "decodebench::cache_write"
BREAKDOWN_PARTS = (
    "native_layers",
    "decoder_linears",
    "lm_head",
    "attention",
    "cache_writes",
    "other_ops",
    "python_dispatch",
)


@dataclass
class StepBreakdown:
    """Where one forward of ``k`` tokens spends its time (ms per step).

    ``wall_ms`` is the median unprofiled step; the op categories come from ``torch.profiler`` over
    ``BREAKDOWN_REPEATS`` steps (top-level ops, children included): ``native_layers`` (decoder
    layers run whole by the C++ ``decode_layer`` operator: their linears, attention and cache writes
    included), ``decoder_linears`` (every linear of the decoder layers run op by op), ``lm_head`` (the vocabulary projection of the rows asked for),
    ``attention`` (sdpa / softmax / bmm), ``cache_writes`` (:class:`KVCache` updates),
    ``other_ops`` (embedding, norms, rotary, residual adds, masks); ``python_dispatch`` = wall minus
    all ops: the Python of the loop and HF's modules and the dispatcher between ops. ``weights_gbps``
    is the fp32 weight bytes read per step over the wall time (the memory-bandwidth bound).
    """

    k: int
    wall_ms: float
    parts_ms: dict[str, float] = field(default_factory=dict)
    ops_per_step: int = 0
    weights_gbps: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classify(event) -> str:
    if event.name in NATIVE_LAYER_OPS:
        return "native_layers"
    if event.name == LM_HEAD_LABEL:
        return "lm_head"
    if event.name == CACHE_WRITE_LABEL:
        return "cache_writes"
    if any(name in event.name for name in ATTENTION_OPS):
        return "attention"
    if event.name in LINEAR_OPS:
        return "decoder_linears"
    return "other_ops"


def step_breakdown(backbone: Backbone, context: int, k: int, repeats: int = BREAKDOWN_REPEATS) -> StepBreakdown:
    """Profile forwards of ``k`` chain tokens on ``context`` cached tokens (the backend in use)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    vocab = backbone.config.vocab_size
    cache = backbone.new_cache(context + k + 64)
    backbone.forward([(100 + 37 * i) % vocab for i in range(context)], cache, logits_rows=slice(-1, None))
    block = [(200 + 13 * i) % vocab for i in range(k)]
    walls = []
    for repeat in range(repeats + 1):
        start = now(backbone.device)
        backbone.forward(block, cache)
        if repeat:
            walls.append(now(backbone.device) - start)
        cache.crop(context)
    # label the LM head and the cache writes (instance attributes shadow the methods, removed after)
    head, update = backbone.head, cache.update

    def labelled_head(hidden):
        with record_function(LM_HEAD_LABEL):
            return head(hidden)

    def labelled_update(*args, **kwargs):
        with record_function(CACHE_WRITE_LABEL):
            return update(*args, **kwargs)

    # a compiled step traces the head into its graph: patching it would recompile inside the
    # profile (its fused kernels are not attributable to these parts anyway: they land in other_ops)
    if backbone.fast_forward is None:
        backbone.head, cache.update = labelled_head, labelled_update
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                backbone.forward(block, cache)
                cache.crop(context)
    finally:
        backbone.__dict__.pop("head", None)
        cache.__dict__.pop("update", None)
    parts = dict.fromkeys(BREAKDOWN_PARTS, 0.0)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    for event in top_level:
        parts[_classify(event)] += event.cpu_time_total / 1e3 / repeats
    wall_ms = statistics.median(walls) * 1e3
    parts["python_dispatch"] = max(0.0, wall_ms - sum(parts.values()))
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears_of(backbone))
    return StepBreakdown(
        k=k,
        wall_ms=round(wall_ms, 3),
        parts_ms={name: round(value, 3) for name, value in parts.items()},
        ops_per_step=round(sum(1 for e in prof.events() if e.cpu_parent is None) / repeats),
        weights_gbps=round(weight_bytes / (wall_ms / 1e3) / 1e9, 2),
    )


def breakdown_table(rows: list[tuple[str, StepBreakdown]]) -> str:
    """Markdown: one row per (backend, k), each part in ms and its share of the step."""
    lines = [
        "| backend | k | step ms | " + " | ".join(BREAKDOWN_PARTS) + " | top-level ops | weights GB/s |",
        "|---|---|---|" + "---|" * len(BREAKDOWN_PARTS) + "---|---|",
    ]
    for backend, row in rows:
        cells = [f"{row.parts_ms[p]:.1f} ({row.parts_ms[p] / row.wall_ms:.0%})" for p in BREAKDOWN_PARTS]
        lines.append(
            f"| {backend} | {row.k} | {row.wall_ms:.1f} | "
            + " | ".join(cells)
            + f" | {row.ops_per_step} | {row.weights_gbps:.1f} |"
        )
    return "\n".join(lines)


def kernel_table_text(kernels: dict) -> str:
    """Markdown: µs of one pass over every linear weight, per row bucket and kernel (tuned's choice bold)."""
    names = sorted({name for by_kernel in kernels["us"].values() for name in by_kernel})
    lines = ["| rows <= | " + " | ".join(names) + " | chosen |", "|---|" + "---|" * (len(names) + 1)]
    for bucket in kernels["buckets"]:
        timed = kernels["us"][str(bucket)]
        chosen = kernels["choice"][str(bucket)]
        cells = [f"**{timed[n] / 1e3:.1f} ms**" if n == chosen else f"{timed[n] / 1e3:.1f} ms" for n in names]
        lines.append(f"| {bucket} | " + " | ".join(cells) + f" | {chosen} |")
    return "\n".join(lines)


def profile_backend(
    backbone: Backbone,
    backend: str,
    *,
    model: str,
    context: int,
    ks: list[int],
    repeats: int,
    buckets=DEFAULT_BUCKETS,
    cache_dir: str | None = None,
    reference_argmax: dict[int, torch.Tensor] | None = None,
    breakdown_ks: list[int] = (),
) -> tuple[dict, dict]:
    """Apply ``backend``, measure its curve (and the :func:`step_breakdown` of each of
    ``breakdown_ks``, stored as ``breakdown``); returns (curve dict as stored, argmax per k).

    Raises:
        ConfigValueError: the backend does not fit in the memory available (its weight copies).
        CurveRefusedError: the curve stayed implausible (:func:`measure_checked`).
    """
    info = apply_backend(backbone, backend, buckets=buckets, model_name=model, cache_dir=cache_dir)
    seconds, argmax, attempts = measure_checked(backbone, context, ks, repeats)
    curve: dict[str, Any] = {
        "model": model,
        "backend": info.name,
        "device": backbone.device.type,
        "threads": torch.get_num_threads(),
        "context": context,
        "k": ks,
        "ms": [round(seconds[k] * 1e3, 3) for k in ks],
        "ratio": [round(seconds[k] / seconds[ks[0]], 4) for k in ks],
        "seconds": {str(k): seconds[k] for k in ks},  # benchmarks/replay_pld.py reads this
        "setup_s": info.setup_s,
        "buckets": info.buckets,
        "max_abs_logit_diff_vs_eager": info.max_abs_logit_diff,
        "repeats": repeats,
        "attempts": attempts,
        "checked": repeats >= MIN_CHECKED_REPEATS,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "measured_by": "decodebench-profile",
        "engine_revision": engine_revision(),
        # memory cost: the backend's weight copies, and this process's RSS with them in place
        "extra_weight_bytes": info.extra_weight_bytes,
        "rss_bytes": rss_bytes(),
        "peak_rss_bytes": peak_memory("cpu")["peak_rss_bytes"],
    }
    if info.kernels is not None:
        curve["kernels"] = info.kernels
    if breakdown_ks:
        curve["breakdown"] = [step_breakdown(backbone, context, k).to_dict() for k in breakdown_ks]
    if reference_argmax is not None:
        rows = sum(reference_argmax[k].numel() for k in ks)
        differ = sum(int((argmax[k] != reference_argmax[k]).sum()) for k in ks)
        curve["argmax_rows"], curve["argmax_differs_vs_eager"] = rows, differ / rows
    remove_backend(backbone)
    return curve, argmax


@dataclass
class CurveProvision:
    """Where a run's verify-latency curve came from (the manifest's ``latency_curve``)."""

    path: str
    measured_now: bool  # False: it was stored already
    threads: int
    ks: list[int]
    repeats: int
    measure_s: float = 0.0  # time spent measuring it now (target curve + draft step)
    draft_model: str | None = None  # the draft whose 1-token step the curve also holds

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_latency_curve(
    backbone: Backbone,
    cache_dir: str | None,
    draft: Backbone | None = None,
    ks: tuple[int, ...] = FIRST_USE_KS,
    repeats: int = FIRST_USE_REPEATS,
    context: int = DEFAULT_CONTEXT,
) -> CurveProvision | None:
    """The stored curve of ``backbone``'s model / backend / device / threads, measured now when none
    is stored (short: ``ks``, ``repeats``) and stored where ``decodebench-profile`` stores curves.

    With ``draft`` (a draft model's backbone, for SpS-style presets) the curve must also hold that
    draft's 1-token step time (``draft.cost_ratio``); it is measured and added when missing.
    Call it after the backend is applied and before anything is timed. None when the backbone
    carries no model name (no place to store a curve).
    """
    model = getattr(backbone, "model_name", None)
    if not model:
        return None
    threads = torch.get_num_threads()
    draft_name = getattr(draft, "model_name", None) if draft is not None else None
    device = backbone.device.type
    stored_at = stored_curve_path(model, backbone.backend, device, cache_dir)
    curve = None if stored_at is None else _read_curve(stored_at)
    needs_draft = draft_name is not None and (curve or {}).get("draft", {}).get("model") != draft_name
    if curve is not None and not needs_draft:
        return CurveProvision(
            str(stored_at),
            False,
            curve.get("threads", threads),
            list(curve["k"]),
            curve.get("repeats", 0),
            draft_model=(curve.get("draft") or {}).get("model"),
        )
    started = time.perf_counter()
    if curve is None:
        log.info(
            "no stored verify-latency curve for %s on %s/%s at %d threads: measuring one now "
            "(k = %s, median of %d, %d-token context)",
            model,
            backbone.backend,
            device,
            threads,
            ",".join(map(str, ks)),
            repeats,
            context,
        )
        seconds, _, attempts = measure_checked(backbone, context, list(ks), repeats, warmup=1)
        curve = {
            "model": model,
            "backend": backbone.backend,
            "device": device,
            "threads": threads,
            "context": context,
            "k": list(ks),
            "ms": [round(seconds[k] * 1e3, 3) for k in ks],
            "ratio": [round(seconds[k] / seconds[ks[0]], 4) for k in ks],
            "seconds": {str(k): seconds[k] for k in ks},
            "repeats": repeats,
            "attempts": attempts,
            "checked": repeats >= MIN_CHECKED_REPEATS,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "measured_by": "first use",
            "engine_revision": engine_revision(),
        }
    if needs_draft:
        log.info("verify-latency curve of %s lacks draft %s: timing its 1-token step", model, draft_name)
        for attempt in range(1, CURVE_ATTEMPTS + 1):
            # the target's step is timed again beside the draft's on every attempt: one slow target
            # timing (machine load) must not make every draft attempt look implausibly cheap
            target_seconds, _ = measure(backbone, context, [1], repeats, warmup=1)
            draft_seconds, _ = measure(draft, context, [1], repeats, warmup=1)
            target_ms, draft_ms = target_seconds[1] * 1e3, draft_seconds[1] * 1e3
            problem = draft_problem(draft, backbone, draft_ms / target_ms) if repeats >= MIN_CHECKED_REPEATS else None
            if problem is None:
                break
            log.warning("draft step attempt %d/%d is implausible: %s", attempt, CURVE_ATTEMPTS, problem)
        else:
            raise CurveRefusedError(f"draft {draft_name} of {model} refused (not stored): {problem}")
        curve["draft"] = {
            "model": draft_name,
            "ms": round(draft_ms, 3),
            "cost_ratio": round(draft_ms / target_ms, 4),
        }
    measure_s = round(time.perf_counter() - started, 3)
    path = profile_path(model, backbone.backend, device, cache_dir, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(curve, indent=2))
    log.info(
        "stored %s (%.1f s): T(k)/T(1) = %s%s",
        path,
        measure_s,
        ", ".join(f"{r:.2f} (k={k})" for k, r in zip(curve["k"][1:], curve["ratio"][1:])),
        f"; draft cost ratio {curve['draft']['cost_ratio']:.3f}" if "draft" in curve else "",
    )
    return CurveProvision(
        str(path),
        True,
        threads,
        list(curve["k"]),
        curve.get("repeats", repeats),
        measure_s,
        (curve.get("draft") or {}).get("model"),
    )


def loaded_draft_name(model: str, cache_dir: str) -> str | None:
    """The model config's ``draft`` when it is ready to load offline (prepared embedded models;
    hub models always count), else None."""
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model_config

    name = load_model_config(model).draft
    if not name:
        return None
    cfg = load_model_config(name)
    ready = cfg.source != "embedded" or read_prepared_marker(embedded_model_dir(cfg, cache_dir))
    return name if ready else None


def main(argv: list[str] | None = None) -> None:
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.runners.manifest import hardware

    parser = argparse.ArgumentParser(
        prog="decodebench-profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--backend", default="all", help="all | auto | eager | packed | onednn | compiled (comma list ok)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context", type=int, default=175)
    parser.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)))
    parser.add_argument("--buckets", default=",".join(map(str, DEFAULT_BUCKETS)), help="engine.buckets")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="DecodeBench cache (default $DECODEBENCH_CACHE)")
    parser.add_argument(
        "--draft",
        default=None,
        help="also time this draft model's 1-token step (default: the model config's draft, if "
        "prepared; 'none' skips): stored as draft.cost_ratio = T_draft(1) / T_target(1)",
    )
    parser.add_argument(
        "--breakdown-ks", default="1,8", help="block sizes whose step time is broken down per backend ('' = none)"
    )
    parser.add_argument("--no-store", action="store_true", help="print only; do not store the curves")
    parser.add_argument("--out", default=None, help="also write all curves to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_dir = args.cache_dir or default_cache_dir()
    ks = sorted({1, *(int(k) for k in args.ks.split(","))})
    buckets = tuple(int(b) for b in args.buckets.split(","))
    names = backends_for(args.device) if args.backend == "all" else args.backend.split(",")

    loaded = load_model(load_model_config(args.model), device=args.device, cache_dir=cache_dir)
    backbone = Backbone(loaded.model)
    reference = None
    if names != ["eager"]:
        _, reference = measure(backbone, args.context, ks, repeats=0, warmup=1)
    draft_name = args.draft if args.draft is not None else loaded_draft_name(args.model, cache_dir)
    draft = None
    if draft_name and draft_name != "none":
        draft = Backbone(load_model(load_model_config(draft_name), device=args.device, cache_dir=cache_dir).model)
    breakdown_ks = [int(k) for k in args.breakdown_ks.split(",") if k.strip()]
    curves = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            curve, _ = profile_backend(
                backbone,
                name,
                model=args.model,
                context=args.context,
                ks=ks,
                repeats=args.repeats,
                buckets=buckets,
                cache_dir=cache_dir,
                reference_argmax=reference,
                breakdown_ks=breakdown_ks,
            )
        except (ConfigValueError, CurveRefusedError) as error:  # does not fit / implausible curve
            remove_backend(backbone)
            skipped[name] = str(error)
            print(f"skipped {name}: {error}")
            continue
        curve["hardware"] = hardware(args.device)
        if draft is not None:
            draft_curve, _ = profile_backend(
                draft,
                name,
                model=draft_name,
                context=args.context,
                ks=[1],
                repeats=args.repeats,
                buckets=buckets,
                cache_dir=cache_dir,
            )
            cost_ratio = round(draft_curve["ms"][0] / curve["ms"][0], 4)
            problem = draft_problem(draft, backbone, cost_ratio) if args.repeats >= MIN_CHECKED_REPEATS else None
            if problem is not None:
                print(f"draft {draft_name} on {name} refused, not stored (measure again): {problem}")
            else:
                curve["draft"] = {"model": draft_name, "ms": draft_curve["ms"][0], "cost_ratio": cost_ratio}
        curves.append(curve)
        if not args.no_store:
            path = profile_path(args.model, curve["backend"], args.device, cache_dir)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(curve, indent=2))
            print(f"stored: {path}")

    print(
        f"\n{args.model} on {args.device}, {torch.get_num_threads()} threads, context {args.context}, "
        f"median of {args.repeats}: ms at k=1 and T(k)/T(1)"
    )
    print(
        "| backend | setup s | weight copies GiB | RSS GiB | argmax differs vs eager | "
        + " | ".join(f"k={k}" for k in ks)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(ks))
    for curve in curves:
        differs = curve.get("argmax_differs_vs_eager")
        cells = [f"{curve['ms'][0]:.1f} ms", *(f"{r:.2f}" for r in curve["ratio"][1:])]
        rss = curve.get("rss_bytes")
        print(
            f"| {curve['backend']} | {curve['setup_s']:.1f} | {curve['extra_weight_bytes'] / 2**30:.2f} | "
            f"{'-' if rss is None else f'{rss / 2**30:.2f}'} | "
            f"{'-' if differs is None else f'{differs:.2%}'} | " + " | ".join(cells) + " |"
        )
    for name, why in skipped.items():
        print(f"| {name} | skipped: {why} |")
    breakdowns = [(c["backend"], StepBreakdown(**row)) for c in curves for row in c.get("breakdown", [])]
    if breakdowns:
        print("\nwhere a step's time goes (ms per step and share; profiler, top-level ops):")
        print(breakdown_table(breakdowns))
    for curve in curves:
        if "kernels" in curve:
            print(f"\n{curve['backend']}: linear kernels per block size (one pass over every linear weight):")
            print(kernel_table_text(curve["kernels"]))
    for curve in curves:
        if "draft" in curve:
            print(
                f"draft {curve['draft']['model']} ({curve['backend']}): {curve['draft']['ms']:.1f} ms per 1-token "
                f"step, cost ratio T_draft(1)/T_target(1) = {curve['draft']['cost_ratio']:.3f}"
            )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(curves[0] if len(curves) == 1 else {"curves": curves}, indent=2))
        print(f"written: {out}")


if __name__ == "__main__":
    main()
