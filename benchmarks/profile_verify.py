"""Verify-latency curve of the engine on this machine: T(k) / T(1) for a block of k new tokens.

On a CPU this curve, not the drafter, decides whether speculation pays: a draft budget is worth
it only where (expected accepted + 1) / (T(k)/T(1)) > 1. The ``cpu`` presets of the methods are
chosen from this curve.

Usage: python benchmarks/profile_verify.py [--model smollm2-135m] [--context 200] [--ks 1,2,3,4,6,8,12,16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.models.loading import load_model, load_model_config


def measure(backbone: Backbone, context: int, k: int, repeats: int) -> float:
    """Median seconds of one forward of ``k`` chain tokens on top of ``context`` cached tokens."""
    cache = backbone.new_cache(context + k + 8)
    backbone.forward(list(range(100, 100 + context)), cache)
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        backbone.forward(list(range(200, 200 + k)), cache)
        times.append(time.perf_counter() - start)
        cache.crop(context)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--ks", default="1,2,3,4,5,6,8,12,16,32")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    loaded = load_model(load_model_config(args.model), cache_dir=default_cache_dir())
    backbone = Backbone(loaded.model)
    ks = [int(k) for k in args.ks.split(",")]
    base = measure(backbone, args.context, 1, args.repeats)
    print(f"{args.model}, context {args.context}, {torch.get_num_threads()} threads")
    print("| k | ms | T(k)/T(1) |\n|---|---|---|")
    for k in ks:
        seconds = base if k == 1 else measure(backbone, args.context, k, args.repeats)
        print(f"| {k} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
