"""Sweeps without SLURM: shards, shared baselines, the local_pool launcher, launcher configs, cell status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from decodebench.analysis.merge import shard_problems
from decodebench.analysis.report import load_records, report_table
from decodebench.config import ConfigValueError, compose_run_config, parse_shard, to_run_config
from decodebench.runners import local
from decodebench.runners.sweep import SweepOutcome, mark_cell, read_cells
from decodebench.tasks.base import Sample

BIN = Path(sys.executable).parent
TINY = ["model=tiny-llama", "warmup=0", "threads=1", "progress=false"]


def test_shards_are_strided_disjoint_and_cover_the_selection():
    samples = [Sample(str(i), "c", "g", ["q"]) for i in range(10)]
    slices = [local.select_shard(samples, f"{i}/3") for i in range(3)]
    assert [[s.sample_id for s in part] for part in slices] == [["0", "3", "6", "9"], ["1", "4", "7"], ["2", "5", "8"]]
    assert local.select_shard(samples, None) == samples
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ConfigValueError, match="invalid value for 'shard'"):
            to_run_config({"shard": bad})
    with pytest.raises(ConfigValueError, match="baseline_key"):
        to_run_config({"baseline": "shared"})


def write_run(run_dir: Path, **config) -> Path:
    run_dir.mkdir(parents=True)
    base = {
        "model": {"name": "m"},
        "method": {"name": "pld"},
        "task": {"name": "t"},
        "seed": 0,
        "run_dir": str(run_dir),
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**base, **config}))
    return run_dir


def test_shard_problems_name_missing_duplicated_and_overlapping_shards(tmp_path):
    complete = [write_run(tmp_path / f"a{i}", shard=f"{i}/3") for i in range(3)]
    assert shard_problems(complete) == []
    missing = [write_run(tmp_path / f"b{i}", seed=1, shard=f"{i}/3") for i in (0, 2)]
    assert shard_problems(missing) == [f"missing shard(s) 1/3 of: {', '.join(map(str, missing))}"]
    twice = [
        write_run(tmp_path / "c0", seed=2, shard="0/2"),
        write_run(tmp_path / "c1", seed=2, shard="0/2"),
        write_run(tmp_path / "c2", seed=2, shard="1/2"),
    ]
    assert any("duplicated shard(s) 0/2" in p for p in shard_problems(twice))
    mixed = [
        write_run(tmp_path / "d0", seed=3, shard="0/2"),
        write_run(tmp_path / "d1", seed=3, shard="1/2"),
        write_run(tmp_path / "d2", seed=3),
    ]
    assert any("sharded and unsharded" in p for p in shard_problems(mixed))
    other_method = [
        write_run(tmp_path / "e0", seed=4, shard="0/2"),
        write_run(tmp_path / "e1", seed=4, shard="1/2", method={"name": "ar"}),
    ]
    assert len(shard_problems(other_method)) == 2  # each method's family misses one shard


@pytest.mark.embedded
def test_shared_baseline_is_paired_only_on_the_same_node_type(tmp_path, data_dir):
    def run(name: str, *overrides: str):
        cfg = compose_run_config(
            [*TINY, "task.limit=2", "gen.max_new_tokens=8", "baseline_key=node-a", f"data_dir={data_dir}", *overrides]
        )
        cfg.run_dir = str(tmp_path / name)
        return local.run(cfg)

    ar = run("ar", "method=ar")
    pld = run("pld", "method=pld", "baseline=shared")
    assert {r.role for r in pld.records} == {"method"}  # no baseline measured in this run
    assert pld.summary["speedup"] is None

    table = report_table(load_records([ar.run_dir, pld.run_dir])).set_index(["method", "group"])
    method, baseline = table.loc[("pld[cpu]", "overall")], table.loc[("ar (baseline)", "overall")]
    expected = sum(r.wall_s for r in ar.records) / sum(r.wall_s for r in pld.records)
    assert method["speedup"] == pytest.approx(expected) and method["lossless_rate"] == 1.0
    assert baseline["records"] == 4  # the shared AR records count once

    # an AR run on another node type is never a baseline
    manifest_path = Path(ar.run_dir) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["hardware"]["cpu"] = "another CPU model"
    manifest_path.write_text(json.dumps(manifest))
    table = report_table(load_records([ar.run_dir, pld.run_dir])).set_index(["method", "group"])
    assert pd.isna(table.loc[("pld[cpu]", "overall")]["speedup"])
    assert ("ar (baseline)", "overall") not in table.index


def test_cell_status_and_sweep_verdict(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODEBENCH_SWEEP_ID", "current")
    mark_cell(tmp_path / "a", "running", ["method=ar"])
    mark_cell(tmp_path / "a", "complete", ["method=ar"])
    mark_cell(tmp_path / "b", "running", ["method=pld"])
    mark_cell(tmp_path / "b", "failed", ["method=pld"], ValueError("boom"))
    mark_cell(tmp_path / "c", "running", ["method=x"])  # killed: never finished
    monkeypatch.setenv("DECODEBENCH_SWEEP_ID", "older")
    mark_cell(tmp_path / "d", "failed", ["method=y"], ValueError("old failure"))
    outcome = SweepOutcome(tmp_path, read_cells(tmp_path, "current"))
    assert [c.status for c in outcome.cells] == ["complete", "failed", "running"]
    assert not outcome.ok
    text = outcome.describe()
    assert "1 of 3 cells complete, 1 failed, 1 unfinished" in text and "ValueError: boom" in text
    assert "old failure" not in text
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status["started"] and status["finished"] and "ValueError: boom" in status["traceback"]


def test_slurm_launcher_config_reads_cluster_specifics_from_conf_local(tmp_path):
    local_dir = tmp_path / "confdir" / "local"
    local_dir.mkdir(parents=True)
    (local_dir / "slurm.yaml").write_text("partition: gpu-a100\naccount: my-lab\ngpus_per_node: 1\n")
    composed = subprocess.run(
        [
            str(BIN / "decodebench"),
            "hydra/launcher=slurm",
            "--config-dir",
            str(tmp_path / "confdir"),
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    launcher = yaml.safe_load(composed.stdout)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["partition"], launcher["account"], launcher["gpus_per_node"]) == ("gpu-a100", "my-lab", 1)
    assert launcher["max_num_timeout"] >= 1 and launcher["array_parallelism"] >= 1  # DecodeBench's defaults
    plain = subprocess.run(
        [str(BIN / "decodebench"), "hydra/launcher=slurm", "--cfg", "hydra", "--package", "hydra.launcher"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    assert yaml.safe_load(plain.stdout)["partition"] is None  # conf/local/ is optional


@pytest.mark.embedded
@pytest.mark.slow
def test_local_pool_sweep_runs_cells_in_worker_processes(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            str(BIN / "decodebench"),
            "-m",
            "hydra/launcher=local_pool",
            "hydra.launcher.n_jobs=2",
            *TINY,
            "method=ar,pld",
            "shard=0/2",
            "task.limit=2",
            "gen.max_new_tokens=8",
            f"data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel" in result.stdout + result.stderr
    verdict = json.loads((sweep / "sweep.json").read_text())
    assert verdict["ok"] and verdict["counts"]["complete"] == 2
    assert sorted(p.parent.name for p in sweep.glob("*/summary.json")) == [
        f"gen.max_new_tokens=8,method={m},model=tiny-llama,shard=0_2,task.limit=2,threads=1,warmup=0"
        for m in ("ar", "pld")
    ]
    hosts = {json.loads(p.read_text())["hardware"]["hostname"] for p in sweep.glob("*/manifest.json")}
    assert len(hosts) == 1  # one machine ran both cells
    # the sweep prints the merged report; the shard holds 1 two-turn sample per method
    merged = [line for line in result.stdout.splitlines() if line.startswith("| tiny-llama") and "overall" in line]
    assert len(merged) == 3 and all("|         2 |" in line for line in merged), merged
    assert "missing shard(s) 1/2" in result.stdout + result.stderr  # the merge says the family is incomplete
