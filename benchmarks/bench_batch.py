"""Batched speculation: every method's speedup vs AR at the SAME batch size, B in {1, 2, 4, 8, 16}.

Runs two Hydra sweeps of the ordinary CLI on the embedded model and a Spec-Bench subset, each cell
in a process of its own (its peak RSS is its own); each cell decodes its batches with the method
and with its in-process AR baseline, so every ratio comes from one process:

  1. ``-m method=<methods> gen.batch_size=<B list>``        — each method's fixed setting (cpu preset);
  2. ``-m method=<smartspec methods> method.preset=smartspec gen.batch_size=<B list>`` — the same
     chain drafters with SmartSpec choosing each step's length (engine/smartspec.py).

With ``--baseline shared`` the cells decode no AR themselves: one ``method=ar`` cell per B in the fixed
sweep is every cell's baseline at that B (``baseline=shared``, paired by :mod:`decodebench.analysis.merge`
on the same prompts, generation settings and node type), which halves the benchmark's time; the
default ``in-process`` keeps each cell's own AR run beside it (drift cancels, twice the time).

Then prints one table (speedup per method × B, tokens/s, per-sequence latency p50/p95, peak RSS,
τ and the T(B, k) cost model's prediction), writes the speedup-vs-batch figure with the crossover
marked, and checks the issue's targets: SmartSpec >= 0.95 × max(AR, its fixed setting) at every
B, PLD >= 1.2 × AR at B = 4.

Every B must be filled: Spec-Bench's ``per_category`` counts its 6 groups, so ``--per-category 1``
gives 6 prompts and B = 8 or 16 would decode batches of 6 (the same work as each other). The default
``--per-category`` is the smallest that fills the largest B (3 for B = 16: 18 prompts); a smaller one
given explicitly is refused (exit 2). The table's ``batch_rows`` shows the rows each sequence's batch
really had (a run's last batch and mt_bench's second turns are smaller).

Usage: python benchmarks/bench_batch.py [--batch-sizes 1,2,4,8,16] [--methods pld,suffix,...]
       [--smartspec pld,suffix] [--per-category N] [--categories ...] [--max-new-tokens 128]
       [--threads 1] [--baseline in-process|shared] [--out results/bench_batch] [override ...]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from decodebench.analysis.frame import load_frame
from decodebench.analysis.throughput import crossover, speedup_vs_batch_figure, throughput_table
from decodebench.config import default_cache_dir
from decodebench.tasks.spec_bench import GROUP_OF_CATEGORY

# every lossless method that runs on the embedded model without a trained drafter or a draft model
# (the trained-drafter methods join with --methods once their checkpoints exist); the slow ones last
DEFAULT_METHODS = "pld,suffix,aggressive,lookahead,lade,token_recycling,rest,sam,stand,aded,del,swift,early_exit_spec"
SMARTSPEC_TOLERANCE = 0.95  # the target: SmartSpec >= 0.95 x the better of AR and the fixed setting
PLD_TARGET = (4, 1.2)  # PLD >= 1.2x AR at B = 4
SHARED_BASELINE_KEY = "bench_batch"  # baseline_key of the method=ar cells with --baseline shared
SPEC_BENCH_GROUPS = 6  # per_category counts these (tasks/spec_bench.py); each holds 80 questions


def groups_of(categories: str | None) -> int:
    """How many Spec-Bench groups ``--categories`` (groups or categories) selects; all 6 without it."""
    if not categories:
        return SPEC_BENCH_GROUPS
    return len({GROUP_OF_CATEGORY.get(name.strip(), name.strip()) for name in categories.split(",")})


def per_category_filling(batch_sizes: list[int], categories: str | None, given: int | None) -> int:
    """``--per-category``: the smallest that gives the largest B a full first batch, or ``given`` when
    that fills it (SystemExit 2 naming the one that would, when it does not)."""
    groups, largest = groups_of(categories), max(batch_sizes)
    needed = math.ceil(largest / groups)
    if given is not None and given * groups < largest:
        print(
            f"bench_batch: error: --batch-sizes up to {largest} needs at least {largest} prompts per batch, and "
            f"--per-category {given} over {groups} Spec-Bench group(s) gives {given * groups}: "
            f"use --per-category {needed} (or leave it out), or drop the batch sizes above {given * groups}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    return needed if given is None else given


def sweep(out: Path, args: argparse.Namespace, methods: str, *overrides: str) -> list[str]:
    """Every (method, B) cell into the Hydra sweep dir ``out``, each in a process of its own: a
    long sweep process keeps the heap of earlier cells resident, so its later cells' peak RSS
    would count them (measured: 18-20 GB for cells that need 2-5 GB alone). A cell that completed
    before is skipped (resume). Returns the cells that failed; the others go on."""
    failed = []
    for method in methods.split(","):
        for batch in args.batch_sizes.split(","):
            command = [
                sys.executable,
                "-m",
                "decodebench.cli",
                "-m",
                f"method={method}",
                *overrides,
                f"gen.batch_size={batch}",
                f"task.per_category={args.per_category}",
                f"gen.max_new_tokens={args.max_new_tokens}",
                f"threads={args.threads}",
                "progress=false",
                f"hydra.sweep.dir={out}",
                "hydra.callbacks.sweep_status.print_report=false",
                *([f"task.categories=[{args.categories}]"] if args.categories else []),
                *([f"data_dir={args.data_dir}"] if args.data_dir else []),
                *args.overrides,
            ]
            print("$", " ".join(command[2:]), flush=True)
            if subprocess.run(command).returncode != 0:
                failed.append(f"{out.name}: method={method} gen.batch_size={batch}")
    return failed


def targets(table: pd.DataFrame) -> list[str]:
    """The issue's targets, one line each, with PASS / FAIL."""
    lines = []
    methods = table[~table["method"].str.endswith(" (baseline)")]
    speedup = methods.pivot_table(index="method", columns="batch_size", values="speedup")
    for label in speedup.index:
        if not label.endswith("[smartspec]"):
            continue
        fixed = label.replace("[smartspec]", "[cpu]")
        for batch, value in speedup.loc[label].items():
            best = max(1.0, speedup.loc[fixed, batch]) if fixed in speedup.index else 1.0
            verdict = "PASS" if value >= SMARTSPEC_TOLERANCE * best else "FAIL"
            lines.append(f"{verdict} {label} B={batch}: {value:.2f}x >= {SMARTSPEC_TOLERANCE} x {best:.2f}")
    batch, wanted = PLD_TARGET
    if "pld[cpu]" in speedup.index and batch in speedup.columns:
        value = speedup.loc["pld[cpu]", batch]
        lines.append(f"{'PASS' if value >= wanted else 'FAIL'} pld[cpu] B={batch}: {value:.2f}x >= {wanted}x")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--smartspec", default="pld,suffix", help="methods also run with method.preset=smartspec")
    parser.add_argument(
        "--per-category", type=int, default=None, help="Spec-Bench questions per group (default: fills the largest B)"
    )
    parser.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories / groups")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--baseline",
        choices=("in-process", "shared"),
        default="in-process",
        help="in-process: each cell decodes its own AR; shared: one method=ar cell per B is every cell's baseline",
    )
    parser.add_argument("overrides", nargs="*", help="more CLI overrides for every cell (e.g. engine.backend=eager)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_batch") / time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args(argv)
    args.per_category = per_category_filling(
        [int(b) for b in args.batch_sizes.split(",")], args.categories, args.per_category
    )

    methods = args.methods
    if args.baseline == "shared":
        methods = f"ar,{methods}"
        args.overrides = ["baseline=shared", f"baseline_key={SHARED_BASELINE_KEY}", *args.overrides]

    start = time.perf_counter()
    failed = sweep(args.out / "fixed", args, methods)
    if args.smartspec:
        failed += sweep(args.out / "smartspec", args, args.smartspec, "method.preset=smartspec")
    frame = load_frame([args.out])
    # the T(B, k) surface SmartSpec measured (or found) for the embedded model, for the cost model
    surfaces = sorted((Path(default_cache_dir()) / "profiles").glob(f"smollm2-135m__*__{args.threads}t__batch.json"))
    surface = json.loads(surfaces[-1].read_text()) if surfaces else None
    table = throughput_table(frame, surface)
    if args.baseline == "shared":  # the method=ar cells are the baseline rows (their own memory, not a consumer's)
        table = table[table["method"] != "ar (baseline)"].replace({"method": {"ar": "ar (baseline)"}})
    print(f"\nbench-batch: {time.perf_counter() - start:.0f} s, out {args.out}\n")
    speedup = table.pivot_table(index="method", columns="batch_size", values="speedup")
    print("Speedup vs AR at the same batch size\n")
    print(speedup.to_markdown(floatfmt=".2f"))
    crossings = {m: crossover(list(r.index), list(r.values)) for m, r in speedup.iterrows()}
    where = [f"{m}: {'-' if c is None else f'B≈{c:.1f}'}" for m, c in crossings.items()]
    print("\ncrossover (speedup falls below 1): " + ", ".join(where))
    print("\n" + table.to_markdown(index=False, floatfmt=".2f"))
    if surface is not None:
        ratios = pd.DataFrame(surface["ratio"], index=surface["batch_sizes"], columns=surface["k"])
        print(f"\nT(B, k) / T(B, 1) ({Path(surfaces[-1]).name}; rows B, columns k)\n")
        print(ratios.to_markdown(floatfmt=".2f"))
    figure = speedup_vs_batch_figure(table, args.out)
    if figure is not None:
        print(f"\nfigure: {figure.png}  ({figure.caption})")
    print("\n" + "\n".join(targets(table)))
    if failed:
        print("\nbench-batch: these cells failed (their status.json says why; rerun the same command to retry them):")
        print("\n".join(f"  {cell}" for cell in failed))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
