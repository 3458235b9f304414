"""Results the field can compare: metric definitions (τ, Spec-Bench's mean accepted tokens, α per
node vs per draft position, per-position and conditional acceptance), the seeded bootstrap over
prompts, latency percentiles, and the Spec-Bench export read back BY SPEC-BENCH'S LAYOUT (a reader
written from its evaluation/speed.py, not our code) plus the import of such files."""

from __future__ import annotations

import io
import json
import math
import random

import numpy as np
import pandas as pd
import pytest

from decodebench.analysis.frame import aggregate, load_frame
from decodebench.analysis.report import main
from decodebench.analysis.uncertainty import bootstrap_interval, latency_percentiles
from decodebench.engine.decode_loop import draft_depth
from decodebench.records import Record, prompt_totals, records_frame, summarize
from decodebench.runners.run_dir import RunDirectory

from helpers import make_record

SPEC_BENCH_GROUPS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag", "overall"]


# -- metric definitions ----------------------------------------------------------------------------


def test_tree_metrics_per_node_per_position_and_conditional():
    """Two tree steps: 5 nodes of depth 3 with 2 accepted, 4 nodes of depth 2 with 0 accepted; then a
    truncated last step. α per node = 2/9, per draft position = 2/5; position 1: 1 of 2 accepted,
    position 2: 1 of 2 (conditional on position 1: 1 of 1), position 3: 0 of 1 (given 2: 0 of 1)."""
    record = make_record(
        method="tree",
        role="method",
        new_tokens=6,
        wall_s=1.0,
        steps=4,
        drafted=9,
        accepted=2,
        drafted_lengths=[5, 4, 0],
        accepted_lengths=[2, 0, 0],
        draft_depths=[3, 2, 0],
        emitted_lengths=[3, 1, 1],
        tree_sizes=[6, 5, 1],
    )
    summary = summarize([record])
    assert summary.alpha == pytest.approx(2 / 9) and summary.alpha_per_token == pytest.approx(2 / 5)
    assert summary.per_position_acceptance == [0.5, 0.5, 0.0]
    assert summary.conditional_acceptance == [0.5, 1.0, 0.0]
    assert summary.tau == pytest.approx(6 / 4)  # prefill included
    assert summary.mean_accepted_tokens == pytest.approx(5 / 3)  # Spec-Bench: decode steps only
    assert (summary.drafted_per_step, summary.verified_per_step) == (3.0, 4.0)


def test_old_records_derive_depth_and_emitted():
    """Records without draft_depths / emitted_lengths: chains (depth = drafted), emitted = accepted + 1
    with the last step taking the rest, so mean accepted tokens = (new_tokens − 1) / (steps − 1)."""
    record = make_record(
        method="pld",
        role="method",
        new_tokens=9,
        wall_s=1.0,
        steps=4,
        drafted=7,
        accepted=4,
        drafted_lengths=[3, 3, 1],
        accepted_lengths=[3, 0, 1],
    )
    summary = summarize([record])
    assert summary.alpha_per_token == summary.alpha == pytest.approx(4 / 7)
    assert summary.mean_accepted_tokens == pytest.approx(8 / 3)


def test_draft_depth():
    assert draft_depth(None, 4) == 4
    assert draft_depth([-1, -1, 0, 2, 1], 5) == 3
    assert draft_depth([], 0) == 0


def test_ar_is_one_everywhere_and_shares_sum_to_one():
    ar = make_record(
        method="ar",
        role="baseline",
        new_tokens=5,
        wall_s=1.0,
        prefill_s=0.2,
        draft_s=0.0,
        verify_s=0.7,
        steps=5,
        drafted=0,
        accepted=0,
        drafted_lengths=[0] * 4,
        accepted_lengths=[0] * 4,
        emitted_lengths=[1] * 4,
    )
    summary = summarize([ar], [ar])
    assert (summary.speedup, summary.speedup_tps, summary.tau, summary.mean_accepted_tokens) == (1.0, 1.0, 1.0, 1.0)
    assert summary.alpha is None and summary.alpha_per_token is None
    assert summary.prefill_share + summary.draft_share + summary.verify_share + summary.overhead_share == pytest.approx(
        1.0
    )
    assert summary.overhead_share == pytest.approx(0.1)


# -- bootstrap -------------------------------------------------------------------------------------


def synthetic_totals(n: int, seed: int) -> pd.DataFrame:
    """Per-prompt totals of a method whose per-prompt speedup varies widely (0.8..2.5)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ar_wall = rng.uniform(1.0, 3.0)
        rows.append(
            {
                "sample_id": str(i),
                "ar_wall_s": ar_wall,
                "paired_wall_s": ar_wall / rng.uniform(0.8, 2.5),
                "new_tokens": 100.0,
                "steps": float(rng.randint(40, 100)),
            }
        )
    return pd.DataFrame(rows).set_index("sample_id")


def test_bootstrap_contains_point_shrinks_and_is_seeded():
    widths = []
    for n in (10, 40, 400):
        totals = synthetic_totals(n, seed=n)
        point = totals["ar_wall_s"].sum() / totals["paired_wall_s"].sum()
        low, high = bootstrap_interval([totals], "speedup")
        assert low < point < high
        tau_low, tau_high = bootstrap_interval([totals], "tau")
        assert tau_low < totals["new_tokens"].sum() / totals["steps"].sum() < tau_high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2] and widths[2] < widths[0] / 3  # ~1/sqrt(n)
    totals = synthetic_totals(40, seed=1)
    assert bootstrap_interval([totals], "speedup") == bootstrap_interval([totals], "speedup")
    assert bootstrap_interval([totals], "speedup", seed=1) != bootstrap_interval([totals], "speedup")


def test_bootstrap_over_repeats_uses_the_mean_of_repeats():
    first, second = synthetic_totals(30, seed=2), synthetic_totals(30, seed=2)
    second["paired_wall_s"] *= 2.0  # the second repeat is twice as slow: speedup halves
    point = np.mean([t["ar_wall_s"].sum() / t["paired_wall_s"].sum() for t in (first, second)])
    low, high = bootstrap_interval([first, second], "speedup")
    assert low < point < high
    single_low, single_high = bootstrap_interval([first], "speedup")
    assert high - low == pytest.approx(0.75 * (single_high - single_low), rel=1e-6)  # (1 + 1/2) / 2


def test_latency_percentiles():
    frame = pd.DataFrame(
        {
            "wall_s": [1.1, 2.1, 0.5],
            "prefill_s": [0.1, 0.1, 0.5],
            "new_tokens": [11, 11, 1],
            "error": [None, None, None],
        }
    )
    values = latency_percentiles(frame)  # 100 and 200 ms/token; the 1-token record has no decode
    assert values["latency_p50_ms"] == pytest.approx(150.0) and values["latency_p99_ms"] == pytest.approx(199.0)


# -- Spec-Bench export, read back by Spec-Bench's layout --------------------------------------------


def spec_bench_run(path, seed: int = 0) -> RunDirectory:
    """A run over 2 questions per Spec-Bench group (mt_bench ones two-turn), AR baseline + a drafter
    with per-step emitted / accepted lengths and varied times."""
    rng = random.Random(seed)
    run = RunDirectory(path)
    categories = {
        "mt_bench": "writing",
        "translation": "translation",
        "summarization": "summarization",
        "qa": "qa",
        "math_reasoning": "math_reasoning",
        "rag": "rag",
    }
    question = 81
    for group, category in categories.items():
        for _ in range(2):
            for turn in range(2 if group == "mt_bench" else 1):
                tokens = rng.randint(20, 60)
                base = Record(
                    method="ar",
                    role="baseline",
                    task="spec_bench",
                    model="m",
                    sample_id=str(question),
                    category=category,
                    group=group,
                    turn=turn,
                    seed=0,
                    new_tokens=tokens,
                    wall_s=tokens * rng.uniform(0.02, 0.03),
                    steps=tokens,
                    drafted=0,
                    accepted=0,
                    emitted_lengths=[1] * (tokens - 1),
                    output_text=f"answer {question} {turn}",
                )
                emitted, left = [], tokens - 1
                while left:
                    emitted.append(min(left, rng.randint(1, 5)))
                    left -= emitted[-1]
                accepted = [e - 1 for e in emitted]
                method = Record(
                    method="pld[cpu]",
                    role="method",
                    task="spec_bench",
                    model="m",
                    sample_id=str(question),
                    category=category,
                    group=group,
                    turn=turn,
                    seed=0,
                    new_tokens=tokens,
                    wall_s=base.wall_s / rng.uniform(0.9, 2.0),
                    steps=len(emitted) + 1,
                    drafted=sum(a + 2 for a in accepted),
                    accepted=sum(accepted),
                    drafted_lengths=[a + 2 for a in accepted],
                    accepted_lengths=accepted,
                    emitted_lengths=emitted,
                    lossless=True,
                    output_text=f"answer {question} {turn}",
                )
                run.append_record(base)
                run.append_record(method)
            question += 1
    return run


@pytest.fixture(scope="module")
def tokenizer_path():
    """The embedded model's folder (its tokenizer is what speed.py's --tokenizer-path would name)."""
    from decodebench.config import default_cache_dir
    from decodebench.tasks.speed_bench import context_tokenizer

    return context_tokenizer("smollm2-135m", default_cache_dir()).name_or_path


def speed_py(file_path, base_path, task, tokenizer):
    """What Spec-Bench's evaluation/speed.py computes for one task (category group), from its result
    layout: per question Σ new_tokens / Σ wall_time of choices[0]; accept_lengths pooled; the
    baseline's tokens recounted from its answer text, len(tokenizer(turn).input_ids) - 1 per turn;
    speedup = mean speed / mean baseline speed."""
    mt_bench_list = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]

    def questions(path):
        rows = [json.loads(line) for line in open(path, encoding="utf-8")]
        if task == "overall":
            return rows
        if task == "mt_bench":
            return [r for r in rows if r["category"] in mt_bench_list]
        return [r for r in rows if r["category"] == task]

    speeds, accept_lengths = [], []
    for datapoint in questions(file_path):
        choice = datapoint["choices"][0]
        accept_lengths.extend(choice["accept_lengths"])
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
    base_speeds = [
        sum(len(tokenizer(turn).input_ids) - 1 for turn in d["choices"][0]["turns"]) / sum(d["choices"][0]["wall_time"])
        for d in questions(base_path)
    ]
    return np.array(speeds).mean() / np.array(base_speeds).mean(), np.mean(accept_lengths)


def report_csv(capsys, *args) -> pd.DataFrame:
    assert main([*map(str, args), "--convention", "specbench", "--format", "csv"]) == 0
    return pd.read_csv(
        io.StringIO(capsys.readouterr().out),
        dtype={"speedup_tps": str, "mean_accepted_tokens": str},
        keep_default_na=False,
    )


@pytest.mark.embedded
def test_export_round_trips_through_spec_bench_layout(tmp_path, capsys, tokenizer_path):
    run = spec_bench_run(tmp_path / "run")
    out = tmp_path / "export"
    assert main([str(run.path), "--export-specbench", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pld[cpu]: 12 questions (0 left out)" in printed and "speed.py --file-path" in printed
    method_file = out / "run" / "m-pld-cpu.jsonl"
    base_file = out / "run" / "m-pld-cpu.baseline.jsonl"
    first = json.loads(method_file.read_text().splitlines()[0])
    assert set(first) == {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
    assert first["question_id"] == 81 and len(first["choices"][0]["turns"]) == 2
    assert set(first["choices"][0]) == {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    table = report_csv(capsys, run.path, "--tokenizer-path", tokenizer_path)
    pld = table[table["method"] == "pld[cpu]"].set_index("group")
    for group in SPEC_BENCH_GROUPS:
        speedup, accepted = speed_py(method_file, base_file, group, tokenizer)
        assert f"{speedup:.2f}" == pld.loc[group, "speedup_tps"], group
        assert f"{accepted:.2f}" == pld.loc[group, "mean_accepted_tokens"], group
    # the decodebench convention's Σ-wall speedup is a different number on these varied prompts
    assert main([str(run.path), "--format", "csv"]) == 0
    ours = pd.read_csv(io.StringIO(capsys.readouterr().out)).set_index(["method", "group"])
    assert ours.loc[("pld[cpu]", "overall"), "speedup"] != float(pld.loc["overall", "speedup_tps"])


@pytest.mark.embedded
def test_import_spec_bench_files_beside_runs(tmp_path, capsys, tokenizer_path):
    run = spec_bench_run(tmp_path / "run")
    assert main([str(run.path), "--export-specbench", str(tmp_path / "export")]) == 0
    capsys.readouterr()
    method_file, base_file = (
        tmp_path / "export" / "run" / "m-pld-cpu.jsonl",
        tmp_path / "export" / "run" / "m-pld-cpu.baseline.jsonl",
    )
    table = report_csv(
        capsys, run.path, "--import-specbench", method_file, base_file, "--tokenizer-path", tokenizer_path
    )
    imported = table[table["method"] == "m-pld[cpu] [Spec-Bench import]"].set_index("group")
    ours = table[table["method"] == "pld[cpu]"].set_index("group")
    assert list(imported.index) == SPEC_BENCH_GROUPS
    for group in SPEC_BENCH_GROUPS:
        assert imported.loc[group, "speedup_tps"] == ours.loc[group, "speedup_tps"]
        assert imported.loc[group, "mean_accepted_tokens"] == ours.loc[group, "mean_accepted_tokens"]
    assert "m-ar (baseline)" in set(table["method"])
    # import alone (no run dir), and into the paper tables
    assert main(["--import-specbench", str(method_file), str(base_file)]) == 0
    assert "[Spec-Bench import]" in capsys.readouterr().out
    assert main(["--import-specbench", str(method_file), str(base_file), "--convention", "specbench"]) == 2
    assert "give --tokenizer-path" in capsys.readouterr().err  # imported model: not in the catalogue
    paper = tmp_path / "paper"
    assert main([str(run.path), "--import-specbench", str(method_file), str(base_file), "--paper", str(paper)]) == 0
    tables = "\n".join(p.read_text() for p in (paper / "tables").glob("main_*.md"))
    assert "m-pld[cpu] [Spec-Bench import]" in tables and "pld[cpu]" in tables


def test_import_rejects_other_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "choices": [{"turns": ["x"]}]}) + "\n")
    assert main(["--import-specbench", str(bad), str(bad)]) == 2
    assert "not a Spec-Bench answer" in capsys.readouterr().err
    assert main([]) == 2
    assert "--import-specbench" in capsys.readouterr().err


def test_report_tables_carry_intervals(tmp_path, capsys):
    run = spec_bench_run(tmp_path / "run")
    agg = aggregate(load_frame([run.path]))
    pld = agg[agg["method"] == "pld[cpu]"]
    assert ((pld["speedup_lo"] <= pld["speedup"]) & (pld["speedup"] <= pld["speedup_hi"])).all()
    assert ((pld["tau_lo"] <= pld["tau"]) & (pld["tau"] <= pld["tau_hi"])).all()
    assert main([str(run.path), "--table", "speed"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "speedup 95% CI" in header and "tau 95% CI" in header
    assert main([str(run.path), "--table", "latency"]) == 0
    out = capsys.readouterr().out
    assert "latency_p50_ms" in out and "latency_p99_ms" in out and "| pld[cpu]" in out
    # reproducible: the same table twice
    assert main([str(run.path), "--format", "csv"]) == 0
    once = capsys.readouterr().out
    assert main([str(run.path), "--format", "csv"]) == 0
    assert capsys.readouterr().out == once and not math.isnan(pld["speedup_lo"].iloc[0])


def test_records_frame_joins_baseline():
    a = make_record(
        method="ar",
        role="baseline",
        new_tokens=4,
        wall_s=2.0,
        steps=4,
    )
    m = make_record(
        method="x",
        role="method",
        new_tokens=4,
        wall_s=1.0,
        steps=2,
    )
    totals = prompt_totals(records_frame([m], [a]))
    assert (
        totals.loc["1", "ar_wall_s"] == 2.0 and totals.loc["1", "speed"] == 4.0 and totals.loc["1", "ar_speed"] == 2.0
    )


def test_figure_error_bars_are_the_intervals():
    from decodebench.analysis.plots import interval_errors

    rows = pd.DataFrame(
        {
            "group": ["qa", "overall"],
            "speedup": [1.5, 1.2],
            "speedup_lo": [1.2, math.nan],
            "speedup_hi": [1.9, math.nan],
        }
    ).set_index("group")
    errors = interval_errors(rows, "speedup", ["qa", "overall"])
    assert errors[:, 0] == pytest.approx([0.3, 0.4]) and list(errors[:, 1]) == [0.0, 0.0]
