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
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from decodebench.config import MethodConfig, compose_run_config
from decodebench.engine.backbone import Backbone
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
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="results/benchmarks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = compose_run_config([f"model={args.model}", "method=pld", "task=spec_bench",
                              f"task.per_category={args.per_category}"])
    loaded = load_model(cfg.model, cache_dir=cfg.cache_dir)
    model, tokenizer = loaded.model, loaded.tokenizer
    task = build_task(cfg.task, data_dir=cfg.data_dir, cache_dir=cfg.cache_dir)
    prompts = [encode_prompt(tokenizer, task.build_messages(s, 0, []), cfg.model.chat_template)
               for s in task.load_samples()]

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

    pld = cfg.method  # conf/method/pld.yaml, as a run would use it
    contenders = {
        "hf_ar": hf(),
        "engine_ar": engine(MethodConfig(name="ar")),
        "hf_pld": hf(prompt_lookup_num_tokens=10, max_matching_ngram_size=3),
        "engine_pld_cpu": engine(replace(pld, preset="cpu")),
        "engine_pld_paper": engine(replace(pld, preset="paper")),
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
