"""The paper folder in one command (decodebench-report --paper, make paper) and the main-table
experiment config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd

from decodebench.analysis.report import main
from decodebench.config import compose_run_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_folder(analysis_sweep, tmp_path, capsys):
    out = tmp_path / "paper"
    assert main([str(analysis_sweep), "--paper", str(out)]) == 0
    assert f"{out / 'index.md'} (13 tables, 5 figures)" in capsys.readouterr().out  # + per-token latency
    index = (out / "index.md").read_text()
    for suffix in ("md", "tex", "csv"):
        assert (out / "tables" / f"main_spec_bench_tiny.{suffix}").is_file()
        assert (out / "tables" / f"quality_spec_bench_tiny.{suffix}").is_file()
        assert (out / "tables" / f"cost_spec_bench_tiny.{suffix}").is_file()
        assert (out / "tables" / f"latency_spec_bench_tiny.{suffix}").is_file()
    for name in ("speedup_by_group", "tau_vs_speedup", "acceptance", "pareto", "latency"):
        assert (out / "figures" / f"{name}_spec_bench_tiny.pdf").is_file()
    # every link in the index resolves
    links = re.findall(r"\]\(([^)]+)\)", index)
    assert len(links) >= 20 and all((out / link).is_file() for link in links)
    assert "![Speedup per category group](figures/speedup_by_group_spec_bench_tiny.png)" in index
    assert "| pld[cpu] | 2.25 ± 0.35 | 1.80 ± 0.00 |" in index
    assert "## Lossless audit" in index and "## Provenance" in index and "0123456789" in index
    assert len(pd.read_parquet(out / "records.parquet")) == 18
    header = (out / "aggregate.csv").read_text().splitlines()[0]
    assert "per_position_acceptance" in header and "conditional_acceptance" in header and "speedup_lo" in header
    assert "p99 ms/token" in index


def test_paper_with_curve_option_and_errors(analysis_sweep, tmp_path, capsys):
    curve = analysis_sweep / "pld_s0" / "latency_curve.json"
    out = tmp_path / "paper"
    assert main([str(analysis_sweep / "skip"), "--paper", str(out), "--curve", str(curve)]) == 0
    assert "No verify-latency curve" not in (out / "index.md").read_text()
    assert main([str(analysis_sweep / "skip"), "--paper", str(tmp_path / "p2")]) == 0
    assert "No verify-latency curve" in (tmp_path / "p2" / "index.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--paper", str(tmp_path / "p3")]) == 2
    assert "no records.jsonl found" in capsys.readouterr().err


def test_make_paper_target():
    dry = subprocess.run(
        ["make", "-n", "paper", "SWEEP=results/x", "CURVE=c.json"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "decodebench-report results/x --paper results/x/paper --curve c.json" in dry
    missing = subprocess.run(["make", "paper"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and "usage: make paper SWEEP=" in missing.stderr


def test_main_table_experiment_composes_every_method():
    text = (ROOT / "conf" / "experiment" / "main_table.yaml").read_text()
    methods = re.search(r"method: (\S+)", text.split("params:")[1]).group(1).split(",")
    assert {"ar", "pld", "token_recycling", "lookahead", "lade", "suffix", "aded"} <= set(methods)
    for method in methods:
        cfg = compose_run_config(["experiment=main_table", f"method={method}"])
        assert (cfg.model.name, cfg.task.name, cfg.task.per_category, cfg.device) == (
            "smollm2-135m",
            "spec_bench",
            None,
            "cpu",
        )
        assert cfg.gen.temperature == 0.0 and cfg.gen.max_new_tokens == 128 and cfg.baseline == "ar"
        assert cfg.method.label(cfg.device) == (method if method == "ar" else f"{method}[cpu]")


def test_qwen_pair_experiment_composes_every_cell():
    """experiment=qwen_pair: draft-model methods on the Qwen pair, greedy and T = 1.0."""
    for method in ("sps", "dyspec", "specdec_pp"):
        for gen, temperature in (("greedy", 0.0), ("sampling", 1.0)):
            cfg = compose_run_config(["experiment=qwen_pair", f"method={method}", f"gen={gen}"])
            assert (cfg.model.name, cfg.model.draft, cfg.task.name, cfg.task.per_category) == (
                "qwen2.5-coder-1.5b",
                "qwen2.5-coder-0.5b",
                "spec_bench",
                1,
            )
            assert cfg.gen.temperature == temperature and cfg.gen.max_new_tokens == 64
