"""``logger=wandb`` in offline mode: the files W&B writes are read back and compared with the run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from decodebench.runners.run_dir import read_records
from decodebench.runners.wandb_logger import summary_metrics

pytestmark = [pytest.mark.embedded, pytest.mark.slow]  # tiny-llama borrows the embedded model's tokenizer

BIN = Path(sys.executable).parent


def inspect(run_folder: Path, *flags: str) -> str:
    """``wandb leet inspect`` (wandb's own reader of the offline ``.wandb`` log)."""
    return subprocess.run(
        [str(BIN / "wandb"), "leet", "inspect", *flags, str(run_folder)], capture_output=True, text=True, check=True
    ).stdout


def without_empty(mapping: dict) -> dict:
    return {k: without_empty(v) if isinstance(v, dict) else v for k, v in mapping.items() if v != {}}


def test_wandb_offline_run_holds_config_records_summary_and_report(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # never upload from a test
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [
            str(BIN / "decodebench"),
            "-m",
            "logger=wandb",
            "logger.tags=[ci]",
            "model=tiny-llama",
            "method=ar,pld",
            "task.limit=2",
            "gen.max_new_tokens=8",
            "warmup=0",
            "threads=1",
            "progress=false",
            f"data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    run_dirs = sorted(p.parent for p in sweep.glob("*/summary.json"))
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        folders = list((run_dir / "wandb").glob("offline-run-*"))
        assert len(folders) == 1, folders  # offline: files in the run dir, one W&B run per DecodeBench run
        folder = folders[0]
        logged = json.loads(inspect(folder, "--summary", "--json"))
        summary = json.loads((run_dir / "summary.json").read_text())
        config = yaml.safe_load((run_dir / "config.yaml").read_text())

        assert logged["state"] == "finished" and logged["project"] == "decodebench" and logged["name"] == run_dir.name
        expected = summary_metrics(summary)
        assert {"tau", "tokens_per_s", "records", "errors"} <= expected.keys()
        for name, value in expected.items():
            assert logged["summary"][name] == pytest.approx(value), name
        assert logged["config"]["method"] == without_empty(config["method"])  # W&B drops empty mappings
        assert logged["config"]["gen"] == without_empty(config["gen"])
        assert logged["config"]["task"]["limit"] == 2 and logged["config"]["model"]["name"] == "tiny-llama"
        method = config["method"]["name"]
        assert {method, summary["method"], "spec_bench", "tiny-llama", "ci"} <= set(logged["tags"])

        run_record = next(
            json.loads(line)["run"]
            for line in inspect(folder, "--json").splitlines()
            if json.loads(line).get("type") == "run"
        )
        assert run_record["run_group"] == sweep.name  # runs grouped by sweep

        # per-record table: one row per record, values equal records.jsonl
        table = json.loads((folder / "files" / logged["summary"]["records_table"]["path"]).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        records = read_records(run_dir / "records.jsonl")
        assert [(r["role"], r["sample_id"], r["turn"], r["new_tokens"], r["output_sha"]) for r in rows] == [
            (r.role, r.sample_id, r.turn, r.new_tokens, r.output_sha) for r in records
        ]
        assert [r["wall_s"] for r in rows] == pytest.approx([r.wall_s for r in records])
        # the per-group report and its speedup plot were logged too
        report = json.loads((folder / "files" / logged["summary"]["report_table"]["path"]).read_text())
        overall = [dict(zip(report["columns"], row)) for row in report["data"] if "overall" in row]
        assert {row["method"] for row in overall} == {summary["method"], *(["ar (baseline)"] if method != "ar" else [])}
        assert list((folder / "files" / "media" / "table").glob("speedup_by_group_*.table.json"))
        if method == "pld":
            assert logged["summary"]["speedup"] == pytest.approx(summary["speedup"])
            assert logged["summary"]["lossless_rate"] == 1.0
            assert logged["summary"]["baseline/tokens_per_s"] == pytest.approx(summary["baseline"]["tokens_per_s"])
