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
     "k": [...], "ms": [...], "ratio": [...], "measured_by": "decodebench-profile" | "first use", ...extras,
     "draft": {"model": str, "ms": float, "cost_ratio": float}}   # models with a draft (--draft)

and read back by :func:`load_latency_curve` (``auto`` backend choice, the CPU presets' budgets).
A CPU curve stored before curves were keyed by threads (no ``__<threads>t``) is read when its
``threads`` field matches. A run whose ``cpu`` preset sizes its drafts from the curve and finds
none measures a short one first (:func:`ensure_latency_curve`, called by the runner before timing).

Usage: decodebench-profile [--model smollm2-135m] [--backend all] [--context 175]
       [--ks 1,2,3,4,5,6,8,12,16,32] [--repeats 10] [--threads N] [--draft MODEL|none] [--out extra.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import DEFAULT_BUCKETS, apply_backend, backends_for, remove_backend
from decodebench.engine.timing import now

log = logging.getLogger("decodebench")

DEFAULT_KS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32)
# The short curve measured on first use (a few seconds): the block sizes the cpu presets choose
# among (k <= 16: longer blocks cost > 1.5 steps on every CPU curve measured so far), few repeats.
FIRST_USE_KS = (1, 2, 3, 4, 6, 8, 12, 16)
FIRST_USE_REPEATS = 5
DEFAULT_CONTEXT = 175


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
    return curve if curve.get("k") and len(curve["k"]) == len(curve.get("ratio", [])) else None


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
    return {k: statistics.median(values) if values else float("nan") for k, values in times.items()}, argmax


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
) -> tuple[dict, dict]:
    """Apply ``backend``, measure its curve; returns (curve dict as stored, argmax per k)."""
    info = apply_backend(backbone, backend, buckets=buckets, model_name=model, cache_dir=cache_dir)
    seconds, argmax = measure(backbone, context, ks, repeats)
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
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "measured_by": "decodebench-profile",
    }
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
        seconds, _ = measure(backbone, context, list(ks), repeats, warmup=1)
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
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "measured_by": "first use",
        }
    if needs_draft:
        log.info("verify-latency curve of %s lacks draft %s: timing its 1-token step", model, draft_name)
        draft_seconds, _ = measure(draft, context, [1], repeats, warmup=1)
        draft_ms = draft_seconds[1] * 1e3
        curve["draft"] = {
            "model": draft_name,
            "ms": round(draft_ms, 3),
            "cost_ratio": round(draft_ms / curve["ms"][0], 4),
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
    curves = []
    for name in names:
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
        )
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
            curve["draft"] = {
                "model": draft_name,
                "ms": draft_curve["ms"][0],
                "cost_ratio": round(draft_curve["ms"][0] / curve["ms"][0], 4),
            }
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
    print("| backend | setup s | argmax differs vs eager | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|---|---|" + "---|" * len(ks))
    for curve in curves:
        differs = curve.get("argmax_differs_vs_eager")
        cells = [f"{curve['ms'][0]:.1f} ms", *(f"{r:.2f}" for r in curve["ratio"][1:])]
        print(
            f"| {curve['backend']} | {curve['setup_s']:.1f} | "
            f"{'-' if differs is None else f'{differs:.2%}'} | " + " | ".join(cells) + " |"
        )
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
