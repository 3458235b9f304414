"""``make gpu-check`` (benchmarks/gpu_check.py): the overhead share's definition, and the whole
script as a CPU dry run (the same code path a GPU machine runs, device=cpu)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decodebench.records import harness_overhead_share

from helpers import make_record

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def record(wall, prefill, forward, error=None):
    return make_record(
        method="ar",
        role="baseline",
        wall_s=wall,
        prefill_s=prefill,
        forward_s=forward,
        error=error,
    )


def test_overhead_share_is_decode_time_outside_forwards():
    records = [record(1.1, 0.1, 0.95), record(2.2, 0.2, 1.85), record(None, None, None, error="boom")]
    assert harness_overhead_share(records) == pytest.approx((0.05 + 0.15) / 3.0)
    assert harness_overhead_share([record(1.0, 0.1, None)]) is None


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "--device cpu runs a dry run" in result.stderr


@pytest.mark.embedded
@pytest.mark.slow
def test_dry_run_on_cpu_end_to_end(tmp_path, data_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--model",
            "tiny-llama",
            "--categories",
            "qa",
            "--max-new-tokens",
            "8",
            "--threads",
            "1",
            "--pytest-args",
            "-k peak",
            "--out",
            str(tmp_path / "smoke"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "DECODEBENCH_DATA": str(data_dir)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "| baseline | ar | 1 |" in out and "| method | pld[cpu] | 1 |" in out
    assert "AR harness overhead" in out and "lossless rate 1.00" in out
    assert "device tests passed, smoke passed" in out
