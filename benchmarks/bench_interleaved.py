"""Lossless methods against each other, interleaved per prompt: an A/B that machine drift cannot bias.

The runner decodes one method's prompts, then the next method's (``decodebench -m method=a,b``):
on a shared or throttling machine a method that runs while the CPU is slow looks slower. Here one
process decodes prompt 1 with every method, then prompt 2 with every method, and so on, on one
engine backend; each method's speedup is Σ decode time of the first method (normally ``ar``) over
its own (prefill left out of both: it is the same forward for every method). Greedy: every method's
output is checked token for token against the first method's (a lossless method must agree).

Also printed per method: τ (tokens per target forward), the drafting time per step (propose +
feedback, ``StepStats.draft_s``) and the median forward time per verify-block
size (``size:count x ms``, sizes seen ≥ 5 times): what each block really cost in this decode, at
the contexts the task has, next to the stored latency curve's T(k)/T(1) the ``cpu`` presets read.

A method is ``NAME[@PRESET][:PARAM=VALUE]...`` (default preset ``cpu``; values are Python literals):

    python benchmarks/bench_interleaved.py ar suffix token_recycling sam sam@sam_only:max_verify_cost=1.25 \\
        --per-category 2 --max-new-tokens 128 --threads 2 --backend tuned
"""

from __future__ import annotations

import argparse
import ast
import collections
import statistics
import sys
from dataclasses import dataclass, field


@dataclass
class MethodRow:
    """What one method decoded, summed over the prompts."""

    tokens: int = 0
    steps: int = 0
    decode_s: float = 0.0
    draft_s: float = 0.0  # drafting and feedback (StepStats.draft_s), summed
    forward_s_by_block: dict[int, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


def parse_method(spec: str) -> tuple[str, str, dict]:
    """``NAME[@PRESET][:KEY=VALUE]...`` -> (name, preset, params)."""
    head, *pairs = spec.split(":")
    name, _, preset = head.partition("@")
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bench_interleaved: '{pair}' in '{spec}' is not KEY=VALUE")
        params[key] = ast.literal_eval(value)
    return name, preset or "cpu", params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="+", help="the first one is the reference (normally ar)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=2, help="Spec-Bench questions per group (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--data-dir", default=None, help="default: $DECODEBENCH_DATA or the cache")
    args = parser.parse_args()

    from decodebench.methods import available_methods  # noqa: PLC0415
    from decodebench.registry import unknown_name_message  # noqa: PLC0415

    specs = [parse_method(spec) for spec in args.methods]
    for name, _, _ in specs:
        if name not in available_methods():
            print(f"bench_interleaved: {unknown_name_message('method', name, available_methods())}", file=sys.stderr)
            raise SystemExit(2)

    import torch  # noqa: PLC0415

    from decodebench.config import TaskConfig, default_cache_dir, group_config  # noqa: PLC0415
    from decodebench.engine.backbone import Backbone  # noqa: PLC0415
    from decodebench.engine.backends import apply_backend  # noqa: PLC0415
    from decodebench.engine.decode_loop import DecodeSettings, generate  # noqa: PLC0415
    from decodebench.engine.profile import ensure_latency_curve  # noqa: PLC0415
    from decodebench.engine.sampling import SamplingParams  # noqa: PLC0415
    from decodebench.methods import build_method, method_config  # noqa: PLC0415
    from decodebench.models.loading import load_model, load_model_config  # noqa: PLC0415
    from decodebench.tasks import build_task  # noqa: PLC0415
    from decodebench.tasks.prompts import encode_prompt  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    cache_dir = str(default_cache_dir())
    model_config = load_model_config(args.model)
    loaded = load_model(model_config, cache_dir=cache_dir)
    backbone = Backbone(loaded.model)
    info = apply_backend(backbone, args.backend, model_name=loaded.name, cache_dir=cache_dir)
    ensure_latency_curve(backbone, cache_dir)  # as the runner: the cpu presets size drafts from it
    task = build_task(
        TaskConfig(**{**group_config("task", "spec_bench"), "per_category": args.per_category}),
        args.data_dir,
        cache_dir,
    )
    prompts = [
        encode_prompt(loaded.tokenizer, task.build_messages(sample, 0, []), model_config.chat_template)
        for sample in task.load_samples()
    ]
    drafters = {}
    for spec, (name, preset, params) in zip(args.methods, specs):
        cfg = method_config(name)
        cfg.preset = preset
        cfg.params.update(params)
        cfg.pinned = [*cfg.pinned, *params]
        drafter = build_method(cfg)
        drafter.tokenizer = loaded.tokenizer
        drafter.setup(backbone, cache_dir)
        drafter.reset_state()
        drafters[spec] = drafter

    print(
        f"{loaded.name}, backend {info.name}, {args.threads} threads, {len(prompts)} Spec-Bench prompts x {args.max_new_tokens} tokens"
    )
    eos = () if loaded.tokenizer.eos_token_id is None else (loaded.tokenizer.eos_token_id,)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, sampling=SamplingParams(), eos_token_ids=eos)
    rows = {spec: MethodRow() for spec in drafters}
    for index, prompt in enumerate(prompts):
        reference = None
        for spec, drafter in drafters.items():
            out = generate(backbone, drafter, prompt, settings, backbone.new_cache(16))
            if reference is None:
                reference = out.new_ids
            elif out.new_ids != reference:
                raise SystemExit(f"bench_interleaved: {spec} differs from {args.methods[0]} on prompt {index}")
            row = rows[spec]
            row.tokens += len(out.new_ids)
            row.steps += len(out.steps)
            row.decode_s += out.wall_s - out.prefill_s
            row.draft_s += sum(step.draft_s for step in out.steps)
            for step in out.steps:
                row.forward_s_by_block[step.tree_size].append(step.forward_s)
        print(f"prompt {index + 1}/{len(prompts)} done", file=sys.stderr)

    first = rows[args.methods[0]]
    print("| method | speedup | τ | tokens/s | draft ms/step | forward ms by block size (size:count x ms) |")
    print("|---|---|---|---|---|---|")
    for spec, row in rows.items():
        blocks = " ".join(
            f"{size}:{len(times)}x{1000 * statistics.median(times):.1f}"
            for size, times in sorted(row.forward_s_by_block.items())
            if len(times) >= 5
        )
        print(
            f"| {spec} | {first.decode_s / row.decode_s:.3f} | {row.tokens / row.steps:.2f} | "
            f"{row.tokens / row.decode_s:.1f} | {1000 * row.draft_s / row.steps:.2f} | {blocks} |"
        )


if __name__ == "__main__":
    main()
