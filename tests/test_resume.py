"""Resume and faults: SIGKILL at random points, skipping finished runs and cells, overwrite, config changes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decodebench.config import compose_run_config
from decodebench.runners import local
from decodebench.runners.run_dir import read_records

from helpers import make_record

pytestmark = pytest.mark.embedded  # tiny-llama borrows the embedded model's tokenizer

BIN = Path(sys.executable).parent
TINY = ["model=tiny-llama", "warmup=0", "threads=1", "progress=false"]


def cli(*args: str) -> list[str]:
    return [str(BIN / "decodebench"), *TINY, *args]


def keys(records) -> list[tuple]:
    return [(r.role, r.sample_id, r.turn) for r in records]


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(tmp_path, data_dir):
    """Several SIGKILLs at random moments, each followed by a resume: no record lost or duplicated,
    and the final token ids equal those of a run that was never interrupted."""
    args = ["method=pld", "task.limit=6", "gen.max_new_tokens=24", f"data_dir={data_dir}"]
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = subprocess.Popen(
        cli(*args, f"hydra.run.dir={reference_dir}"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    total = 6 * 2 * 2  # 6 two-turn MT-Bench samples x (baseline + method)
    seed = int(os.environ.get("DECODEBENCH_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    records_file = killed_dir / "records.jsonl"
    trials, killed_mid_run, torn_lines, seen = 5, 0, 0, {}
    for _trial in range(trials):
        before = line_count(records_file)
        kill_after = rng.randint(before, total - 1)  # complete records on disk when the kill comes
        delay = rng.uniform(0.0, 0.03)  # and then a random fraction of one generation
        process = subprocess.Popen(
            cli(*args, f"hydra.run.dir={killed_dir}"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        while process.poll() is None and line_count(records_file) < kill_after:
            time.sleep(0.002)
        time.sleep(delay)
        killed_mid_run += process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        raw = records_file.read_bytes() if records_file.exists() else b""
        torn_lines += bool(raw) and not raw.endswith(b"\n")
        for record in read_records(records_file):  # every record that was complete when killed
            seen.setdefault(keys([record])[0], record.output_ids)
    assert killed_mid_run >= trials - 1, "the runs finished before they could be killed"

    final = subprocess.run(cli(*args, f"hydra.run.dir={killed_dir}"), capture_output=True, text=True, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-3000:]
    expected = read_records(reference_dir / "records.jsonl")
    resumed = read_records(records_file)
    final_ids = dict(zip(keys(resumed), (r.output_ids for r in resumed)))
    lost = sum(final_ids.get(key) != ids for key, ids in seen.items())
    duplicated = len(resumed) - len(set(keys(resumed)))
    print(
        f"\nkill/resume: seed {seed}, {trials} SIGKILL trials ({killed_mid_run} mid-run, {torn_lines} torn last "
        f"lines), {len(seen)} records written before kills, lost {lost}, duplicated {duplicated}"
    )
    assert lost == 0 and duplicated == 0
    assert sorted(keys(resumed)) == sorted(keys(expected)) and len(resumed) == total
    assert {k: r.output_ids for k, r in zip(keys(expected), expected)} == final_ids  # token ids
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["records"] == total // 2 and summary["errors"] == 0 and summary["lossless_rate"] == 1.0


def test_finished_run_is_skipped_changed_config_and_overwrite_recompute(tmp_path, data_dir, monkeypatch):
    def config(*overrides: str):
        cfg = compose_run_config([*TINY, "method=pld", "task.limit=1", f"data_dir={data_dir}", *overrides])
        cfg.run_dir = str(tmp_path / "run")
        return cfg

    first = local.run(config("gen.max_new_tokens=8"))
    assert first.summary["records"] == 2 and all(r.new_tokens == 8 for r in first.records)

    # summary present, same config hash: skipped without loading a model
    real_load_model = local.load_model
    monkeypatch.setattr(local, "load_model", lambda *a, **k: pytest.fail("a finished run loaded its model"))
    again = local.run(config("gen.max_new_tokens=8", "progress=true"))  # progress is not part of the hash
    assert again.summary == first.summary and keys(again.records) == keys(first.records)
    monkeypatch.setattr(local, "load_model", real_load_model)

    # the config changed: the old records are not resumed but recomputed
    changed = local.run(config("gen.max_new_tokens=12"))
    assert all(r.new_tokens == 12 for r in changed.records) and len(changed.records) == 4
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["resumed_records"] == 0

    # overwrite=true recomputes a finished run
    summary_file = tmp_path / "run" / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "stale": True}))
    recomputed = local.run(config("gen.max_new_tokens=12", "overwrite=true"))
    assert "stale" not in json.loads(summary_file.read_text()) and len(recomputed.records) == 4
    assert [r.output_ids for r in recomputed.records] == [r.output_ids for r in changed.records]


def test_torn_last_line_is_dropped_and_a_torn_middle_line_is_an_error(tmp_path):
    record = make_record(
        method="ar",
        role="method",
        output_ids=[1, 2],
    )
    line = json.dumps(record.to_dict())
    path = tmp_path / "records.jsonl"
    path.write_text(f"{line}\n{line[:25]}")
    assert len(read_records(path)) == 1
    path.write_text(f"{line}\n{line[:25]}\n{line}\n")
    with pytest.raises(json.JSONDecodeError):
        read_records(path)


@pytest.mark.slow
def test_rerun_of_a_sweep_skips_finished_cells_and_resumes_unfinished_ones(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    command = [
        str(BIN / "decodebench"),
        "-m",
        *TINY,
        "method=ar,pld",
        "task.limit=2",
        "gen.max_new_tokens=8",
        f"data_dir={data_dir}",
        f"hydra.sweep.dir={sweep}",
    ]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    ar_dir = sweep / "gen.max_new_tokens=8,method=ar,model=tiny-llama,task.limit=2,threads=1,warmup=0"
    pld_dir = sweep / "gen.max_new_tokens=8,method=pld,model=tiny-llama,task.limit=2,threads=1,warmup=0"
    ar_manifest = (ar_dir / "manifest.json").read_text()
    original = read_records(pld_dir / "records.jsonl")
    assert len(original) == 8

    # the pld cell was killed: summary missing, 3 complete records and a torn fourth
    lines = (pld_dir / "records.jsonl").read_text().splitlines()
    (pld_dir / "records.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])
    (pld_dir / "summary.json").unlink()

    second = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "is complete (4 records): skipped" in second.stdout + second.stderr
    assert (ar_dir / "manifest.json").read_text() == ar_manifest  # untouched
    assert json.loads((pld_dir / "manifest.json").read_text())["resumed_records"] == 3
    resumed = read_records(pld_dir / "records.jsonl")
    assert keys(resumed) == keys(original) and [r.output_ids for r in resumed] == [r.output_ids for r in original]
    verdict = json.loads((sweep / "sweep.json").read_text())
    assert verdict["ok"] and verdict["counts"]["complete"] == 2
