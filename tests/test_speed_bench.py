"""SPEED-Bench task, offline: a small fixture written in the dataset's schema (made-up prompts, a
README with ``configs`` like the hub repository's, parquet files per config) loaded by folder;
categories as groups; middle cut of long inputs; bad input; an end-to-end CLI run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from decodebench.config import ConfigValueError, compose_run_config
from decodebench.registry import DecodeBenchError
from decodebench.tasks import build_task
from decodebench.tasks.speed_bench import CATEGORIES, cut_middle

from helpers import run_cli

QUALITATIVE_CATEGORIES = CATEGORIES[:3]  # coding, humanities, math: 2 made-up prompts each
TIERS = ("low_entropy", "mixed", "high_entropy")
README = """---
configs:
- config_name: qualitative
  data_files:
  - split: test
    path: qualitative/test-*.parquet
- config_name: throughput_1k
  data_files:
  - split: test
    path: throughput_1k/test-*.parquet
---
# SPEED-Bench-shaped test fixture (made-up prompts)
"""


def _row(question_id: str, category: str, turns: list[str], multiturn: bool = False) -> dict:
    return {
        "question_id": question_id,
        "category": category,
        "sub_category": f"{category}-sub",
        "turns": turns,
        "source": "made-up",
        "src_id": question_id,
        "difficulty": "easy",
        "multiturn": multiturn,
    }


def write_fixture(folder):
    """A tiny copy of the dataset repository: 6 qualitative prompts (one two-turn), 3 long inputs."""
    qualitative = [
        _row(f"q{c}{i}", category, [f"Write {i + 2} short lines about {category} number {c}."])
        for c, category in enumerate(QUALITATIVE_CATEGORIES)
        for i in range(2)
    ]
    qualitative[1] = _row(
        "q01", "coding", ["Write a function that adds two numbers.", "Now make it add three numbers."], multiturn=True
    )
    long_text = " ".join(f"word{i} alpha beta gamma." for i in range(400))  # ~2.4k tokens
    throughput = [
        _row(f"t{i}", tier, [f"BEGIN {long_text} END. Summarise the text above."]) for i, tier in enumerate(TIERS)
    ]
    for name, rows in (("qualitative", qualitative), ("throughput_1k", throughput)):
        (folder / name).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(folder / name / "test-00000-of-00001.parquet", index=False)
    (folder / "README.md").write_text(README)
    return folder


@pytest.fixture
def speed_bench_dir(tmp_path):
    return write_fixture(tmp_path / "SPEED-Bench")


def task_for(tmp_path, *overrides):
    cfg = compose_run_config(["task=speed_bench", *overrides])
    return build_task(cfg.task, None, tmp_path / "cache")


def test_loads_local_copy_with_categories_as_groups(tmp_path, speed_bench_dir):
    task = task_for(tmp_path, f"task.params.source={speed_bench_dir}", "task.per_category=1")
    samples = task.load_samples()
    assert [s.category for s in samples] == list(QUALITATIVE_CATEGORIES)
    assert all(s.group == s.category for s in samples)
    assert samples[0].sample_id == "q00" and samples[0].extra["sub_category"] == "coding-sub"
    every = task_for(tmp_path, f"task.params.source={speed_bench_dir}").load_samples()
    assert len(every) == 6 and every[1].turns == [
        "Write a function that adds two numbers.",
        "Now make it add three numbers.",
    ]


def test_cut_middle_keeps_both_ends():
    assert cut_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert cut_middle(list(range(5)), 4) == [0, 1, 3, 4]
    assert cut_middle(list(range(3)), 4) == [0, 1, 2]


@pytest.mark.embedded
def test_long_inputs_are_cut_to_the_context(tmp_path, speed_bench_dir):
    from decodebench.tasks.speed_bench import context_length, context_tokenizer

    assert context_length("smollm2-135m", tmp_path) == 8192
    tokenizer = context_tokenizer("smollm2-135m", tmp_path)
    uncut = task_for(
        tmp_path,
        f"task.params.source={speed_bench_dir}",
        "task.params.config=throughput_1k",
        "task.params.max_input_tokens=null",
    ).load_samples()
    full = len(tokenizer.encode(uncut[0].turns[0], add_special_tokens=False))
    assert full > 2000 and [s.group for s in uncut] == list(TIERS)
    # auto: 8192 − 1024 leaves these ~2.4k-token prompts whole
    auto = task_for(tmp_path, f"task.params.source={speed_bench_dir}", "task.params.config=throughput_1k")
    assert auto.input_limit() == 8192 - 1024 and "cut_tokens" not in auto.load_samples()[0].extra
    cut = task_for(
        tmp_path,
        f"task.params.source={speed_bench_dir}",
        "task.params.config=throughput_1k",
        "task.params.max_input_tokens=256",
    ).load_samples()
    text = cut[0].turns[0]
    assert text.startswith("BEGIN word0") and text.endswith("Summarise the text above.")
    assert abs(len(tokenizer.encode(text, add_special_tokens=False)) - 256) <= 2  # re-tokenised at the seam
    assert cut[0].extra["cut_tokens"] == full - 256


def test_bad_input(tmp_path, speed_bench_dir):
    with pytest.raises(ConfigValueError, match="Did you mean 'qualitative'"):
        task_for(tmp_path, "task.params.config=qualitativ")
    with pytest.raises(ConfigValueError, match="task.params.max_input_tokens"):
        task_for(tmp_path, "task.params.max_input_tokens=0")
    with pytest.raises(DecodeBenchError, match="no folder"):
        task_for(tmp_path, f"task.params.source={tmp_path}/missing").load_samples()
    with pytest.raises(DecodeBenchError, match="git clone https://huggingface.co/datasets/nvidia/SPEED-Bench"):
        task_for(tmp_path, f"task.params.source={speed_bench_dir}", "task.params.split=train").load_samples()


@pytest.mark.embedded
def test_end_to_end_cli(tmp_path, speed_bench_dir):
    """The fixture through the CLI with a tiny model: every category, AR baseline, report rows."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny-llama",
        "method=pld",
        "task=speed_bench",
        f"task.params.source={speed_bench_dir}",
        "task.per_category=1",
        "gen.max_new_tokens=6",
        "threads=1",
        "progress=false",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert {(r["role"], r["group"]) for r in records} == {
        (role, c) for role in ("baseline", "method") for c in QUALITATIVE_CATEGORIES
    }
    assert all(r["error"] is None and r["task"] == "speed_bench" for r in records)
    for group in (*QUALITATIVE_CATEGORIES, "overall"):
        assert f"| {group} " in result.stdout
    long_run = tmp_path / "long"
    result = run_cli(
        "model=tiny-llama",
        "method=pld",
        "task=speed_bench",
        f"task.params.source={speed_bench_dir}",
        "task.params.config=throughput_1k",
        "task.params.max_input_tokens=512",
        "task.limit=1",
        "gen.max_new_tokens=4",
        "threads=1",
        "progress=false",
        f"hydra.run.dir={long_run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 of 1 prompts longer than 512 tokens" in result.stderr + result.stdout
    prompt_tokens = {
        json.loads(line)["prompt_tokens"] for line in (long_run / "records.jsonl").read_text().splitlines()
    }
    assert len(prompt_tokens) == 1 and 512 < prompt_tokens.pop() < 560  # + the chat template


def test_bad_config_exits_2_before_loading(tmp_path):
    result = run_cli("model=tiny-llama", "task=speed_bench", "task.params.config=throughput_64k", cwd=tmp_path)
    assert result.returncode == 2 and "Did you mean" in result.stderr + result.stdout
