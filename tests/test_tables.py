"""Paper tables: Spec-Bench main table numbers, mean ± std cells, best value bold (never the
baseline, never a tie of all), booktabs LaTeX, numeric CSV, quality and cost tables."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from decodebench.analysis import tables
from decodebench.analysis.cost_model import cost_table, curves_for
from decodebench.analysis.frame import aggregate, load_frame


@pytest.fixture
def agg(analysis_sweep):
    return aggregate(load_frame([analysis_sweep]))


def test_main_table_numbers(agg):
    table = tables.main_table(agg, "tiny", "spec_bench")
    assert list(table.mean.columns) == [(g, m) for g in ("mt_bench", "qa", "overall") for m in ("speedup", "tau")]
    assert list(table.mean.index) == ["ar (baseline)", "ar", "pld[gpu]", "pld[paper]", "pld[cpu]", "skip"]
    assert table.mean.loc["pld[cpu]", ("overall", "speedup")] == pytest.approx(2.25)
    assert table.std.loc["pld[cpu]", ("qa", "speedup")] == pytest.approx(0.35355, abs=1e-4)
    best = table.best()
    assert best.loc["skip", ("overall", "speedup")] and not best.loc["pld[cpu]", ("overall", "speedup")]
    assert not best["overall"]["tau"].any() or best.loc["ar (baseline)"].sum() == 0


def test_markdown(agg):
    text = tables.render_markdown(tables.main_table(agg, "tiny", "spec_bench"))
    lines = text.splitlines()
    assert lines[0] == ("| Method | MT-Bench Speedup | MT-Bench τ | QA Speedup | QA τ | Overall Speedup | Overall τ |")
    assert "| pld[cpu] | 2.25 ± 0.35 | 1.80 ± 0.00 |" in text
    assert "| skip | **4.00** |" in text and "| pld[gpu] | - |" in text
    assert "**1.00" not in text  # the baseline is never best


def test_latex_booktabs(agg):
    text = tables.render_latex(tables.main_table(agg, "tiny", "spec_bench"))
    assert text.count(r"\toprule") == text.count(r"\midrule") == text.count(r"\bottomrule") == 1
    assert r"\begin{tabular}{lrrrrrr}" in text
    assert r"\multicolumn{2}{c}{MT-Bench}" in text and r"\cmidrule(lr){6-7}" in text
    assert r"Method & Speedup & $\tau$" in text
    assert r"skip & \textbf{4.00}" in text
    assert r"pld[cpu] & 2.25 {\scriptsize$\pm$0.35}" in text
    assert "spec\\_bench" in text.splitlines()[0]  # the title comment is escaped


def test_csv_is_numeric(agg):
    parsed = pd.read_csv(io.StringIO(tables.render_csv(tables.main_table(agg, "tiny", "spec_bench"))))
    assert list(parsed.columns[:4]) == ["method", "mt_bench speedup", "mt_bench speedup_std", "mt_bench tau"]
    pld = parsed[parsed["method"] == "pld[cpu]"].iloc[0]
    assert pld["overall speedup"] == 2.25 and pld["overall speedup_std"] == pytest.approx(0.3536, abs=1e-4)


def test_quality_and_cost_tables(agg, analysis_sweep):
    quality = tables.quality_table(agg, "tiny", "spec_bench")
    assert [m for _, m in quality.mean.columns] == ["speedup", "tau", "lossless_rate", "quality.exact_match"]
    text = tables.render_markdown(quality)
    assert "| Method | Speedup | τ | Lossless | exact_match |" in text
    assert "| skip | **4.00** | 1.80 | - | 0.50 |" in text
    assert (
        tables.quality_table(agg.drop(columns=[c for c in agg if c.startswith("quality.")]), "tiny", "spec_bench")
        is None
    )

    frame = load_frame([analysis_sweep])
    cost = tables.cost_table(cost_table(frame, curves_for(frame)), "tiny", "spec_bench")
    text = tables.render_markdown(cost)
    assert "| pld[cpu] | 2.00 | 1.50 | 0.10 | 1.25 | 2.57 | 2.22 | 22 | 9 | 67 | 2 |" in text
    assert "**" not in text and "latency_curve.json" in cost.notes[0]
    assert r"Overhead \%" in tables.render_latex(cost)
