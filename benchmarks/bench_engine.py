"""DecodeBench's engine vs transformers' own decoding, on the same prompts, in one process.

Measures tokens/s (and checks the greedy outputs are identical) for:
  * ``ar``  — DecodeBench AR through the engine vs HF ``generate`` (greedy);
  * ``pld`` — DecodeBench prompt lookup (``cpu`` and ``paper`` presets) vs HF
    ``generate(prompt_lookup_num_tokens=10, max_matching_ngram_size=3)``.
Each prompt is decoded by every contender in turn (interleaved), after a warm-up, so the ratios
are measured on the same machine state. Results print as a table and go to a JSON file.

Usage: python benchmarks/bench_engine.py [--per-category 2] [--max-new-tokens 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from decodebench.config import MethodConfig, TaskConfig, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.methods import build_method
from decodebench.models.loading import load_model, load_model_config
from decodebench.runners.local import eos_token_ids
from decodebench.runners.manifest import hardware, utc_now, versions
from decodebench.tasks import build_task
from decodebench.tasks.prompts import encode_prompt

PLD = dict(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model_cfg = load_model_config(args.model)
    loaded = load_model(model_cfg, cache_dir=default_cache_dir())
    model, tokenizer = loaded.model, loaded.tokenizer
    task = build_task(TaskConfig(name="spec_bench", impl="decodebench.tasks.spec_bench:SpecBench",
                                 data_file="spec_bench/question.jsonl", per_category=args.per_category),
                      data_dir=None, cache_dir=default_cache_dir())
    prompts = [encode_prompt(tokenizer, task.build_messages(s, 0, []), True) for s in task.load_samples()]

    backbone = Backbone(model)
    cache = backbone.new_cache(2048)
    eos = eos_token_ids(loaded)
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, eos_token_ids=eos)

    def engine(method: MethodConfig) -> Callable[[list[int]], list[int]]:
        drafter = build_method(method)
        drafter.setup(backbone)
        return lambda prompt: generate(backbone, drafter, prompt, settings, cache).new_ids

    def hf(**kwargs) -> Callable[[list[int]], list[int]]:
        def run(prompt: list[int]) -> list[int]:
            with torch.inference_mode():
                ids = torch.tensor([prompt])
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.max_new_tokens, eos_token_id=eos,
                                     pad_token_id=eos[0], **kwargs)
            return out[0, len(prompt):].tolist()
        return run

    contenders = {
        "hf_ar": hf(),
        "engine_ar": engine(MethodConfig(name="ar")),
        "hf_pld": hf(prompt_lookup_num_tokens=10, max_matching_ngram_size=3),
        "engine_pld_cpu": engine(MethodConfig(**PLD, preset="cpu", params={}, presets={"cpu": {"num_draft_tokens": 2}})),
        "engine_pld_paper": engine(MethodConfig(**PLD, params={"max_ngram_size": 3, "min_ngram_size": 1,
                                                                "num_draft_tokens": 10})),
    }
    for run in contenders.values():  # warm-up
        run(prompts[0][:64])

    totals = {name: {"tokens": 0, "seconds": 0.0, "mismatches": 0} for name in contenders}
    for prompt in tqdm(prompts, desc="prompts"):
        reference = None
        for name, run in contenders.items():
            start = time.perf_counter()
            ids = run(prompt)
            totals[name]["seconds"] += time.perf_counter() - start
            totals[name]["tokens"] += len(ids)
            reference = reference or ids
            totals[name]["mismatches"] += ids != reference

    for entry in totals.values():
        entry["tokens_per_s"] = entry["tokens"] / entry["seconds"]
    tps = {name: entry["tokens_per_s"] for name, entry in totals.items()}
    ratios = {
        "engine_ar / hf_ar": tps["engine_ar"] / tps["hf_ar"],
        "engine_pld_cpu / hf_pld": tps["engine_pld_cpu"] / tps["hf_pld"],
        "engine_pld_cpu / engine_ar": tps["engine_pld_cpu"] / tps["engine_ar"],
        "engine_pld_paper / engine_ar": tps["engine_pld_paper"] / tps["engine_ar"],
        "hf_pld / hf_ar": tps["hf_pld"] / tps["hf_ar"],
    }
    print(f"\n{len(prompts)} Spec-Bench prompts x {args.max_new_tokens} new tokens, {args.model}, "
          f"{torch.get_num_threads()} threads")
    print("| contender | tokens | seconds | tokens/s | outputs differing from hf_ar |")
    print("|---|---|---|---|---|")
    for name, entry in totals.items():
        print(f"| {name} | {entry['tokens']} | {entry['seconds']:.1f} | {entry['tokens_per_s']:.2f} | "
              f"{entry['mismatches']} |")
    print("\n| ratio (tokens/s) | value |\n|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.3f} |")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_engine_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), "totals": totals, "ratios": ratios, "finished": utc_now(),
                                "threads": torch.get_num_threads(), "hardware": hardware("cpu"),
                                "versions": versions(), "model": loaded.info}, indent=2, default=str))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
