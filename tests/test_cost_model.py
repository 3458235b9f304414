"""Cost model: both curve formats, interpolation, exact predictions on the synthetic sweep
(tests/conftest.py ``analysis_sweep``), curve lookup order (option > run dir), the report section."""

from __future__ import annotations

import json
import math

import pytest

from decodebench.analysis.cost_model import cost_table, curve_for_run, curves_for, load_curve, parse_curve
from decodebench.analysis.frame import load_frame
from decodebench.analysis.report import main
from decodebench.registry import DecodeBenchError

# benchmarks/profile_verify.py's older format
OLD_FORMAT = {
    "model": "tiny",
    "context": 200,
    "threads": 2,
    "hardware": {"device": "cpu", "cpu": "TestCPU"},
    "seconds": {"1": 0.1, "4": 0.2, "2": 0.12},
}


def test_curve_formats_and_interpolation(analysis_builders):
    curve = parse_curve(analysis_builders.curve)
    assert (curve.model, curve.device, curve.threads, curve.t1_s) == ("tiny", "cpu", 2, 0.1)
    assert curve.ratio_at(3) == 1.5 and curve.ratio_at(2.5) == pytest.approx(1.35)
    assert curve.ratio_at(6) == pytest.approx(3.0)  # extrapolated from (3, 1.5)-(4, 2.0)

    old = parse_curve(OLD_FORMAT)
    assert old.k == [1, 2, 4] and old.ratio == pytest.approx([1.0, 1.2, 2.0]) and old.device == "cpu"
    assert old.ms == pytest.approx([100.0, 120.0, 200.0])
    assert parse_curve({"k": [1, 2], "ms": [10.0, 15.0]}).ratio == [1.0, 1.5]  # ratio from ms
    with pytest.raises(DecodeBenchError, match="not a verify-latency curve"):
        parse_curve({"model": "x"})
    with pytest.raises(DecodeBenchError, match="needs 'ratio'"):
        parse_curve({"k": [2, 4], "ms": [1.0, 2.0]})


def row(table, method):
    found = table[(table["method"] == method) & (table["group"] == "overall")]
    assert len(found) == 1
    return found.iloc[0]


def test_prediction_and_breakdown(analysis_sweep):
    frame = load_frame([analysis_sweep])
    curves = curves_for(frame)  # only sweep/pld_s0 carries latency_curve.json
    assert [d.rsplit("/", 1)[1] for d, c in curves.items() if c] == ["pld_s0"]
    table = cost_table(frame, curves)
    pld = row(table, "pld[cpu]")
    # per record: 8 decode tokens in 4 steps of k=3 (ratio 1.5), 0.04 s draft, T(1) = 0.8 s / 8 = 0.1 s
    assert pld.tokens_per_step == 2.0 and pld.verify_ratio == 1.5 and pld.draft_share == pytest.approx(0.1)
    assert pld.predicted_speedup == pytest.approx(8 / (6 + 0.4))
    assert pld.t1_ms == pytest.approx(100.0)
    # measured over both repeats: decode AR 4 x 0.9 s, method 2 x 0.4 + 2 x 0.3 s
    assert pld.measured_decode_speedup == pytest.approx(3.6 / 1.4)
    assert pld.measured_speedup == pytest.approx(4.0 / 1.8)
    assert (pld.prefill_frac, pld.draft_frac, pld.verify_frac, pld.overhead_frac) == pytest.approx(
        (0.4 / 1.8, 0.16 / 1.8, 1.2 / 1.8, 0.04 / 1.8)
    )
    assert pld.predicted_verify_s == pytest.approx(2 * 6 * 0.1)  # only pld_s0's records have a curve
    assert row(table, "ar (baseline)").predicted_speedup == pytest.approx(1.0)
    assert math.isnan(row(table, "skip").predicted_speedup)  # no curve in its run


def test_curve_option_wins_and_folder_search(analysis_sweep, tmp_path, analysis_builders):
    other = dict(analysis_builders.curve, ratio=[1.0, 1.1, 1.2, 1.3])
    (tmp_path / "curve.json").write_text(json.dumps(other))
    assert curve_for_run(analysis_sweep / "pld_s0", tmp_path / "curve.json").ratio == other["ratio"]
    assert curve_for_run(analysis_sweep / "pld_s0").ratio == [1.0, 1.2, 1.5, 2.0]
    assert curve_for_run(analysis_sweep / "skip") is None

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "a.json").write_text(json.dumps(dict(other, model="another")))
    (profiles / "b.json").write_text(json.dumps(dict(other, threads=8)))
    (profiles / "c.json").write_text(json.dumps(other))
    assert curve_for_run(analysis_sweep / "skip", profiles).source.endswith("c.json")

    frame = load_frame([analysis_sweep])
    table = cost_table(frame, curves_for(frame, tmp_path / "curve.json"))
    assert row(table, "skip").predicted_speedup == pytest.approx(8 / (4 * 1.2 + 0.4))
    # pld_nobase has no AR records of its own: T(1) is the curve's 100 ms
    assert row(table, "pld[paper]").predicted_speedup == pytest.approx(8 / (4 * 1.2 + 0.4))
    with pytest.raises(DecodeBenchError, match="cannot read"):
        load_curve(tmp_path / "missing.json")


def test_report_cost_section(analysis_sweep, tmp_path, capsys):
    assert main([str(analysis_sweep / "pld_s0"), "--table", "cost"]) == 0
    out = capsys.readouterr().out
    assert "predicted_speedup" in out and "| pld[cpu]" in out and "1.25" in out
    assert main([str(analysis_sweep / "skip"), "--table", "cost"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no verify-latency curve" in captured.err
    assert main([str(analysis_sweep / "skip")]) == 0  # "all" without a curve: no cost section, no warning
    assert "predicted" not in capsys.readouterr().out
    assert (
        main(
            [
                str(analysis_sweep / "skip"),
                "--format",
                "csv",
                "--table",
                "cost",
                "--curve",
                str(analysis_sweep / "pld_s0" / "latency_curve.json"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("model,task,method,tokens_per_step")
