"""STAND vs AR on GSM8K with several sampled traces per problem (test-time scaling), through the runner.

A thin wrapper over ``decodebench method=stand task=gsm8k gen.num_samples=N``: the runner decodes
each problem's N traces back to back, its AR baseline and STAND alternating per trace (same prompt,
same temperature, the same RNG stream per trace, derived from the run seed), on one engine in one
process, with the engine backend ``--backend`` installed before anything is timed. This script
prints, from the run's records, STAND's memory per trace, then per method Σ wall (prefill
included), tokens, τ, GSM8K flexible-extraction accuracy (mean over traces, and majority vote
over each problem's traces) and the draft / target-forward shares of the wall time, and the
runner's speedup (Σ AR wall / Σ STAND wall). Lossless under sampling: the same distribution, not
the same tokens. The run directory (``--run-dir``) is a normal one: ``decodebench-report`` reads it.

    python benchmarks/bench_stand.py --problems 3 --samples 4 --max-new-tokens 96 --threads 1
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--problems", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--branching", help="children per node per depth, e.g. 2,1,1 (default: the preset's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto", help="engine.backend: auto | eager | onednn | ...")
    parser.add_argument("--run-dir", help="default: results/bench_stand/<time>")
    args = parser.parse_args()

    from decodebench.config import compose_run_config
    from decodebench.records import problem_of
    from decodebench.runners.local import run

    overrides = [
        f"model={args.model}",
        "method=stand",
        f"method.preset={args.preset}",
        "task=gsm8k",
        f"task.limit={args.problems}",
        f"gen.num_samples={args.samples}",
        f"gen.temperature={args.temperature}",
        f"gen.max_new_tokens={args.max_new_tokens}",
        f"threads={args.threads}",
        f"engine.backend={args.backend}",
        "progress=false",
    ]
    if args.branching:
        overrides.append(f"method.params.branching=[{args.branching}]")
    cfg = compose_run_config(overrides)
    cfg.run_dir = args.run_dir or f"results/bench_stand/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    result = run(cfg)

    for record in (r for r in result.records if r.role == "method" and not r.error):
        print(
            f"{problem_of(record.sample_id)} trace {record.sample_index + 1}: stand steps {len(record.emitted_lengths)}, "
            f"accepted {record.accepted}, memory {record.method_stats['memory_ngrams']:.0f} n-grams"
        )
    summaries = {"ar": result.summary["baseline"], "stand": result.summary}
    for name, role in (("ar", "baseline"), ("stand", "method")):
        records = [r for r in result.records if r.role == role and not r.error]
        wall, forward_s = sum(r.wall_s for r in records), sum(r.forward_s for r in records)
        decode_forwards = sum(r.steps for r in records) - len(records)
        quality = summaries[name]["quality"]
        print(
            f"{name:6s} wall {wall:7.1f} s  tokens {sum(r.new_tokens for r in records):5d}  tau {summaries[name]['tau']:.2f}"
            f"  accuracy {quality['exact_match_flexible']:.2f}"
            f" (maj@{args.samples} {quality.get(f'exact_match_flexible maj@{args.samples}', float('nan')):.2f})"
            f"  draft {sum(r.draft_s for r in records) / wall:.1%}  target forwards {forward_s / wall:.1%} of wall"
            f"  ({1000 * forward_s / max(decode_forwards, 1):.1f} ms each after prefill)"
        )
    print(f"speedup (sum AR wall / sum STAND wall): {result.summary['speedup']:.2f}  (run dir {result.run_dir})")


if __name__ == "__main__":
    main()
