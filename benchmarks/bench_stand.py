"""STAND vs AR on GSM8K with several sampled traces per problem (test-time scaling).

The runner decodes each prompt once; STAND's point is the 2nd, 3rd, ... trace of the same problem,
so this script decodes ``--samples`` traces per problem back to back, AR and STAND alternating per
trace (same prompt, same temperature, seeds 0..n-1 for both), on one engine in one process, and
prints Σ AR wall / Σ STAND wall (prefill included), τ, and GSM8K flexible-extraction accuracy of
both (lossless under sampling: the same distribution, not the same tokens). The target runs the
engine backend ``--backend`` (default ``auto``, as the runner's ``engine.backend``), installed before
anything is timed.

    python benchmarks/bench_stand.py --problems 3 --samples 4 --max-new-tokens 96 --threads 1
"""

from __future__ import annotations

import argparse
import os

import torch


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from decodebench.config import MethodConfig, TaskConfig, default_cache_dir, group_config
    from decodebench.engine.backbone import Backbone
    from decodebench.engine.backends import apply_backend
    from decodebench.engine.decode_loop import DecodeSettings, generate
    from decodebench.engine.sampling import SamplingParams
    from decodebench.methods import build_method, method_config
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks import build_task
    from decodebench.tasks.prompts import encode_prompt

    model_cfg = load_model_config(args.model)
    loaded = load_model(model_cfg)
    backbone = Backbone(loaded.model)
    engine = apply_backend(backbone, args.backend, model_name=model_cfg.name, cache_dir=default_cache_dir())
    print(f"engine backend {engine.name} ({args.backend})", flush=True)
    task = build_task(
        TaskConfig(**{**group_config("task", "gsm8k"), "limit": args.problems}),
        os.environ.get("DECODEBENCH_DATA"),
        default_cache_dir(),
    )
    samples = task.load_samples()
    cfg = method_config("stand")
    cfg.preset = args.preset
    if args.branching:
        cfg.params["branching"] = [int(b) for b in args.branching.split(",")]
        cfg.pinned = ["branching"]
    stand = build_method(cfg)
    stand.setup(backbone)
    ar = build_method(MethodConfig())
    settings = DecodeSettings(
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingParams(temperature=args.temperature),
        eos_token_ids=[loaded.tokenizer.eos_token_id],
    )
    cache = backbone.new_cache(1024)
    warm = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Warm up."}], model_cfg.chat_template)
    for drafter in (ar, stand):  # one-time costs (kernels, allocations) outside the timed traces
        generate(backbone, drafter, warm, settings, cache, torch.Generator().manual_seed(0))
    stand.reset_state()
    totals = {"ar": [0.0, 0, 0, 0.0], "stand": [0.0, 0, 0, 0.0]}  # wall, tokens, target forwards, correct
    shares = {"ar": [0.0, 0.0], "stand": [0.0, 0.0]}  # Σ draft_s (propose + feedback), Σ forward_s
    for sample in samples:
        prompt = encode_prompt(
            loaded.tokenizer, [{"role": "user", "content": sample.turns[0]}], model_cfg.chat_template
        )
        for seed in range(args.samples):
            for name, drafter in (("ar", ar), ("stand", stand)):
                out = generate(backbone, drafter, prompt, settings, cache, torch.Generator().manual_seed(seed))
                text = loaded.tokenizer.decode(out.new_ids, skip_special_tokens=True)
                score = task.score(sample, 0, text)
                total = totals[name]
                total[0] += out.wall_s
                total[1] += len(out.new_ids)
                total[2] += out.target_forwards
                total[3] += float(score.get("exact_match_flexible", score.get("exact_match", 0.0)))
                shares[name][0] += sum(s.draft_s for s in out.steps)
                shares[name][1] += sum(s.forward_s for s in out.steps)
            print(
                f"{sample.sample_id} trace {seed + 1}: stand steps {len(out.steps)}, accepted "
                f"{sum(s.accepted for s in out.steps)}, memory {out.method_stats['memory_ngrams']:.0f} n-grams",
                flush=True,
            )
    traces = len(samples) * args.samples
    for name, (wall, tokens, forwards, correct) in totals.items():
        print(
            f"{name:6s} wall {wall:7.1f} s  tokens {tokens:5d}  tau {tokens / forwards:.2f}  accuracy {correct / traces:.2f}"
            f"  draft {shares[name][0] / wall:.1%}  target forwards {shares[name][1] / wall:.1%} of wall"
            f"  ({1000 * shares[name][1] / max(forwards - traces, 1):.1f} ms each after prefill)"
        )
    print(f"speedup (sum AR wall / sum STAND wall): {totals['ar'][0] / totals['stand'][0]:.2f}")


if __name__ == "__main__":
    main()
