"""SPEED-Bench (NVIDIA, 2026): speculative decoding across semantic domains and input lengths.

Configs of the dataset (``nvidia/SPEED-Bench`` on the hub; fields ``question_id, category,
sub_category, turns, source, src_id, difficulty, multiturn``):

- ``qualitative``: 880 prompts, 80 in each of 11 categories (coding, humanities, math,
  multilingual, qa, rag, reasoning, roleplay, stem, summarization, writing);
- ``throughput_1k`` / ``_2k`` / ``_8k`` / ``_16k`` / ``_32k``: 1536 prompts each of about that
  many input tokens, in three entropy tiers.

SPEED-Bench reports acceptance and speed per ``category``, so ``category`` is both the sample's
category and its group here (``sub_category``, ``difficulty`` and ``source`` go to
``Sample.extra``); ``task.per_category=N`` takes the first N prompts of each category.

Loading goes through ``datasets.load_dataset(source, config, split=...)``: ``source`` is the hub
id (online users) or a local folder holding a copy of the dataset repository (its README's
``configs`` name the parquet files of each config). The public copy ships placeholder prompts
for some sources; the real ones are rebuilt with NVIDIA's Model-Optimizer
``examples/specdec_bench`` scripts into such a folder.

Long inputs: the embedded model has an 8192-token context (``max_position_embeddings``), which
the 8k-32k configs exceed. ``max_input_tokens`` cuts each turn longer than the limit in the
MIDDLE, keeping its first and last halves (LongBench's truncation: the instruction, usually at
one end, survives), measured with the tokenizer of ``context_model``. ``auto`` = no cut for
``qualitative``, and for the throughput configs the context of ``context_model`` minus
``reserve_tokens`` (room for the chat template and the answer). What was cut is logged (prompts
cut, tokens removed) and kept per sample in ``Sample.extra["cut_tokens"]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from decodebench.config import ConfigValueError
from decodebench.registry import DecodeBenchError, unknown_name_message
from decodebench.tasks.base import Sample, Task

log = logging.getLogger("decodebench")

HUB_ID = "nvidia/SPEED-Bench"
CONFIGS = ("qualitative", "throughput_1k", "throughput_2k", "throughput_8k", "throughput_16k", "throughput_32k")
CATEGORIES = (
    "coding",
    "humanities",
    "math",
    "multilingual",
    "qa",
    "rag",
    "reasoning",
    "roleplay",
    "stem",
    "summarization",
    "writing",
)
EXTRA_FIELDS = ("sub_category", "difficulty", "source", "src_id", "multiturn")


@dataclass
class Params:
    source: str = HUB_ID  # hub id, or a local folder holding a copy of the dataset repository
    config: str = "qualitative"  # one of CONFIGS
    split: str = "test"
    revision: str | None = None  # hub revision (branch, tag or commit)
    # "auto" (throughput configs: the context of context_model − reserve_tokens; qualitative: no cut),
    # an integer (cut every longer turn to it), or null (never cut)
    max_input_tokens: int | str | None = "auto"
    context_model: str = "smollm2-135m"  # catalogue model whose tokenizer and context length apply
    reserve_tokens: int = 1024


def cut_middle(ids: list[int], limit: int) -> list[int]:
    """The first ``limit // 2`` and last ``limit - limit // 2`` ids when ``ids`` is longer than ``limit``."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


class SpeedBench(Task):
    per_category_key = "category"
    Params = Params

    def __init__(self, cfg, data_dir, cache_dir):
        super().__init__(cfg, data_dir, cache_dir)
        if self.params.config not in CONFIGS:
            raise ConfigValueError(
                unknown_name_message(
                    "config", self.params.config, CONFIGS, " in 'task.params.config' of task speed_bench"
                )
            )
        limit = self.params.max_input_tokens
        if not (limit is None or limit == "auto" or (isinstance(limit, int) and limit >= 1)):
            raise ConfigValueError(
                f"invalid value for 'task.params.max_input_tokens': {limit!r} (allowed: auto, an integer >= 1, or null)"
            )
        if self.params.reserve_tokens < 0:
            raise ConfigValueError(
                f"invalid value for 'task.params.reserve_tokens': {self.params.reserve_tokens} "
                "(allowed: an integer >= 0)"
            )

    def to_sample(self, row: dict[str, Any]) -> Sample:
        return Sample(
            sample_id=str(row["question_id"]),
            category=str(row["category"]),
            group=str(row["category"]),
            turns=list(row["turns"]),
            extra={key: row.get(key) for key in EXTRA_FIELDS if row.get(key) is not None},
        )

    def rows(self) -> list[dict[str, Any]]:
        """The config's rows, by hub id or from a local folder (module docstring)."""
        import datasets

        params = self.params
        local = Path(params.source).expanduser()
        if (params.source.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
            raise DecodeBenchError(
                f"task.params.source: no folder {local} (give the hub id {HUB_ID} or a folder "
                "holding a copy of the dataset repository)"
            )
        source = str(local) if local.is_dir() else params.source
        try:
            dataset = datasets.load_dataset(
                source,
                params.config,
                split=params.split,
                revision=params.revision,
                cache_dir=str(self.cache_dir / "datasets"),
            )
        except Exception as error:  # hub unreachable, unknown config or split, unreadable files
            raise DecodeBenchError(
                f"cannot load SPEED-Bench from '{source}' (config {params.config}, split {params.split}): {error}. "
                f"Offline: copy the dataset repository (git clone https://huggingface.co/datasets/{HUB_ID}) and set "
                "task.params.source=<that folder>"
            ) from error
        return dataset.to_list()

    def all_samples(self) -> list[Sample]:
        return [self.to_sample(row) for row in self.rows()]

    def load_samples(self) -> list[Sample]:
        """The selected samples (``Task.load_samples``), long turns cut after selection."""
        samples = super().load_samples()
        limit = self.input_limit()
        return self.cut(samples, limit) if limit is not None else samples

    def input_limit(self) -> int | None:
        """Tokens a turn may keep (None: no cut), resolving ``auto`` (module docstring)."""
        limit = self.params.max_input_tokens
        if limit != "auto":
            return limit
        if self.params.config == "qualitative":
            return None
        context = context_length(self.params.context_model, self.cache_dir)
        if context <= self.params.reserve_tokens:
            raise ConfigValueError(
                f"task.params.reserve_tokens ({self.params.reserve_tokens}) leaves no room in "
                f"{self.params.context_model}'s {context}-token context"
            )
        return context - self.params.reserve_tokens

    def cut(self, samples: list[Sample], limit: int) -> list[Sample]:
        """Cut every turn longer than ``limit`` tokens in the middle; logs what was cut."""
        tokenizer = context_tokenizer(self.params.context_model, self.cache_dir)
        cut_prompts, cut_tokens = 0, 0
        for sample in samples:
            removed = 0
            for index, turn in enumerate(sample.turns):
                ids = tokenizer.encode(turn, add_special_tokens=False)
                if len(ids) > limit:
                    kept = cut_middle(ids, limit)
                    sample.turns[index] = tokenizer.decode(kept[: limit // 2]) + tokenizer.decode(kept[limit // 2 :])
                    removed += len(ids) - limit
            if removed:
                sample.extra["cut_tokens"] = removed
                cut_prompts += 1
                cut_tokens += removed
        log.info(
            "speed_bench %s: %d of %d prompts longer than %d tokens (%s tokenizer) cut in the middle, "
            "%d tokens removed",
            self.params.config,
            cut_prompts,
            len(samples),
            limit,
            self.params.context_model,
            cut_tokens,
        )
        return samples


def _catalogue(name: str):
    from decodebench.models.loading import load_model_config

    return load_model_config(name)


def context_tokenizer(model: str, cache_dir: str | Path):
    """The tokenizer a catalogue model uses (its own, or the one ``model.tokenizer`` names)."""
    from decodebench.models.loading import load_tokenizer

    cfg = _catalogue(model)
    return load_tokenizer(
        _catalogue(cfg.tokenizer) if cfg.tokenizer and cfg.tokenizer != cfg.name else cfg, str(cache_dir)
    )


def context_length(model: str, cache_dir: str | Path) -> int:
    """``max_position_embeddings`` of a catalogue model (tiny models: their config; others: the
    ``config.json`` stored with their tokenizer)."""
    from transformers import AutoConfig

    cfg = _catalogue(model)
    if cfg.source == "tiny":
        return int(cfg.tiny["max_position_embeddings"])
    tokenizer = context_tokenizer(model, cache_dir)
    return int(AutoConfig.from_pretrained(tokenizer.name_or_path).max_position_embeddings)
