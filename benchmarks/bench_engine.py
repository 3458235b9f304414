"""DecodeBench's engine vs transformers' own decoding, on the same prompts, in one process.

Measures tokens/s (and checks the greedy outputs) for:
  * ``hf_ar`` / ``hf_pld`` — HF ``generate`` greedy, and with
    ``prompt_lookup_num_tokens=10, max_matching_ngram_size=3``, on an unmodified (eager) model;
  * per engine backend B (``--backends``; ``engine.backend`` values, ``all`` = every one here):
    ``B:ar``, ``B:pld_cpu`` and ``B:pld_paper`` — AR and prompt lookup through the engine. Each
    backend runs on its own copy of the model; its packing / compile time is reported apart and
    happens before the warm-up, never inside a timed region.
Each prompt is decoded by every contender in turn (interleaved), after a warm-up, so the ratios
are measured on the same machine state. Lossless check: within a backend, PLD must reproduce that
backend's AR token for token; across backends, the table says how many outputs differ from the
first backend's AR (argmax differences in fp32 rounding, see ``decodebench-profile``).

Targets of issue 9 (best backend, one run): ``B:ar / hf_ar >= 1.3`` and ``B:pld_cpu / B:ar >= 1.3``.

Usage: python benchmarks/bench_engine.py [--backends auto|all|eager,packed,onednn,compiled] [--per-category 2]
       [--max-new-tokens 128] [--threads 2] [--out results/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from decodebench.config import MethodConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import apply_backend, backends_for
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.methods import build_method
from decodebench.models.loading import load_model
from decodebench.runners.local import eos_token_ids
from decodebench.runners.manifest import hardware, utc_now, versions
from decodebench.tasks import build_task
from decodebench.tasks.prompts import encode_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backends", default="auto", help="auto | all | comma list of eager,packed,onednn,compiled")
    parser.add_argument("--buckets", default="1,4,8,16,32", help="engine.buckets")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    buckets = [int(b) for b in args.buckets.split(",")]

    cfg = compose_run_config(
        [f"model={args.model}", "method=pld", "task=spec_bench", f"task.per_category={args.per_category}"]
    )
    loaded = load_model(cfg.model, cache_dir=cfg.cache_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    prompts = [
        encode_prompt(tokenizer, task.build_messages(s, 0, []), cfg.model.chat_template) for s in task.load_samples()
    ]
    eos = eos_token_ids(loaded)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)

    def hf(**kwargs) -> Callable[[list[int]], list[int]]:
        def run(prompt: list[int]) -> list[int]:
            with torch.inference_mode():
                ids = torch.tensor([prompt])
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=args.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=eos[0],
                    **kwargs,
                )
            return out[0, len(prompt) :].tolist()

        return run

    def engine(backbone: Backbone, method: MethodConfig) -> Callable[[list[int]], list[int]]:
        drafter = build_method(method)
        drafter.setup(backbone, cfg.cache_dir)
        cache = backbone.new_cache(2048)
        return lambda prompt: generate(backbone, drafter, prompt, settings, cache).new_ids

    names = backends_for("cpu") if args.backends == "all" else args.backends.split(",")
    pld = cfg.method  # conf/method/pld.yaml, as a run would use it
    contenders: dict[str, Callable[[list[int]], list[int]]] = {
        "hf_ar": hf(),
        "hf_pld": hf(prompt_lookup_num_tokens=10, max_matching_ngram_size=3),
    }
    engine_info = {}
    for requested in names:
        # each backend on its own model copy: packing swaps modules, and hf_* must stay eager
        backbone = Backbone(load_model(cfg.model, cache_dir=cfg.cache_dir).model)
        info = apply_backend(backbone, requested, buckets=buckets, model_name=cfg.model.name, cache_dir=cfg.cache_dir)
        name = info.name
        engine_info[name] = info.to_dict()
        print(
            f"engine backend {requested} -> {name}: setup {info.setup_s:.1f} s (not timed), "
            f"max |logit diff| vs eager {info.max_abs_logit_diff}"
        )
        contenders[f"{name}:ar"] = engine(backbone, MethodConfig(name="ar"))
        contenders[f"{name}:pld_cpu"] = engine(backbone, replace(pld, preset="cpu"))
        contenders[f"{name}:pld_paper"] = engine(backbone, replace(pld, preset="paper"))
    backends = list(engine_info)
    for run in contenders.values():  # warm-up
        run(prompts[0][:64])

    totals = {
        name: {"tokens": 0, "seconds": 0.0, "differ_from_own_ar": 0, "differ_from_hf_ar": 0} for name in contenders
    }
    for prompt in tqdm(prompts, desc="prompts"):
        outputs = {}
        for name, run in contenders.items():
            start = time.perf_counter()
            ids = run(prompt)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["tokens"] += len(ids)
            outputs[name] = ids
        for name, ids in outputs.items():
            own_ar = "hf_ar" if name.startswith("hf_") else f"{name.split(':')[0]}:ar"
            totals[name]["differ_from_own_ar"] += ids != outputs[own_ar]
            totals[name]["differ_from_hf_ar"] += ids != outputs["hf_ar"]

    for entry in totals.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    tps = {name: entry["tokens_per_s"] for name, entry in totals.items()}
    ratios = {"hf_pld / hf_ar": tps["hf_pld"] / tps["hf_ar"]}
    for name in backends:
        ratios[f"{name}:ar / hf_ar"] = tps[f"{name}:ar"] / tps["hf_ar"]
        ratios[f"{name}:pld_cpu / {name}:ar"] = tps[f"{name}:pld_cpu"] / tps[f"{name}:ar"]
        ratios[f"{name}:pld_paper / {name}:ar"] = tps[f"{name}:pld_paper"] / tps[f"{name}:ar"]
        ratios[f"{name}:pld_cpu / hf_pld"] = tps[f"{name}:pld_cpu"] / tps["hf_pld"]
    print(
        f"\n{len(prompts)} Spec-Bench prompts x {args.max_new_tokens} new tokens, {args.model}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| contender | tokens | seconds | tokens/s | outputs != own AR (lossless: 0) | outputs != hf_ar |")
    print("|---|---|---|---|---|---|")
    for name, entry in totals.items():
        print(
            f"| {name} | {entry['tokens']} | {entry['seconds']:.1f} | {entry['tokens_per_s']:.2f} | "
            f"{entry['differ_from_own_ar']} | {entry['differ_from_hf_ar']} |"
        )
    print("\n| ratio (tokens/s) | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_engine_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(
        json.dumps(
            {
                "args": vars(args),
                "totals": totals,
                "ratios": ratios,
                "engine": engine_info,
                "finished": utc_now(),
                "threads": torch.get_num_threads(),
                "hardware": hardware("cpu"),
                "versions": versions(),
                "model": loaded.info,
            },
            indent=2,
            default=str,
        )
    )
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
