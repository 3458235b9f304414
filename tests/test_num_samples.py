"""gen.num_samples: several samples per problem through the runner (ids, seeds, back-to-back order
that carries STAND's problem memory, majority vote in the summary, resume per record). The
validation errors are in tests/test_cli.py, the aggregates by hand in tests/test_quality.py."""

from __future__ import annotations

import json

import pytest

from decodebench.config import compose_run_config
from decodebench.records import problem_totals, prompt_totals, records_frame
from decodebench.runners import local

pytestmark = pytest.mark.embedded  # tiny-llama borrows the embedded model's tokenizer

TINY = ["model=tiny-llama", "warmup=0", "threads=1", "progress=false"]
PROBLEMS, SAMPLES = ("0", "1"), 3


def config(run_dir, data_dir):
    cfg = compose_run_config(
        [
            *TINY,
            "method=stand",
            "task=gsm8k",
            f"task.limit={len(PROBLEMS)}",
            f"gen.num_samples={SAMPLES}",
            "gen.temperature=0.7",
            "gen.max_new_tokens=12",
            f"data_dir={data_dir}",
        ]
    )
    cfg.run_dir = str(run_dir)
    return cfg


def test_samples_run_back_to_back_with_own_seeds_carry_stand_memory_and_resume(tmp_path, data_dir, monkeypatch):
    streams = []  # (seed, sample_id, turn) of every timed generation's RNG, in order
    real_generator = local.record_generator

    def logged_generator(seed, sample_id, turn, device):
        streams.append((seed, sample_id, turn))
        return real_generator(seed, sample_id, turn, device)

    monkeypatch.setattr(local, "record_generator", logged_generator)
    result = local.run(config(tmp_path / "run", data_dir))
    records = result.records
    order = [(f"{p}#{i}", i, role) for p in PROBLEMS for i in range(SAMPLES) for role in ("baseline", "method")]
    assert [(r.sample_id, r.sample_index, r.role) for r in records] == order  # sample i right after i - 1
    # one RNG stream per sample, from the run seed: the AR baseline and STAND share it
    assert streams == [(0, sample_id, 0) for sample_id, _, _ in order]
    baseline = [r.output_ids for r in records if r.role == "baseline"]
    assert len({tuple(ids) for ids in baseline[:SAMPLES]}) == SAMPLES  # the samples differ

    # STAND's memory (scope: problem) grows over the samples of a problem and restarts with the next
    stand = [r.method_stats for r in records if r.role == "method"]
    assert [s["samples_of_problem"] for s in stand] == [1, 2, 3] * len(PROBLEMS)
    for first in (0, SAMPLES):
        memory = [s["memory_ngrams"] for s in stand[first : first + SAMPLES]]
        assert memory == sorted(memory) and memory[0] < memory[-1], memory

    # per-record scores and answers; the summary adds the majority vote over the 3 samples
    assert all(set(r.answers) == set(r.quality) == {"exact_match_strict", "exact_match_flexible"} for r in records)
    assert {"exact_match_flexible", "exact_match_flexible maj@3"} <= set(result.summary["quality"])
    # the bootstrap draws problems (all their samples together): the same sums, one unit per problem
    method = records_frame([r for r in records if r.role == "method"], [r for r in records if r.role == "baseline"])
    per_sample = prompt_totals(method)
    per_problem = problem_totals(method, per_sample)
    assert list(per_problem.index) == list(PROBLEMS) and len(per_sample) == len(PROBLEMS) * SAMPLES
    assert per_problem.sum().to_dict() == pytest.approx(per_sample.sum().to_dict())
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (manifest["task_problems"], manifest["task_samples"]) == (len(PROBLEMS), len(PROBLEMS) * SAMPLES)

    # killed after problem 0: the rerun decodes only problem 1's samples, with the same seeds and outputs
    records_file = tmp_path / "run" / "records.jsonl"
    kept = 2 * SAMPLES
    records_file.write_text("".join(f"{line}\n" for line in records_file.read_text().splitlines()[:kept]))
    (tmp_path / "run" / "summary.json").unlink()
    streams.clear()
    resumed = local.run(config(tmp_path / "run", data_dir))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["resumed_records"] == kept
    assert streams == [(0, sample_id, 0) for sample_id, _, _ in order[kept:]]
    assert [(r.sample_id, r.role, r.output_ids) for r in resumed.records] == [
        (r.sample_id, r.role, r.output_ids) for r in records
    ]
    assert resumed.summary["quality"] == pytest.approx(result.summary["quality"])


def test_repeat_samples_keeps_a_problem_together():
    from decodebench.tasks.base import Sample

    problems = [Sample("a", "c", "g", ["q"]), Sample("b", "c", "g", ["q"])]
    assert local.repeat_samples(problems, 1) == problems
    repeated = local.repeat_samples(problems, 2)
    assert [(s.sample_id, s.sample_index) for s in repeated] == [("a#0", 0), ("a#1", 1), ("b#0", 0), ("b#1", 1)]
    assert problems[0].sample_id == "a"  # the task's samples are not changed


def test_humaneval_pass_at_k_over_gen_num_samples(tmp_path, data_dir):
    """HumanEval's pass@k comes from gen.num_samples (no task-level setting any more)."""
    cfg = compose_run_config(
        [
            *TINY,
            "method=ar",
            "task=humaneval",
            "task.limit=1",
            "gen.num_samples=10",
            "gen.temperature=1.0",
            "gen.max_new_tokens=6",
            f"data_dir={data_dir}",
        ]
    )
    cfg.run_dir = str(tmp_path / "run")
    result = local.run(cfg)
    assert [r.sample_id for r in result.records] == [f"HumanEval/0#{i}" for i in range(10)]
    passed = sum(r.quality["pass@1"] for r in result.records)
    assert result.summary["quality"] == {"pass@1": passed / 10, "pass@10": float(passed > 0)}
