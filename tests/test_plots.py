"""Figures: each plot writes a PNG and a PDF from the synthetic sweep, and returns None when the
data has nothing to show."""

from __future__ import annotations

import pytest

from decodebench.analysis import plots
from decodebench.analysis.cost_model import cost_table, curves_for
from decodebench.analysis.frame import aggregate, load_frame


@pytest.fixture
def data(analysis_sweep):
    frame = load_frame([analysis_sweep])
    return frame, aggregate(frame), cost_table(frame, curves_for(frame))


def check(figure, name):
    assert figure is not None and figure.name == name
    assert figure.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.png.stat().st_size > 5000
    assert figure.pdf.read_bytes()[:5] == b"%PDF-"
    assert figure.title and figure.caption


def test_every_figure(data, tmp_path):
    frame, agg, cost = data
    check(plots.speedup_by_group(agg, "tiny", "spec_bench", tmp_path, "bars"), "bars")
    check(plots.tau_vs_speedup(agg, cost, "tiny", "spec_bench", tmp_path, "tau"), "tau")
    check(plots.tau_vs_speedup(agg, None, "tiny", "spec_bench", tmp_path, "tau_nocost"), "tau_nocost")
    check(plots.acceptance_curves(agg, "tiny", "spec_bench", tmp_path, "acceptance"), "acceptance")
    pareto = plots.pareto(agg, "tiny", "spec_bench", tmp_path, "pareto")
    check(pareto, "pareto")
    assert "Filled: lossy" in pareto.caption and "exact_match" in pareto.title
    check(plots.latency_distribution(frame, "tiny", "spec_bench", tmp_path, "latency"), "latency")


def test_nothing_to_show(data, tmp_path):
    frame, agg, _ = data
    assert plots.speedup_by_group(agg, "tiny", "other_task", tmp_path, "x") is None
    only_ar = agg[agg["method"].str.startswith("ar")]
    assert plots.acceptance_curves(only_ar, "tiny", "spec_bench", tmp_path, "x") is None
    assert plots.tau_vs_speedup(only_ar, None, "tiny", "spec_bench", tmp_path, "x") is None
    no_quality = agg.drop(columns=[c for c in agg if c.startswith("quality.")])
    assert plots.pareto(no_quality, "tiny", "spec_bench", tmp_path, "x") is None
    assert plots.latency_distribution(frame, "other", "spec_bench", tmp_path, "x") is None
    assert not list(tmp_path.glob("x.*"))
