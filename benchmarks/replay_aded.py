"""Choose ADED's CPU settings by replaying AR outputs through its drafter, costed with a latency curve.

ADED's drafts depend only on the context (tri-gram matrix reinforced with the context, MCTS over
it), never on the target's logits, so greedy acceptance can be computed offline from the AR
outputs: at each step, draft a tree from the context and accept its longest path that matches the
true continuation. Every step is priced with the verify-latency curve T(k)/T(1)
(``decodebench-profile``; k = 1 + draft tree nodes) plus the drafter's own measured time
(MCTS in Python), in units of T(1). The matrix is kept across prompts in record order
(``state: per_task``), like the harness does.

Usage: python benchmarks/replay_aded.py RUN_DIR --curve CURVE.json [--backend eager]
       [--grid "mcts_iterations=150,50;max_draft_tokens=64,8"]
RUN_DIR is a run with AR baseline records (turn-0 prompts are re-encoded from the task).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import yaml
from replay_common import ar_cases

from decodebench.config import MethodConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.budget import block_cost
from decodebench.methods import build_method
from decodebench.models.loading import load_model, load_model_config

ADED = dict(name="aded", impl="decodebench.methods.aded:AdedDrafter")


def accepted_length(tokens: list[int], parents: list[int], truth: list[int]) -> int:
    """Longest root path of the draft tree (parents first, -1 = root) matching ``truth``."""
    node, depth = -1, 0
    while depth < len(truth):
        node = next((i for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == truth[depth]), None)
        if node is None:
            break
        depth += 1
    return depth


def replay(cases, params: dict, backbone: Backbone, cache_dir: str, curve: dict, t1: float) -> dict:
    drafter = build_method(MethodConfig(**ADED, params=params))
    drafter.setup(backbone, cache_dir)
    steps = drafted_steps = accepted = 0
    verify_cost = draft_s = 0.0
    emitted = 0
    for prompt, output in cases:
        drafter.begin(prompt)
        position = 1  # the prefill emitted output[0]
        while position < len(output):
            started = time.perf_counter()
            proposal = drafter.propose(prompt + output[:position], len(output) - position - 1)
            draft_s += time.perf_counter() - started
            tokens = list(proposal.tokens or [])
            parents = list(proposal.parents) if proposal.parents is not None else list(range(-1, len(tokens) - 1))
            n = accepted_length(tokens, parents, output[position:]) if tokens else 0
            verify_cost += block_cost(curve, 1 + len(tokens))
            steps += 1
            drafted_steps += bool(tokens)
            accepted += n
            position += n + 1
        emitted += len(output) - 1
        drafter.finish()
    total = verify_cost + draft_s / t1
    return dict(
        tau=emitted / steps,
        drafted_steps=drafted_steps / steps,
        verify=verify_cost / emitted,
        draft=draft_s / t1 / emitted,
        speedup=emitted / total,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--curve", type=Path, required=True, help="decodebench-profile JSON (a curve or --out file)")
    parser.add_argument("--backend", default="eager", help="which curve of an --out file")
    parser.add_argument(
        "--grid",
        default="mcts_iterations=150;max_draft_tokens=64,32,16,8,4",
        help="param=v1,v2;param=... (cartesian product)",
    )
    args = parser.parse_args()
    data = json.loads(args.curve.read_text())
    curve = (
        data
        if "k" in data
        else next(c for c in data["curves"] if c["backend"] == args.backend)
        if isinstance(data.get("curves"), list)
        else data[args.backend]
    )
    t1 = curve["ms"][curve["k"].index(1)] / 1000.0
    config, cases = ar_cases(args.run_dir)
    model_cfg = load_model_config(config["model"]["name"])
    backbone = Backbone(load_model(model_cfg, cache_dir=config["cache_dir"]).model)
    grid = [
        (key, [yaml.safe_load(v) for v in values.split(",")])
        for key, values in (item.split("=") for item in args.grid.split(";"))
    ]
    print(f"{len(cases)} AR outputs replayed; T(1) = {t1 * 1000:.1f} ms; curve k={curve['k']} ratio={curve['ratio']}")
    print(
        "| "
        + " | ".join(k for k, _ in grid)
        + " | tau | drafting steps | verify cost/token | draft cost/token | predicted speedup |"
    )
    print("|" + "---|" * (len(grid) + 5))
    for values in itertools.product(*(v for _, v in grid)):
        params = dict(zip((k for k, _ in grid), values))
        r = replay(cases, params, backbone, config["cache_dir"], curve, t1)
        print(
            "| " + " | ".join(map(str, values)) + f" | {r['tau']:.2f} | {r['drafted_steps']:.2f} | {r['verify']:.3f} |"
            f" {r['draft']:.3f} | {r['speedup']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
