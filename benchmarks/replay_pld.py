"""Choose PLD's draft budget for this machine by replaying AR outputs against its latency curve.

Greedy decoding is deterministic, so a lossless drafter's acceptance on a prompt can be computed
offline from the AR output: at each step, propose from the context and accept the longest prefix
that matches the true continuation. Pricing every step with the measured verify-latency curve
T(k) (benchmarks/profile_verify.py) predicts each setting's speedup without running the model.

Usage: python benchmarks/replay_pld.py RUN_DIR [--curve $DECODEBENCH_CACHE/profiles/<model>__eager__cpu.json]
RUN_DIR is a run with AR baseline records (turn-0 prompts are re-encoded from the task).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from replay_common import ar_cases

from decodebench.config import MethodConfig
from decodebench.engine.profile import profile_path
from decodebench.methods import build_method

PLD = dict(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter")


def predicted_speedup(cases: list[tuple[list[int], list[int]]], params: dict, cost: dict[int, float]) -> float:
    """Σ AR step cost / Σ PLD step cost over the replayed outputs (prefill left out of both)."""
    drafter = build_method(MethodConfig(**PLD, params=params))
    largest = max(cost)
    ar_total = pld_total = 0.0
    for prompt, output in cases:
        drafter.begin(prompt)
        ar_total += len(output) * cost[1]
        position = 1  # the prefill emitted output[0]
        while position < len(output):
            draft = drafter.propose(prompt + output[:position], len(output) - position - 1).tokens
            accepted = next(
                (i for i, (a, b) in enumerate(zip(draft, output[position:])) if a != b),
                min(len(draft), len(output) - position),
            )
            block = 1 + len(draft)
            pld_total += cost.get(block) or cost[min((k for k in cost if k >= block), default=largest)]
            position += accepted + 1
    return ar_total / pld_total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--curve",
        type=Path,
        default=profile_path("smollm2-135m", "eager"),
        help="decodebench-profile curve (default: the stored eager curve of the embedded model)",
    )
    args = parser.parse_args()
    curve = {int(k): v for k, v in json.loads(args.curve.read_text())["seconds"].items()}
    config, cases = ar_cases(args.run_dir)
    print(f"{len(cases)} AR outputs replayed; predicted speedup over AR (verify cost from {args.curve})")
    budgets = (1, 2, 3, 4, 5, 7, 10)
    print("| min n | max n | " + " | ".join(f"{d} drafts" for d in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for min_n, max_n in itertools.product((1, 2, 3), (3,)):
        cells = [
            predicted_speedup(cases, dict(min_ngram_size=min_n, max_ngram_size=max_n, num_draft_tokens=d), curve)
            for d in budgets
        ]
        print(f"| {min_n} | {max_n} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
