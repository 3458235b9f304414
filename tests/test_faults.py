"""Faults injected into real runs, counted and printed (README, "Faults, measured").

Each test prints one ``FAULT`` line: what was injected, how often, and what came out. The runs use
tiny-llama (random weights, the embedded tokenizer), no warm-up, one thread and a few new tokens.
The SIGKILL-across-a-SLURM-array test lives in tests/test_faults_slurm.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from decodebench.records import Record
from decodebench.runners.run_dir import (
    CONFIG_SCHEMA,
    CorruptRecordsError,
    RecordsWriteError,
    RunDirectory,
    read_records,
)

from helpers import make_record

pytestmark = pytest.mark.embedded  # tiny-llama borrows the embedded model's tokenizer

BIN = Path(sys.executable).parent
TINY = ["model=tiny-llama", "warmup=0", "threads=1", "progress=false", "method=pld", "gen.max_new_tokens=6"]
# summary fields that do not depend on timing: equal between an interrupted and an uninterrupted run
DETERMINISTIC = (
    "method",
    "task",
    "model",
    "records",
    "errors",
    "new_tokens",
    "tau",
    "alpha",
    "lossless_rate",
    "per_position_acceptance",
    "quality",
    "token_match_rate",
    "first_divergence",
)


def cli(run_dir: Path, data_dir: Path, *args: str, env=None, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "decodebench"), *TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
        timeout=600,
        env=env,
        preexec_fn=preexec_fn,
    )


def keyed(records: list[Record]) -> dict[tuple, list[int]]:
    return {(r.role, r.sample_id, r.turn): r.output_ids for r in records}


def deterministic(summary: dict) -> dict:
    return {key: summary.get(key) for key in DETERMINISTIC} | {
        "baseline": {key: (summary.get("baseline") or {}).get(key) for key in DETERMINISTIC}
    }


def fault(name: str, trials: int, outcome: str) -> None:
    print(f"\nFAULT | {name} | {trials} | {outcome}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> Path:
    """An uninterrupted run: 4 two-turn MT-Bench samples x (baseline + pld) = 16 records."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = cli(run_dir, data_dir, "task.limit=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_disk_full_while_appending_is_a_clear_error_and_the_resume_recovers(reference, data_dir, tmp_path):
    """RLIMIT_FSIZE (the file-size limit; Python ignores SIGXFSZ, so writes fail with EFBIG) set
    between the size of the run's other files and that of its full records.jsonl: the run stops with
    a clear error, leaves only complete lines, and the same command without the limit finishes it."""
    expected = read_records(reference / "records.jsonl")
    full = (reference / "records.jsonl").stat().st_size
    others = max(p.stat().st_size for p in reference.rglob("*") if p.is_file() and p.name != "records.jsonl")
    assert others < full * 0.6, (others, full)
    limits = [others + (full - others) * share // 4 for share in (1, 2, 3)]
    stopped, torn, duplicated, lost, clear = 0, 0, 0, 0, 0
    for limit in limits:
        run_dir = tmp_path / f"limit-{limit}" / "run"
        run_dir.parent.mkdir()
        capped = cli(
            run_dir,
            data_dir,
            "task.limit=4",
            preexec_fn=lambda limit=limit: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        )
        stopped += capped.returncode != 0
        clear += "cannot append a record" in capped.stderr + capped.stdout and "file too large" in (
            capped.stderr + capped.stdout
        )
        raw = (run_dir / "records.jsonl").read_bytes()
        torn += not raw.endswith(b"\n")
        written = read_records(run_dir / "records.jsonl")
        assert 0 < len(written) < len(expected) and len(raw) <= limit
        resumed = cli(run_dir, data_dir, "task.limit=4")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        final = read_records(run_dir / "records.jsonl")
        duplicated += len(final) - len(keyed(final))
        lost += sum(keyed(final).get(key) != ids for key, ids in keyed(written).items())
        assert keyed(final) == keyed(expected)  # every record, same token ids as the uninterrupted run
        summary = json.loads((run_dir / "summary.json").read_text())
        assert deterministic(summary) == deterministic(json.loads((reference / "summary.json").read_text()))
    fault(
        "disk full while appending (RLIMIT_FSIZE at 3 points of records.jsonl)",
        len(limits),
        f"{stopped} stopped with a clear error ({clear} naming the file and cause), {torn} torn lines, "
        f"{lost} lost, {duplicated} duplicated after resume; summaries equal the uninterrupted run's",
    )
    assert stopped == clear == len(limits) and torn == lost == duplicated == 0


def test_disk_full_on_a_small_tmpfs_leaves_only_complete_lines(tmp_path):
    """A real ENOSPC: a 16 KiB tmpfs filled by appends; each failed append is cut back; after space
    is freed appending continues. Root only (mounting)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)], check=True)
    try:
        (mount / "filler").write_bytes(b"\0" * 4096)
        run_dir = RunDirectory(mount / "run")
        record = make_record(
            method="pld",
            role="method",
            sample_id="0",
            output_ids=list(range(40)),
            output_text="x" * 200,
        )
        appended, errors = 0, 0
        for turn in range(200):
            record.turn = turn
            try:
                run_dir.append_record(record)
                appended += 1
            except RecordsWriteError as error:
                errors += 1
                assert "No space left on device" in str(error) and "rerun the same command" in str(error)
                break
        raw = (mount / "run" / "records.jsonl").read_bytes()
        assert errors == 1 and raw.endswith(b"\n") and len(read_records(mount / "run" / "records.jsonl")) == appended
        (mount / "filler").unlink()
        record.turn = appended
        run_dir.append_record(record)
        final = read_records(mount / "run" / "records.jsonl")
        assert [r.turn for r in final] == list(range(appended + 1))
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    fault(
        "disk full on a 16 KiB tmpfs (ENOSPC)",
        1,
        f"{appended} records appended, then 1 clear error, "
        "0 torn lines; after freeing space the next append continues the file",
    )


CORRUPTIONS = {
    "cut mid-line": lambda line: line[: len(line) // 2],
    "garbage bytes": lambda line: b"#!%@ not json",
    "invalid UTF-8": lambda line: line[:20] + b"\xff\xfe" + line[22:],
    "zero-filled block": lambda line: b"\0" * len(line),
    "JSON array": lambda line: b"[1, 2, 3]",
    "object without record fields": lambda line: b'{"method": "pld"}',
}


@pytest.mark.slow
def test_a_corrupted_line_is_reported_with_its_line_number(reference, data_dir, tmp_path):
    """Every kind of corruption at the first, a middle and the last (complete) line: reading fails
    naming the file and the line; a resume refuses (exit 2) and leaves the file byte for byte."""
    lines = (reference / "records.jsonl").read_bytes().split(b"\n")[:-1]
    reported = 0
    trials = 0
    for corrupt in CORRUPTIONS.values():
        for number in (1, len(lines) // 2, len(lines)):
            trials += 1
            path = tmp_path / f"records-{trials}.jsonl"
            damaged = [corrupt(line) if i == number - 1 else line for i, line in enumerate(lines)]
            path.write_bytes(b"\n".join(damaged) + b"\n")
            with pytest.raises(CorruptRecordsError) as error:
                read_records(path)
            reported += f"{path}:{number}:" in str(error.value)
    # the CLI on a run dir with a corrupted middle line: a clear error, nothing dropped or rewritten
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "summary.json").unlink()  # an unfinished run: the resume reads its records
    middle = len(lines) // 2
    damaged = (
        b"\n".join(CORRUPTIONS["garbage bytes"](line) if i == middle - 1 else line for i, line in enumerate(lines))
        + b"\n"
    )
    (run_dir / "records.jsonl").write_bytes(damaged)
    resumed = cli(run_dir, data_dir, "task.limit=4")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 2 and f"records.jsonl:{middle}: not a JSON record" in output, output[-3000:]
    assert (run_dir / "records.jsonl").read_bytes() == damaged
    fault(
        "corrupted line in records.jsonl (6 kinds x first/middle/last line, + a CLI resume)",
        trials + 1,
        f"{reported}/{trials} reported with file:line, resume refused with exit 2 naming line {middle}, "
        "0 lines dropped",
    )
    assert reported == trials


@pytest.mark.slow
def test_a_run_dir_of_another_config_schema_is_refused(reference, data_dir, tmp_path):
    outcomes = []
    for schema in (CONFIG_SCHEMA - 1, CONFIG_SCHEMA + 1):
        run_dir = tmp_path / f"schema-{schema}" / "run"
        shutil.copytree(reference, run_dir)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["config_schema"] == CONFIG_SCHEMA
        (run_dir / "manifest.json").write_text(json.dumps({**manifest, "config_schema": schema}))
        before = (run_dir / "records.jsonl").read_bytes()
        refused = cli(run_dir, data_dir, "task.limit=4")
        output = refused.stdout + refused.stderr
        assert refused.returncode == 2 and f"config schema {schema}" in output, output[-3000:]
        assert ("an older" if schema < CONFIG_SCHEMA else "a newer") in output and "overwrite=true" in output
        assert (run_dir / "records.jsonl").read_bytes() == before
        outcomes.append(refused.returncode)
    # overwrite=true is the explicit way to discard them
    overwritten = cli(run_dir, data_dir, "task.limit=4", "overwrite=true")
    assert overwritten.returncode == 0, overwritten.stderr[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["config_schema"] == CONFIG_SCHEMA
    fault(
        "run dir of an older / a newer config schema",
        2,
        f"2 refused (exit {outcomes}) naming both schemas, records untouched; overwrite=true starts over",
    )


@pytest.mark.slow
def test_wandb_unreachable_in_online_mode_the_run_completes_and_says_so(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens
        "WANDB_API_KEY": "0" * 40,
        "WANDB_INIT_TIMEOUT": "10",
        "WANDB_SILENT": "true",
    }
    started = time.perf_counter()
    result = cli(run_dir, data_dir, "task.limit=1", "logger=wandb", env=env)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["records"] == 2 and summary["errors"] == 0 and len(read_records(run_dir / "records.jsonl")) == 4
    assert f"W&B logging failed for {run_dir}" in output and "127.0.0.1:9" in output
    fault(
        "W&B unreachable with WANDB_MODE=online",
        1,
        f"run completed (exit 0, 4 records, summary written) in {seconds:.0f} s and warned 'W&B logging failed'",
    )
