"""SpS in a batch: the draft model run batched (one forward per draft level for all rows) vs row by
row (one forward per row and draft token, the base class's ``Drafter.propose_rows``), in one process.

Decodes the same batch of B chat prompts (greedy) with each mode, alternating, and prints per mode
the draft time per batch step (Σ over rows of ``StepStats.draft_s``: the draft forwards plus the
drafter's bookkeeping), the draft-model forwards per step, the batch's wall time and its tokens;
the modes must give the same outputs and the same drafts.

Usage: python benchmarks/bench_batch_draft.py [--model qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
       [--batch-size 4] [--max-new-tokens 32] [--gamma 5] [--repeats 1] [--threads 1] [--backend auto]
"""

from __future__ import annotations

import argparse

import torch

from decodebench.config import MethodConfig, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend
from decodebench.engine.decode_loop import DecodeSettings, generate_batch
from decodebench.engine.drafting import Drafter
from decodebench.methods import build_method, method_config
from decodebench.methods.sps import ChainDrafter, SpeculativeSamplingDrafter
from decodebench.models.loading import load_model, load_model_config
from decodebench.tasks.prompts import encode_prompt

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain what a hash map is in two sentences.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a SQL query that counts the orders per customer.",
    "Write a Python class for a stack with push, pop and peek.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a bash one-liner that counts the lines of every .py file in a directory.",
]
ROW_BY_ROW = classmethod(Drafter.propose_rows.__func__)  # the base class's loop: propose() per row
BATCHED = ChainDrafter.__dict__["propose_rows"]  # the batched draft forwards


def backbone_of(name: str, backend: str, cache_dir: str):
    loaded = load_model(load_model_config(name), cache_dir=cache_dir)
    backbone = Backbone(loaded.model)
    info = apply_backend(backbone, backend, model_name=loaded.name, cache_dir=cache_dir)
    return loaded, backbone, info.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--gamma", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="batches per mode (alternating)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = default_cache_dir()

    loaded, target, target_backend = backbone_of(args.model, args.backend, cache_dir)
    _, draft, draft_backend = backbone_of(args.draft, args.backend, cache_dir)
    config = load_model_config(args.model)
    prompts = [
        encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], config.chat_template)
        for text in PROMPTS[: args.batch_size]
    ]
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=[loaded.tokenizer.eos_token_id])
    cache = target.new_cache(512, batch_size=len(prompts))
    print(
        f"target {args.model} ({target_backend}), draft {args.draft} ({draft_backend}), B={len(prompts)}, "
        f"prompts {[len(p) for p in prompts]} tokens, {args.max_new_tokens} new tokens, gamma {args.gamma}, "
        f"{args.threads} thread(s)"
    )

    forwards = [0]
    batched_forward, single_forward = draft.forward_batch, draft.forward

    def counted(function):
        def run(*a, **k):
            forwards[0] += 1
            return function(*a, **k)

        return run

    draft.forward_batch, draft.forward = counted(batched_forward), counted(single_forward)
    results: dict[str, list] = {"row_by_row": [], "batched": []}
    drafts: dict[str, list] = {"row_by_row": [], "batched": []}
    for _ in range(args.repeats):
        for mode, implementation in (("row_by_row", ROW_BY_ROW), ("batched", BATCHED)):
            SpeculativeSamplingDrafter.propose_rows = implementation
            drafter = build_method(
                MethodConfig(name="sps", impl=method_config("sps").impl, params={"num_draft_tokens": args.gamma})
            )
            drafter.attach_draft(draft)
            drafter.setup(target, cache_dir)
            forwards[0] = 0
            out = generate_batch(target, drafter, prompts, settings, cache)
            steps = max(len(o.steps) for o in out.outputs)
            results[mode].append(
                (
                    sum(s.draft_s for o in out.outputs for s in o.steps) / steps,
                    forwards[0] / steps,
                    out.wall_s,
                    sum(len(o.new_ids) for o in out.outputs),
                    steps,
                    sum(s.accepted for o in out.outputs for s in o.steps) / sum(len(o.steps) for o in out.outputs),
                )
            )
            drafts[mode].append([[s.drafted, s.accepted] for o in out.outputs for s in o.steps])
            drafts[mode].append([o.new_ids for o in out.outputs])
    SpeculativeSamplingDrafter.propose_rows = BATCHED
    print(
        "| drafting | draft ms per step | draft forwards per step | batch wall s | tokens | steps | accepted per row-step |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, runs in results.items():
        mean = [sum(values) / len(values) for values in zip(*runs)]
        print(
            f"| {mode} | {mean[0] * 1e3:.0f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.0f} | {mean[4]:.0f} | {mean[5]:.2f} |"
        )
    same = drafts["row_by_row"] == drafts["batched"]
    print(f"same outputs and acceptance in both modes: {same}")
    ratio = sum(r[0] for r in results["row_by_row"]) / sum(r[0] for r in results["batched"])
    print(f"draft time per step, row by row / batched: {ratio:.2f}x")


if __name__ == "__main__":
    main()
