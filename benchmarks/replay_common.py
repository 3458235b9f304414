"""Shared by the replay benchmarks (replay_pld.py, replay_aded.py): the greedy AR outputs of a run
directory, with the prompts they answered, to feed through a drafter offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from decodebench.config import TaskConfig, default_cache_dir
from decodebench.models.loading import load_model_config, load_tokenizer
from decodebench.runners.run_dir import read_records
from decodebench.tasks import build_task
from decodebench.tasks.prompts import encode_prompt


def ar_cases(run_dir: Path) -> tuple[dict[str, Any], list[tuple[list[int], list[int]]]]:
    """``(run config, [(prompt ids, AR output ids)])`` for every error-free first-turn baseline record."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["cache_dir"] = config.get("cache_dir") or str(default_cache_dir())
    task = build_task(TaskConfig(**config["task"]), config.get("data_dir"), config["cache_dir"])
    tokenizer = load_tokenizer(load_model_config(config["model"]["name"]), config["cache_dir"])
    samples = {s.sample_id: s for s in task.load_samples()}
    cases = [
        (
            encode_prompt(
                tokenizer, task.build_messages(samples[r.sample_id], 0, []), config["model"]["chat_template"]
            ),
            r.output_ids,
        )
        for r in read_records(run_dir / "records.jsonl")
        if r.role == "baseline" and r.turn == 0 and r.error is None
    ]
    return config, cases
