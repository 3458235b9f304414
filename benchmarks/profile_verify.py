"""Verify-latency curve of the engine on this machine: T(k) / T(1) for a block of k new tokens.

On a CPU this curve, not the drafter, decides whether speculation pays: a draft budget is worth
it only where (expected accepted + 1) / (T(k)/T(1)) > 1. The ``cpu`` presets of the methods are
chosen from this curve.

Usage: python benchmarks/profile_verify.py [--model smollm2-135m] [--context 200] [--ks 1,2,3,4,6,8,12,16]
       [--out results/benchmarks/verify_curve.json]   (read by benchmarks/replay_pld.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.models.loading import load_model, load_model_config
from decodebench.runners.manifest import hardware


def measure(backbone: Backbone, context: int, ks: list[int], repeats: int) -> dict[int, float]:
    """Median seconds of one forward of ``k`` chain tokens on top of ``context`` cached tokens.

    The block sizes are measured round-robin, so machine noise hits every k alike.
    """
    cache = backbone.new_cache(context + max(ks) + 8)
    backbone.forward(list(range(100, 100 + context)), cache)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for repeat in range(repeats + 2):
        for k in ks:
            start = time.perf_counter()
            backbone.forward(list(range(200, 200 + k)), cache)
            if repeat >= 2:  # the first rounds warm up
                times[k].append(time.perf_counter() - start)
            cache.crop(context)
    return {k: statistics.median(values) for k, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--ks", default="1,2,3,4,5,6,8,12,16,32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="results/benchmarks/verify_curve.json")
    args = parser.parse_args()
    loaded = load_model(load_model_config(args.model), cache_dir=default_cache_dir())
    backbone = Backbone(loaded.model)
    ks = sorted({1, *(int(k) for k in args.ks.split(","))})
    seconds = measure(backbone, args.context, ks, args.repeats)
    print(f"{args.model}, context {args.context}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| k | ms | T(k)/T(1) |\n|---|---|---|")
    for k in ks:
        print(f"| {k} | {seconds[k] * 1e3:.1f} | {seconds[k] / seconds[1]:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "context": args.context, "threads": torch.get_num_threads(),
                               "hardware": hardware("cpu"), "seconds": seconds}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
