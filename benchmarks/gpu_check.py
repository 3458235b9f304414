"""``make gpu-check``: is DecodeBench ready on this GPU? Three checks, one summary.

1. The engine equivalence tests on the device (``tests/test_device.py`` with
   ``DECODEBENCH_TEST_DEVICE``): Backbone logits vs the HF forward (prefill, cached step, tree) in
   fp32 / bf16 / fp16, masks and caches on the device, PLD output equal to AR, synchronised timers.
2. A Spec-Bench smoke through the real CLI:
   ``decodebench method=pld device=cuda dtype=bfloat16 task.per_category=1 gen.max_new_tokens=64``.
3. From the smoke's records and manifest: the harness overhead share (decode time outside the
   target's forwards, :func:`decodebench.records.harness_overhead_share`; target < 5 % for AR),
   speedup, τ, the lossless rate, and the peak GPU memory.

Without a GPU, ``--device cpu`` (``make gpu-check GPU_CHECK_DEVICE=cpu``) runs the same script end
to end as a dry run (dtype float32 by default).

Usage: python benchmarks/gpu_check.py [--device cuda] [--dtype bfloat16] [--model smollm2-135m]
       [--per-category 1] [--max-new-tokens 64] [--categories qa,rag] [--threads N]
       [--pytest-args "-k ..."] [--out results/gpu_check/<time>] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from decodebench.records import Record, harness_overhead_share
from decodebench.runners.run_dir import read_records

ROOT = Path(__file__).resolve().parents[1]
OVERHEAD_TARGET = 0.05


def run_device_tests(device: str, pytest_args: str) -> bool:
    command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_device.py"), "-q", *shlex.split(pytest_args)]
    print(
        f"\n== 1. engine equivalence on {device}: DECODEBENCH_TEST_DEVICE={device} {' '.join(command[1:])}", flush=True
    )
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "DECODEBENCH_TEST_DEVICE": device})
    return result.returncode == 0


def run_smoke(args: argparse.Namespace, run_dir: Path) -> bool:
    overrides = [
        f"model={args.model}",
        "method=pld",
        f"device={args.device}",
        f"dtype={args.dtype}",
        f"task.per_category={args.per_category}",
        f"gen.max_new_tokens={args.max_new_tokens}",
        f"hydra.run.dir={run_dir}",
        "progress=false",
    ]
    if args.categories:
        overrides.append(f"task.categories=[{args.categories}]")
    if args.threads:
        overrides.append(f"threads={args.threads}")
    command = [sys.executable, "-m", "decodebench.cli", *overrides]
    print(f"\n== 2. Spec-Bench smoke: decodebench {' '.join(overrides)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(result.stdout[-4000:])
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
    print(f"(smoke took {time.perf_counter() - started:.0f} s)")
    return result.returncode == 0


def role_row(role: str, records: list[Record]) -> dict:
    ok = [r for r in records if r.role == role and r.error is None]
    decode = sum(r.wall_s - r.prefill_s for r in ok)
    share = harness_overhead_share(ok)
    tokens = sum(r.new_tokens for r in ok)
    return {
        "role": role,
        "method": ok[0].method if ok else "-",
        "records": len(ok),
        "new_tokens": tokens,
        "decode_s": decode,
        "forward_s": sum(r.forward_s or 0.0 for r in ok),
        "overhead_share": share,
        "tokens_per_s": tokens / sum(r.wall_s for r in ok) if ok else None,
    }


def summarize(run_dir: Path, strict: bool) -> bool:
    records = read_records(run_dir / "records.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [role_row(role, records) for role in ("baseline", "method")]
    print("\n== 3. harness overhead (decode time outside the target's forwards; target < 5 % for AR)")
    print("| role | method | records | new tokens | decode s | forward s | outside forwards | tokens/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        share = "-" if row["overhead_share"] is None else f"{row['overhead_share']:.1%}"
        rate = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        print(
            f"| {row['role']} | {row['method']} | {row['records']} | {row['new_tokens']} | {row['decode_s']:.2f} | "
            f"{row['forward_s']:.2f} | {share} | {rate} |"
        )
    memory = manifest.get("memory") or {}
    gpu = memory.get("peak_gpu_allocated_bytes")
    model = manifest.get("model") or {}
    print(
        f"\nmodel {model.get('architecture')} {model.get('dtype')} on {model.get('device')} "
        f"({(manifest.get('hardware') or {}).get('gpu') or 'no GPU'}); engine backend "
        f"{next(iter((manifest.get('engine') or {}).values()), {}).get('name')}"
    )

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    print(
        f"speedup {fmt(summary.get('speedup'))}, tau {fmt(summary.get('tau'))}, lossless rate "
        f"{fmt(summary.get('lossless_rate'))}, errors {summary.get('errors')}"
    )
    print(
        f"peak GPU memory allocated: {'-' if gpu is None else f'{gpu / 2**20:.0f} MiB'}, "
        f"peak RSS {memory.get('peak_rss_bytes', 0) / 2**20:.0f} MiB"
    )
    ar_share = rows[0]["overhead_share"]
    met = ar_share is not None and ar_share < OVERHEAD_TARGET
    print(
        f"AR harness overhead {'-' if ar_share is None else f'{ar_share:.1%}'}: target < 5 % "
        f"{'met' if met else 'NOT met'}"
    )
    return summary.get("errors") == 0 and (met or not strict)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--categories", default=None, help="comma list of Spec-Bench categories (default: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments for the device tests")
    parser.add_argument("--out", default=None, help="run dir of the smoke (default results/gpu_check/<time>)")
    parser.add_argument("--strict", action="store_true", help="fail when AR's overhead share is >= 5 %%")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    print(
        f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "gpu_check: device=cuda but torch sees no CUDA device (CPU wheel? install a CUDA torch: "
            'make setup TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"); '
            "--device cpu runs a dry run",
            file=sys.stderr,
        )
        return 2
    run_dir = Path(args.out or ROOT / "results" / "gpu_check" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    tests_ok = run_device_tests(args.device, args.pytest_args)
    smoke_ok = run_smoke(args, run_dir)
    summary_ok = smoke_ok and summarize(run_dir, args.strict)
    print(
        f"\ngpu-check on {args.device}: device tests {'passed' if tests_ok else 'FAILED'}, smoke "
        f"{'passed' if smoke_ok else 'FAILED'}; run dir {run_dir}"
    )
    return 0 if tests_ok and summary_ok else 1


if __name__ == "__main__":
    sys.exit(main())
