"""SIGKILL at random points of a real SLURM array sweep, then resume (README, "Faults, measured").

A 4-cell array sweep (ar / pld x two shards, tiny-llama) runs on the local cluster
(``scripts/slurm.sh``); while it runs, the test SIGKILLs each cell's Python process (the SLURM task)
after a random number of further records plus a random fraction of a generation, waits for the
array to drain, and reruns the same sweep command: finished cells are skipped, killed ones resume
from their records. After at least ``KILLS`` kills the sweep is run to the end and compared with an
uninterrupted run of the same cells: 0 records lost, 0 duplicated, the same token ids, and every
summary's timing-free fields equal.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from test_faults import deterministic, fault
from test_slurm import BIN, SLURM_LAUNCHER, slurm_cluster  # noqa: F401 (the cluster fixture)

from decodebench.runners.run_dir import read_records

pytestmark = [pytest.mark.slurm, pytest.mark.embedded, pytest.mark.slow]

KILLS = 20  # at least this many SIGKILLs across the cells
CELLS = [
    "method=ar,pld",
    "shard=0/2,1/2",
    "task.limit=12",
    "model=tiny-llama",
    "gen.max_new_tokens=8",
    "warmup=0",
    "threads=1",
    "progress=false",
]
RECORDS = {"ar": 12, "pld": 24}  # per cell: 6 two-turn samples (x baseline + method for pld)


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def cell_process(run_dir: Path) -> psutil.Process | None:
    """The Python process of the SLURM task writing ``run_dir`` (from its manifest's array ids)."""
    try:
        slurm = json.loads((run_dir / "manifest.json").read_text())["slurm"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
        return None
    for process in psutil.process_iter(["name"]):
        if "python" not in (process.info["name"] or ""):
            continue
        try:
            environ = process.environ()
        except (psutil.Error, OSError):
            continue
        if (
            environ.get("SLURM_ARRAY_JOB_ID") == slurm["array_job_id"]
            and environ.get("SLURM_ARRAY_TASK_ID") == slurm["array_task_id"]
        ):
            return process
    return None


def newest_job(sweep: Path) -> str | None:
    ids = [p.name for p in (sweep / ".submitit").glob("*") if p.name.isdigit()]
    return max(ids, key=int) if ids else None


def wait_for_the_array(job: str | None, timeout_s: float = 300) -> None:
    """Until SLURM runs no task of ``job`` (a killed cell fails the launcher before the others end)."""
    deadline = time.monotonic() + timeout_s
    while job and time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.5)


def test_sigkill_at_random_points_of_a_slurm_array_then_resume(slurm_cluster, data_dir, tmp_path):  # noqa: F811
    seed = int(os.environ.get("DECODEBENCH_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    sweep, reference = tmp_path / "sweep", tmp_path / "reference"
    command = [
        str(BIN / "decodebench"),
        "-m",
        *SLURM_LAUNCHER,
        "hydra.launcher.timeout_min=10",
        *CELLS,
        f"data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    # the uninterrupted run of the same cells, in this process's launcher, meanwhile
    uninterrupted = subprocess.Popen(
        [str(BIN / "decodebench"), "-m", *CELLS, f"data_dir={data_dir}", f"hydra.sweep.dir={reference}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    kills, launches, torn, seen = 0, 0, 0, {}
    started = time.perf_counter()
    while kills < KILLS and launches < 15:
        launches += 1
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        targets: dict[Path, int] = {}
        killed: set[Path] = set()
        while process.poll() is None:
            for status in sweep.glob("*/status.json"):
                run_dir = status.parent
                if run_dir in killed or json.loads(status.read_text() or "{}").get("status") == "complete":
                    continue
                count = line_count(run_dir / "records.jsonl")
                total = RECORDS["pld" if "method=pld" in run_dir.name else "ar"]
                if run_dir not in targets:  # kill after a random number of further records
                    targets[run_dir] = min(total - 1, count + rng.randint(0, 3))
                if count >= targets[run_dir] and count < total:
                    victim = cell_process(run_dir)
                    if victim is None:
                        continue
                    time.sleep(rng.uniform(0.0, 0.02))  # and a random fraction of one generation
                    try:
                        victim.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        continue
                    killed.add(run_dir)
                    kills += 1
            time.sleep(0.005)
        wait_for_the_array(newest_job(sweep))
        for records_file in sweep.glob("*/records.jsonl"):
            raw = records_file.read_bytes()
            torn += bool(raw) and not raw.endswith(b"\n")
            for record in read_records(records_file):  # every record that was complete at the kill
                seen.setdefault(
                    (records_file.parent.name, record.role, record.sample_id, record.turn), record.output_ids
                )
    assert kills >= KILLS, f"only {kills} kills in {launches} launches (the cells finished first)"

    final = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    assert uninterrupted.wait(timeout=900) == 0, uninterrupted.stderr.read()[-3000:]
    lost = duplicated = 0
    cells = sorted(p.parent.name for p in sweep.glob("*/summary.json"))
    assert cells == sorted(p.parent.name for p in reference.glob("*/summary.json")) and len(cells) == 4
    for cell in cells:
        resumed = read_records(sweep / cell / "records.jsonl")
        expected = read_records(reference / cell / "records.jsonl")
        keys = [(r.role, r.sample_id, r.turn) for r in resumed]
        duplicated += len(keys) - len(set(keys))
        final_ids = dict(zip(keys, (r.output_ids for r in resumed)))
        lost += sum(final_ids.get(key[1:]) != ids for key, ids in seen.items() if key[0] == cell)
        assert final_ids == {(r.role, r.sample_id, r.turn): r.output_ids for r in expected}, cell
        assert deterministic(json.loads((sweep / cell / "summary.json").read_text())) == deterministic(
            json.loads((reference / cell / "summary.json").read_text())
        ), cell
    seconds = time.perf_counter() - started
    fault(
        "SIGKILL at random points of a SLURM array sweep (4 cells), then resume",
        kills,
        f"seed {seed}: {launches} launches + 1 to finish, {torn} torn last lines, {len(seen)} records "
        f"written before kills, {lost} lost, {duplicated} duplicated; 4/4 summaries equal the uninterrupted "
        f"run's ({seconds:.0f} s)",
    )
    assert lost == 0 and duplicated == 0
