"""Report: exact numbers from synthetic run dirs, the three formats, torn lines, CLI exit codes."""

import io
import json

import pandas as pd
import pytest

from decodebench.analysis.report import (
    find_run_dirs,
    load_records,
    main,
    method_stats_table,
    render,
    report_table,
    wide_table,
)
from decodebench.records import Record
from decodebench.registry import DecodeBenchError


def record(
    method,
    role,
    sample_id,
    group,
    turn,
    new_tokens=None,
    wall_s=None,
    steps=None,
    drafted=None,
    accepted=None,
    lossless=None,
    error=None,
) -> Record:
    return Record(
        method=method,
        role=role,
        task="spec_bench",
        model="tiny",
        sample_id=sample_id,
        category="writing" if group == "mt_bench" else group,
        group=group,
        turn=turn,
        seed=0,
        new_tokens=new_tokens,
        wall_s=wall_s,
        steps=steps,
        drafted=drafted,
        accepted=accepted,
        lossless=lossless,
        error=error,
    )


def baseline(walls):
    """AR baseline over (81, turn 0), (81, turn 1) [mt_bench], 401, 402 [qa]: 10/20/30/10 tokens."""
    keys = [("81", "mt_bench", 0, 10), ("81", "mt_bench", 1, 20), ("401", "qa", 0, 30), ("402", "qa", 0, 10)]
    return [
        record("ar", "baseline", sid, group, turn, tokens, wall, tokens)
        for (sid, group, turn, tokens), wall in zip(keys, walls)
    ]


PLD_RUN = baseline([1.0, 2.0, 3.0, 1.0]) + [
    record("pld", "method", "81", "mt_bench", 0, 10, 0.5, 4, 10, 6, True),
    record("pld", "method", "81", "mt_bench", 1, 20, 1.5, 10, 20, 10, True),
    record("pld", "method", "401", "qa", 0, 30, 1.0, 10, 30, 20, True),
    record("pld", "method", "402", "qa", 0, error="RuntimeError: boom"),
]
# A second run of the sweep with its OWN (slower) baseline: pairing must stay within the run dir.
LADE_RUN = baseline([2.0, 2.0, 3.0, 1.0]) + [
    record("lade", "method", "81", "mt_bench", 0, 10, 0.8, 5, 8, 5, True),
    record("lade", "method", "81", "mt_bench", 1, 20, 1.0, 10, 16, 10, True),
    record("lade", "method", "401", "qa", 0, 30, 1.5, 15, 30, 15, False),
    record("lade", "method", "402", "qa", 0, 10, 0.5, 5, 10, 5, True),
]


def write_run(run_dir, records, tail=""):
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps(r.to_dict()) + "\n" for r in records)
    (run_dir / "records.jsonl").write_text(lines + tail)
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    write_run(tmp_path / "sweep" / "0", PLD_RUN)
    write_run(tmp_path / "sweep" / "1", LADE_RUN)
    return tmp_path / "sweep"


def row(table, method, group):
    found = table[(table["method"] == method) & (table["group"] == group)]
    assert len(found) == 1
    return found.iloc[0]


def test_long_table_numbers(sweep):
    assert [d.name for d in find_run_dirs(sweep)] == ["0", "1"]
    table = report_table(load_records(find_run_dirs(sweep)))
    assert list(table["method"].unique()) == ["ar (baseline)", "pld", "lade"]
    assert list(table["group"].unique()) == ["mt_bench", "qa", "overall"]

    pld = row(table, "pld", "mt_bench")
    assert pld.speedup == pytest.approx(3.0 / 2.0)
    assert pld.tau == pytest.approx(30 / 14)
    assert pld.alpha == pytest.approx(16 / 30)
    assert pld.tokens_per_s == pytest.approx(15.0)
    assert (pld.lossless_rate, pld.records, pld.errors) == (1.0, 2, 0)

    pld_qa = row(table, "pld", "qa")  # the errored record is left out of every metric
    assert (pld_qa.speedup, pld_qa.tau, pld_qa.records, pld_qa.errors) == (3.0, 3.0, 2, 1)
    assert pld_qa.alpha == pytest.approx(20 / 30)

    pld_all = row(table, "pld", "overall")
    assert (pld_all.speedup, pld_all.tau, pld_all.alpha, pld_all.tokens_per_s) == (2.0, 2.5, 0.6, 20.0)
    # Spec-Bench's speedup: per question Σ tokens / Σ wall (81: 30/2.0, 401: 30/1.0; AR 10 and 10)
    assert pld_all.speedup_tps == pytest.approx(((15 + 30) / 2) / 10)
    assert (pld_all.records, pld_all.errors) == (4, 1)

    lade = row(table, "lade", "mt_bench")  # against run 1's baseline (4.0 s), not run 0's (3.0 s)
    assert lade.speedup == pytest.approx(4.0 / 1.8)
    assert row(table, "lade", "qa").lossless_rate == 0.5
    assert row(table, "lade", "overall").speedup == pytest.approx(8.0 / 3.8)

    base = row(table, "ar (baseline)", "mt_bench")  # both runs' baselines: one repeat each, mean over them
    assert (base.speedup, base.tau, base.records) == (1.0, 1.0, 4)
    assert base.tokens_per_s == pytest.approx((30 / 3 + 30 / 4) / 2)
    assert pd.isna(base.alpha) and pd.isna(base.lossless_rate)


def test_method_without_baseline_has_no_speedup(tmp_path):
    run = write_run(tmp_path / "run", [r for r in PLD_RUN if r.role == "method"])
    table = report_table(load_records([run]))
    assert table["speedup"].isna().all() and row(table, "pld", "overall").tau == 2.5


def test_formats(sweep):
    table = report_table(load_records(find_run_dirs(sweep)))
    markdown = render(table, "md")
    assert markdown.splitlines()[0].startswith("| model") and "| pld " in markdown and " 1.50 |" in markdown
    assert "nan" not in markdown

    latex = render(table, "latex")
    assert "\\toprule" in latex and "\\bottomrule" in latex and "math\\_reasoning" not in latex
    assert "\\textbf{2.22}" in latex and "\\textbf{3.00}" in latex  # best per group: lade mt, pld qa
    assert "\\textbf{1.00}" not in latex  # the baseline is never "best"
    assert "ar (baseline)" in latex and "tokens\\_per\\_s" in latex
    # speedup, its interval (text), speedup_tps, tau, its interval, alpha, tokens/s, lossless, records, errors
    assert "\\begin{tabular}{llll" + "rlrrlrrrrr" + "}" in latex and "[2.00, 2.00]" in latex

    parsed = pd.read_csv(io.StringIO(render(table, "csv")))
    assert list(parsed.columns) == list(table.columns)
    assert parsed.loc[(parsed["method"] == "pld") & (parsed["group"] == "overall"), "speedup"].item() == 2.0


def test_wide_layout(sweep):
    wide = wide_table(report_table(load_records(find_run_dirs(sweep))))
    assert list(wide[("method", "")]) == ["ar (baseline)", "pld", "lade"]
    assert wide.loc[1, ("mt_bench", "speedup")] == pytest.approx(1.5)
    assert wide.loc[2, ("overall", "tau")] == pytest.approx(70 / 35)
    assert "mt_bench speedup" in render(wide, "md").splitlines()[0]
    assert "\\textbf{2.22}" in render(wide, "latex")
    assert (
        render(wide, "csv")
        .splitlines()[0]
        .startswith("model,task,method,mt_bench speedup,mt_bench speedup_lo,mt_bench speedup_hi,mt_bench tau")
    )
    assert "mt_bench speedup 95% CI" in render(wide, "md").splitlines()[0]


def test_torn_last_line_is_skipped(tmp_path, sweep):
    torn = write_run(tmp_path / "torn", PLD_RUN, tail='{"method": "pld", "ro')
    assert len(load_records([torn])) == len(PLD_RUN)
    (torn / "records.jsonl").write_text('{"method": \n' + json.dumps(PLD_RUN[0].to_dict()) + "\n")
    with pytest.raises(DecodeBenchError, match="records.jsonl:1"):
        load_records([torn])


def test_cli(sweep, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no records.jsonl found" in capsys.readouterr().err
    write_run(tmp_path / "blank", [])
    assert main([str(tmp_path / "blank")]) == 2
    assert "no records in" in capsys.readouterr().err

    output = tmp_path / "out" / "table.tex"
    assert main([str(sweep), "--format", "latex", "--layout", "wide", "--output", str(output)]) == 0
    assert "\\toprule" in output.read_text()
    assert main([str(sweep / "0")]) == 0
    assert "| pld " in capsys.readouterr().out


def test_method_stats_table_and_section(tmp_path, capsys):
    """Drafters' own counters (e.g. DEL's exit layers) are averaged per method over the records that
    report them; baselines and runs without counters add no row; the CLI prints the section."""
    import dataclasses

    stats = [{"exit_layer": 4.0, "exit_layer_min": 2.0}, {"exit_layer": 6.0, "exit_layer_min": 4.0}, None]
    del_records = [dataclasses.replace(r, method="del", method_stats=s) for r, s in zip(PLD_RUN[4:7], stats)]
    run = write_run(tmp_path / "del", baseline([1.0, 2.0, 3.0, 1.0]) + del_records)
    write_run(tmp_path / "pld", PLD_RUN)
    table = method_stats_table(load_records(find_run_dirs(tmp_path)))
    assert list(table["method"]) == ["del"]
    assert table.iloc[0]["records"] == 2
    assert table.iloc[0]["exit_layer"] == pytest.approx(5.0) and table.iloc[0]["exit_layer_min"] == pytest.approx(3.0)
    assert main([str(run), "--table", "stats"]) == 0
    out = capsys.readouterr().out
    assert "Method statistics" in out and "exit_layer" in out and "5.00" in out
    assert main([str(tmp_path / "pld"), "--table", "stats"]) == 0
    assert capsys.readouterr().out == ""
