"""DecodeBench's methods vs the reference implementations in transformers, same prompts, one process.

Pairs (each DecodeBench contender next to the transformers feature it re-implements):

  embedded model (SmolLM2-135M):
    * ``db:ar``        vs ``hf:ar``       — ``generate`` greedy;
    * ``db:pld_paper`` vs ``hf:pld``      — prompt lookup with the SAME settings
      (``prompt_lookup_num_tokens=10, max_matching_ngram_size=3``), and ``db:pld_cpu`` (the
      hardware-aware preset) against the same ``hf:pld``;
  draft/target pair (Qwen2.5-Coder 0.5B → 1.5B, when ``make models-qwen`` prepared it):
    * ``db:sps_cpu``   vs ``hf:assisted_matched`` — assisted generation with the same fixed γ
      (``num_assistant_tokens=3``, constant schedule, confidence stop off);
    * ``db:sps_adaptive`` vs ``hf:assisted_heuristic`` — both start at γ = 5, +2 / −1 per step;
    * ``db:sps_cpu``   vs ``hf:assisted_default`` — transformers' defaults (20 tokens, confidence
      threshold 0.4), the setting a user gets by passing ``assistant_model=`` alone.

Every contender decodes every prompt in turn (interleaved, after a warm-up) so ratios come from
the same machine state. Greedy outputs are checked: each DecodeBench contender must match its own
AR token for token (lossless), and the table counts outputs that differ from ``hf:ar`` (fp32
rounding in a different kernel order can flip a near-tie argmax; see ``decodebench-profile``).

Harness overhead: each model's ``forward`` (DecodeBench's Backbone, transformers' module) is
timed; ``overhead`` is the share of decode wall time spent OUTSIDE model forwards (drafting,
verification, cache bookkeeping, stop checks, Python). Target < 5 % for ``db:ar``.

Usage: python benchmarks/bench_vs_hf.py [--pair auto|on|off] [--per-category 2] [--max-new-tokens 128]
       [--pair-per-category 1] [--pair-max-new-tokens 64] [--threads 2] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from decodebench.config import MethodConfig, compose_run_config, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.methods import build_method
from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
from decodebench.models.loading import LoadedModel, check_same_tokenizer, load_model, load_model_config
from decodebench.runners.local import eos_token_ids
from decodebench.runners.manifest import hardware, utc_now, versions
from decodebench.tasks import build_task
from decodebench.tasks.prompts import encode_prompt


class ForwardTimer:
    """Accumulates the wall time spent inside ``obj.forward`` (an instance-level wrapper: the
    object's class and every other instance are untouched). CPU ops are synchronous, so
    ``perf_counter`` around the call is the forward's cost; on CUDA the wrapper synchronises."""

    def __init__(self, *objects: object):
        self.seconds = 0.0
        for obj in objects:
            self._wrap(obj)

    def _wrap(self, obj: object) -> None:
        inner = obj.forward

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.seconds += time.perf_counter() - start

        obj.forward = timed


@dataclass
class Contender:
    name: str
    run: Callable[[list[int]], list[int]]
    timer: ForwardTimer
    own_ar: str  # the AR contender this one must reproduce token for token
    tokens: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    differ_from_own_ar: int = 0
    differ_from_hf_ar: int = 0
    outputs: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tokens_per_s": self.tokens / self.seconds,
            "overhead_share": 1.0 - self.forward_seconds / self.seconds,
            "differ_from_own_ar": self.differ_from_own_ar,
            "differ_from_hf_ar": self.differ_from_hf_ar,
        }


def spec_bench_prompts(model: LoadedModel, model_name: str, per_category: int) -> list[list[int]]:
    cfg = compose_run_config([f"model={model_name}", "task=spec_bench", f"task.per_category={per_category}"])
    task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    return [
        encode_prompt(model.tokenizer, task.build_messages(s, 0, []), cfg.model.chat_template)
        for s in task.load_samples()
    ]


def hf_contender(
    name: str, model: LoadedModel, max_new_tokens: int, assistant: LoadedModel | None = None, **generate_kwargs
) -> Contender:
    eos = eos_token_ids(model)
    timer = ForwardTimer(model.model, *([assistant.model] if assistant else []))

    def run(prompt: list[int]) -> list[int]:
        with torch.inference_mode():
            ids = torch.tensor([prompt], device=model.model.device)
            out = model.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos[0],
                **({"assistant_model": assistant.model} if assistant else {}),
                **generate_kwargs,
            )
        return out[0, len(prompt) :].tolist()

    return Contender(name, run, timer, own_ar="hf:ar")


def db_contender(
    name: str,
    backbone: Backbone,
    model: LoadedModel,
    method: MethodConfig,
    max_new_tokens: int,
    cache_dir: str,
    draft: Backbone | None = None,
) -> Contender:
    drafter = build_method(method)
    if draft is not None:
        drafter.attach_draft(draft)
    drafter.setup(backbone, cache_dir)
    cache = backbone.new_cache(2048)
    settings = DecodeSettings(max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids(model))
    timer = ForwardTimer(backbone, *([draft] if draft is not None else []))
    return Contender(
        name, lambda prompt: generate(backbone, drafter, prompt, settings, cache).new_ids, timer, own_ar="db:ar"
    )


def engine_backbone(model: LoadedModel, backend: str, model_name: str, cache_dir: str) -> tuple[Backbone, dict]:
    backbone = Backbone(model.model)
    info = apply_backend(backbone, backend, model_name=model_name, cache_dir=cache_dir)
    return backbone, info.to_dict()


def measure(contenders: list[Contender], prompts: list[list[int]], label: str) -> None:
    """Interleaved: every prompt is decoded by every contender before the next prompt."""
    for contender in contenders:  # warm-up (allocations, lazy init, kernel selection)
        contender.run(prompts[0][:48])
    for contender in contenders:
        contender.timer.seconds = 0.0
    by_name = {c.name: c for c in contenders}
    for prompt in tqdm(prompts, desc=label):
        for contender in contenders:
            before = contender.timer.seconds
            start = time.perf_counter()
            ids = contender.run(prompt)
            contender.seconds += time.perf_counter() - start
            contender.forward_seconds += contender.timer.seconds - before
            contender.tokens += len(ids)
            contender.outputs.append(ids)
        for contender in contenders:
            ids = contender.outputs[-1]
            contender.differ_from_own_ar += ids != by_name[contender.own_ar].outputs[-1]
            contender.differ_from_hf_ar += ids != by_name["hf:ar"].outputs[-1]


def print_section(title: str, contenders: list[Contender], pairs: list[tuple[str, str]]) -> dict:
    print(f"\n### {title}\n")
    print(
        "| contender | tokens | seconds | tokens/s | overhead (outside forwards) | != own AR (lossless: 0) | != hf:ar |"
    )
    print("|---|---|---|---|---|---|---|")
    for c in contenders:
        s = c.summary()
        print(
            f"| {c.name} | {s['tokens']} | {s['seconds']:.1f} | {s['tokens_per_s']:.2f} | "
            f"{100 * s['overhead_share']:.1f} % | {s['differ_from_own_ar']} | {s['differ_from_hf_ar']} |"
        )
    tps = {c.name: c.tokens / c.seconds for c in contenders}
    ratios = {f"{a} / {b}": tps[a] / tps[b] for a, b in pairs}
    print("\n| ratio (tokens/s) | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")
    return {"contenders": {c.name: c.summary() for c in contenders}, "ratios": ratios}


def embedded_section(args, results: dict) -> None:
    cfg = compose_run_config([f"model={args.model}", "method=pld"])
    hf_model = load_model(cfg.model, cache_dir=cfg.cache_dir)
    db_model = load_model(cfg.model, cache_dir=cfg.cache_dir)  # own copy: packing swaps its modules
    backbone, engine = engine_backbone(db_model, args.backend, cfg.model.name, cfg.cache_dir)
    prompts = spec_bench_prompts(hf_model, args.model, args.per_category)[: args.limit]
    n = args.max_new_tokens
    contenders = [
        hf_contender("hf:ar", hf_model, n),
        hf_contender("hf:pld", hf_model, n, prompt_lookup_num_tokens=10, max_matching_ngram_size=3),
        db_contender("db:ar", backbone, db_model, MethodConfig(name="ar"), n, cfg.cache_dir),
        db_contender("db:pld_paper", backbone, db_model, replace(cfg.method, preset="paper"), n, cfg.cache_dir),
        db_contender("db:pld_cpu", backbone, db_model, replace(cfg.method, preset="cpu"), n, cfg.cache_dir),
    ]
    measure(contenders, prompts, args.model)
    title = f"{args.model}: {len(prompts)} Spec-Bench prompts x {n} new tokens, engine {engine['name']}"
    section = print_section(
        title,
        contenders,
        [
            ("db:ar", "hf:ar"),
            ("db:pld_paper", "hf:pld"),
            ("db:pld_cpu", "hf:pld"),
            ("hf:pld", "hf:ar"),
            ("db:pld_cpu", "db:ar"),
        ],
    )
    results["embedded"] = {
        "model": args.model,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "engine": engine,
        **section,
    }


def pair_section(args, results: dict) -> None:
    target_cfg, draft_cfg = load_model_config(args.target), load_model_config(args.draft)
    cfg = compose_run_config([f"model={args.target}", "method=sps"])
    target = load_model(target_cfg, cache_dir=cfg.cache_dir)
    draft = load_model(draft_cfg, cache_dir=cfg.cache_dir, seed=1)
    check_same_tokenizer(target, draft)
    # one copy of each model (the 1.5B target is 6 GB in fp32): the engine runs eager on the same
    # modules transformers uses, so this section compares decoding code, not kernels
    target_bb, engine = engine_backbone(target, "eager", target_cfg.name, cfg.cache_dir)
    draft_bb, _ = engine_backbone(draft, "eager", draft_cfg.name, cfg.cache_dir)
    prompts = spec_bench_prompts(target, args.target, args.pair_per_category)[: args.limit]
    n = args.pair_max_new_tokens
    no_confidence_stop = {"assistant_confidence_threshold": 0.0}

    def assisted(name: str, **settings) -> Contender:
        """Assisted generation with these assistant settings, applied before each call (the
        assistant's generation_config is shared by the contenders and transformers mutates it)."""
        contender = hf_contender(name, target, n, assistant=draft)
        run = contender.run

        def with_settings(prompt: list[int]) -> list[int]:
            draft.model.generation_config.update(**settings)
            return run(prompt)

        contender.run = with_settings
        return contender

    contenders = [
        hf_contender("hf:ar", target, n),
        assisted(
            "hf:assisted_matched",
            num_assistant_tokens=3,
            num_assistant_tokens_schedule="constant",
            **no_confidence_stop,
        ),
        assisted(
            "hf:assisted_heuristic",
            num_assistant_tokens=5,
            num_assistant_tokens_schedule="heuristic_transient",
            **no_confidence_stop,
        ),
        assisted(
            "hf:assisted_default",
            num_assistant_tokens=20,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.4,
        ),
        db_contender("db:ar", target_bb, target, MethodConfig(name="ar"), n, cfg.cache_dir),
        db_contender("db:sps_cpu", target_bb, target, replace(cfg.method, preset="cpu"), n, cfg.cache_dir, draft_bb),
        db_contender(
            "db:sps_adaptive", target_bb, target, replace(cfg.method, preset="adaptive"), n, cfg.cache_dir, draft_bb
        ),
    ]
    measure(contenders, prompts, args.target)
    title = (
        f"{args.draft} -> {args.target}: {len(prompts)} Spec-Bench prompts x {n} new tokens, engine {engine['name']}"
    )
    section = print_section(
        title,
        contenders,
        [
            ("db:ar", "hf:ar"),
            ("db:sps_cpu", "hf:assisted_matched"),
            ("db:sps_adaptive", "hf:assisted_heuristic"),
            ("db:sps_cpu", "hf:assisted_default"),
            ("db:sps_cpu", "db:ar"),
            ("hf:assisted_default", "hf:ar"),
        ],
    )
    results["pair"] = {
        "draft": args.draft,
        "target": args.target,
        "prompts": len(prompts),
        "max_new_tokens": n,
        "engine": engine,
        **section,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto", help="engine.backend for the embedded model's engine copy")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--pair",
        choices=["auto", "on", "off"],
        default="auto",
        help="the Qwen draft/target section: auto = when both models are prepared",
    )
    parser.add_argument("--draft", default="qwen2.5-coder-0.5b")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b")
    parser.add_argument("--pair-per-category", type=int, default=1)
    parser.add_argument("--pair-max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts per section (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results: dict = {
        "args": vars(args),
        "threads": torch.get_num_threads(),
        "hardware": hardware("cpu"),
        "versions": versions(),
    }
    embedded_section(args, results)
    pair_ready = all(
        read_prepared_marker(embedded_model_dir(load_model_config(name), default_cache_dir()))
        for name in (args.draft, args.target)
    )
    if args.pair == "on" or (args.pair == "auto" and pair_ready):
        pair_section(args, results)
    elif args.pair == "auto":
        print(f"\n(draft/target section skipped: run `make models-qwen` to prepare {args.draft} and {args.target})")

    results["finished"] = utc_now()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_vs_hf_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
