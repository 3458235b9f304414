"""Real SLURM array sweeps on the local single-node cluster (``scripts/slurm.sh``, started by ``make test``).

Every test submits through Hydra's SLURM launcher (``hydra/launcher=slurm``) with tiny cells
(tiny-llama, 8 new tokens, no warm-up, one CPU per cell), waits for the sweep and checks each
cell's run directory, ``sacct`` and the sweep's verdict. Without a cluster these tests FAIL with the
start script's output; they skip only on machines without ``apt-get`` (nothing could install SLURM).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decodebench.runners.run_dir import read_records

pytestmark = [pytest.mark.slurm, pytest.mark.embedded, pytest.mark.slow]  # tiny-llama uses the embedded tokenizer

ROOT = Path(__file__).resolve().parents[1]
SLURM_SCRIPT = ROOT / "scripts" / "slurm.sh"
BIN = Path(sys.executable).parent
# submitit's preemption signal (SLURM sends it before the time limit; an early one means preemption)
PREEMPT_SIGNAL = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
TINY_CELL = ["model=tiny-llama", "gen.max_new_tokens=8", "warmup=0", "threads=1", "progress=false"]
SLURM_LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]


@pytest.fixture(scope="session")
def slurm_cluster() -> float:
    """Start (or find running) the local cluster; returns the seconds ``scripts/slurm.sh start`` took."""
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip(
            "SLURM is not installed and there is no apt-get to install it (scripts/slurm.sh needs "
            "Debian/Ubuntu and root)"
        )
    started = time.perf_counter()
    result = subprocess.run(["bash", str(SLURM_SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        pytest.fail(
            f"scripts/slurm.sh start failed (exit {result.returncode}); the SLURM tests need root and "
            f"apt-get.\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    print(f"\nlocal SLURM cluster ready in {seconds:.1f} s")
    return seconds


def sweep_command(sweep_dir: Path, data_dir: Path, *overrides: str, timeout_min: int = 10) -> list[str]:
    # the console script, so that SLURM tasks import decodebench.cli as a module (not __main__)
    return [
        str(BIN / "decodebench"),
        "-m",
        *SLURM_LAUNCHER,
        f"hydra.launcher.timeout_min={timeout_min}",
        *TINY_CELL,
        f"data_dir={data_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def run_sweep(sweep_dir: Path, data_dir: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run(
        sweep_command(sweep_dir, data_dir, *overrides),
        capture_output=True,
        text=True,
        cwd=sweep_dir.parent,
        timeout=600,
    )
    return result, time.perf_counter() - started


def array_job_id(sweep_dir: Path) -> str:
    """The SLURM job id of the sweep (submitit's folder ``.submitit/<job id>``)."""
    ids = [p.name for p in (sweep_dir / ".submitit").iterdir() if "_" not in p.name]
    assert len(ids) == 1, ids
    return ids[0]


def sacct_states(job_id: str, expected: int, timeout_s: float = 60) -> dict[str, str]:
    """Final states of the job's tasks as accounting sees them (waits until all are final)."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True, text=True, check=True
        ).stdout
        states = dict(line.split("|", 1) for line in out.splitlines() if line.strip())
        final = [s for s in states.values() if s not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")]
        if len(final) >= expected or time.monotonic() > deadline:
            return states
        time.sleep(0.5)


def cells(sweep_dir: Path) -> dict[str, Path]:
    return {p.parent.name: p.parent for p in sweep_dir.glob("*/status.json")}


def test_array_sweep_runs_every_cell_and_merges_shards(slurm_cluster, data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result, wall = run_sweep(sweep, data_dir, "method=ar,pld", "shard=0/2,1/2", "task.limit=2")
    print(f"\nSLURM array sweep, 4 cells: {wall:.1f} s")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    job = array_job_id(sweep)
    states = sacct_states(job, expected=4)
    assert sorted(states) == [f"{job}_{i}" for i in range(4)], states  # ONE array job, one task per cell
    assert set(states.values()) == {"COMPLETED"}, states

    run_dirs = cells(sweep)
    assert sorted(run_dirs) == sorted(
        f"gen.max_new_tokens=8,method={m},model=tiny-llama,shard={s}_2,task.limit=2,threads=1,warmup=0"
        for m in ("ar", "pld")
        for s in (0, 1)
    )
    tasks = set()
    for name, run_dir in run_dirs.items():
        assert json.loads((run_dir / "status.json").read_text())["status"] == "complete", name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["errors"] == 0 and summary["records"] == 2, (name, summary)  # one 2-turn sample
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["slurm"]["array_job_id"] == job and manifest["shard"] in ("0/2", "1/2")
        tasks.add(manifest["slurm"]["array_task_id"])
        records = read_records(run_dir / "records.jsonl")
        assert all(r.new_tokens == len(r.output_ids) > 0 for r in records)
        if "method=pld" in name:  # its own AR baseline, measured in the same task on the same node
            assert {r.role for r in records} == {"baseline", "method"} and summary["lossless_rate"] == 1.0
    assert tasks == {"0", "1", "2", "3"}
    verdict = json.loads((sweep / "sweep.json").read_text())
    assert verdict["ok"] and verdict["counts"] == {"complete": 4, "failed": 0, "running": 0}

    # the report merges the two shards of each method: 2 samples x 2 turns
    report = subprocess.run(
        [str(BIN / "decodebench-report"), str(sweep), "--format", "csv"], capture_output=True, text=True, check=True
    )
    assert "warning" not in report.stderr
    rows = {(r["method"], r["group"]): r for r in csv.DictReader(io.StringIO(report.stdout))}
    assert rows[("pld[cpu]", "overall")]["records"] == "4" and rows[("pld[cpu]", "overall")]["lossless_rate"] == "1.00"
    assert rows[("ar (baseline)", "overall")]["records"] == "4" and rows[("ar", "overall")]["records"] == "4"
    assert float(rows[("pld[cpu]", "overall")]["speedup"]) > 0


def test_failed_cell_is_reported_while_the_others_complete(slurm_cluster, data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result, wall = run_sweep(sweep, data_dir, "method=pld", "task.ids=[81],[999999]")
    print(f"\nSLURM sweep with a failing cell, 2 cells: {wall:.1f} s")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "1 of 2 cells did not complete" in result.stderr
    assert "FAILED" in output and "task.ids=[999999]" in output and "999999" in output

    run_dirs = cells(sweep)
    failed = run_dirs["gen.max_new_tokens=8,method=pld,model=tiny-llama,task.ids=[999999],threads=1,warmup=0"]
    good = run_dirs["gen.max_new_tokens=8,method=pld,model=tiny-llama,task.ids=[81],threads=1,warmup=0"]
    status = json.loads((failed / "status.json").read_text())
    assert status["status"] == "failed" and "999999" in status["error"] and not (failed / "summary.json").exists()
    summary = json.loads((good / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["records"] == 2 and summary["lossless_rate"] == 1.0
    verdict = json.loads((sweep / "sweep.json").read_text())
    assert not verdict["ok"] and verdict["counts"] == {"complete": 1, "failed": 1, "running": 0}
    assert len(sacct_states(array_job_id(sweep), expected=2)) == 2


def test_preempted_cell_is_requeued_and_resumes_from_its_records(slurm_cluster, data_dir, tmp_path):
    """submitit checkpointing: the preemption signal requeues the task; the cell resumes, loses nothing."""
    sweep = tmp_path / "sweep"
    # submitit calls a signal in the first 80 % (and > 10 min before the end) of the time limit a preemption
    command = sweep_command(sweep, data_dir, "method=pld", "task.limit=12", "gen.max_new_tokens=32", timeout_min=60)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        records_file = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            records_file = next(sweep.glob("*/records.jsonl"), None)
            if records_file and len(records_file.read_text().splitlines()) >= 4:
                break
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.1)
        else:
            pytest.fail("the cell wrote no records within 180 s")
        job = array_job_id(sweep)
        subprocess.run(["scancel", f"--signal={PREEMPT_SIGNAL}", job], check=True)
        output, _ = process.communicate(timeout=400)
    finally:
        if process.poll() is None:
            process.kill()
    print(f"\nSLURM preemption + requeue + resume of one cell: {time.perf_counter() - started:.1f} s")
    assert process.returncode == 0, output[-3000:]

    run_dir = records_file.parent
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.out"))
    assert "this job is preempted" in log and "Requeued job" in log
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert int(manifest["slurm"]["restart_count"]) >= 1  # the requeued attempt wrote this manifest
    assert manifest["resumed_records"] >= 4
    records = read_records(run_dir / "records.jsonl")
    keys = [(r.role, r.sample_id, r.turn) for r in records]
    assert len(keys) == len(set(keys)) == 12 * 2 * 2  # 12 two-turn samples, baseline + method: none lost or repeated
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
