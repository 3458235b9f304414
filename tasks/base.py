"""The task contract: a task turns a data file into :class:`Sample` objects and chat messages.

The config says where the data file lives (``data_file``, ``url``); a subclass says how one row
becomes a Sample (:meth:`Task.to_sample`). Selection (categories, ids, per-category, limit) and
message building are shared.

Task-specific settings live in ``TaskConfig.params`` and are validated against the subclass's
``Params`` dataclass (unknown keys are errors with a "did you mean"). A task can ask the runner for
per-turn prompt/generation settings (:meth:`Task.turn_settings`: chat template on/off, extra stop
strings, a temperature) and scores each output (:meth:`Task.score`).
"""

from __future__ import annotations

import abc
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from decodebench.config import ConfigValueError, TaskConfig
from decodebench.registry import DecodeBenchError, UnknownNameError, unknown_name_message
from decodebench.tasks.data import load_jsonl_records, resolve_data_file


@dataclass
class Sample:
    """One benchmark item: one or more user turns answered in sequence."""

    sample_id: str
    category: str  # the task's own category (Spec-Bench: 13 categories)
    group: str  # the category group reported in tables (Spec-Bench: 6 groups)
    turns: list[str]  # user messages, one per turn
    # reference answers, one per turn when present (Spec-Bench RAG rows: a list of accepted answers)
    reference: list[Any] | None = None
    # task-specific data the scorer needs (HumanEval: test code and entry point)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # i of the gen.num_samples = n > 1 decodes of one problem (sample_id "<problem>#<i>", see
    # decodebench.records.sample_id_of); None when every problem is decoded once
    sample_index: int | None = None


@dataclass(frozen=True)
class TurnSettings:
    """What a task asks of the runner for one turn (defaults: the run's own settings)."""

    # False: encode the messages as plain text even if the model has a chat template (completion
    # prompts such as HumanEval's or few-shot GSM8K); True: follow ``model.chat_template``
    chat_template: bool = True
    stop_strings: tuple[str, ...] = ()  # added to ``gen.stop_strings``
    temperature: float | None = None  # replaces ``gen.temperature`` (MT-Bench per category)


@dataclass
class NoParams:
    """Params of a task without task-specific settings."""


def params_from_dict(cls: type, values: dict[str, Any] | None, where: str) -> Any:
    """Build dataclass ``cls`` from ``values``; nested dataclass fields are built from dicts.

    Args:
        cls: a dataclass type.
        values: its settings (None = all defaults).
        where: config path used in messages, e.g. ``task.params`` for task ``gsm8k``.

    Raises:
        ConfigValueError: an unknown key (with a "did you mean") or a value of the wrong shape.
    """
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigValueError(unknown_name_message("key", key, known, f" in '{where}'"))
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigValueError(f"'{where}.{key}' must be a mapping, got {value!r}")
            values[key] = params_from_dict(hints[key], value, f"{where}.{key}")
    try:
        return cls(**values)
    except TypeError as error:
        raise ConfigValueError(f"invalid '{where}': {error}") from error


class Task(abc.ABC):
    """Base class of benchmark tasks.

    Args:
        cfg: the task's configuration.
        data_dir: folder searched first for ``data_file`` (config ``data_dir``), or None.
        cache_dir: the DecodeBench cache (downloads and the ``datasets`` cache live there).
    """

    # Sample attribute that ``per_category`` counts by ("category" or "group").
    per_category_key: ClassVar[str] = "category"
    # the dataclass that ``cfg.params`` must fit (subclasses define their own ``Params``)
    Params: ClassVar[type] = NoParams

    def __init__(self, cfg: TaskConfig, data_dir: str | Path | None, cache_dir: str | Path):
        self.cfg = cfg
        self.data_dir = data_dir
        self.cache_dir = Path(cache_dir)
        self.params = params_from_dict(self.Params, cfg.params, "task.params")

    @property
    def name(self) -> str:
        return self.cfg.name

    @abc.abstractmethod
    def to_sample(self, row: dict[str, Any]) -> Sample:
        """Turn one data-file row into a Sample."""

    def data_path(self) -> Path:
        if not self.cfg.data_file:
            raise ConfigValueError(f"task '{self.name}' has no data file: set task.data_file")
        return resolve_data_file(self.cfg.data_file, self.data_dir, self.cache_dir, self.cfg.url)

    def all_samples(self) -> list[Sample]:
        """Every sample of the data file, in file order."""
        return [self.to_sample(row) for row in load_jsonl_records(self.data_path(), self.cache_dir)]

    def load_samples(self) -> list[Sample]:
        """The samples selected by the config, in file order.

        Filters apply in this order: ``categories`` (category or group names), ``ids``,
        ``per_category`` (first N per :attr:`per_category_key`), ``limit`` (first N overall).

        Raises:
            UnknownNameError: a category/group name that the data does not contain.
            DecodeBenchError: sample ids that are not in the data (after the categories filter).
        """
        samples = self.all_samples()
        cfg = self.cfg
        if cfg.categories is not None:
            known = {s.category for s in samples} | {s.group for s in samples}
            for name in cfg.categories:
                if name not in known:
                    raise UnknownNameError(f"{self.name} category", name, known)
            wanted = set(cfg.categories)
            samples = [s for s in samples if s.category in wanted or s.group in wanted]
        if cfg.ids is not None:
            wanted_ids = [str(i) for i in cfg.ids]
            missing = sorted(set(wanted_ids) - {s.sample_id for s in samples})
            if missing:
                raise DecodeBenchError(
                    f"task.ids not found in {self.name} (after the categories filter): {', '.join(missing)}"
                )
            samples = [s for s in samples if s.sample_id in set(wanted_ids)]
        if cfg.per_category is not None:
            taken: dict[str, int] = {}
            kept = []
            for sample in samples:
                key = getattr(sample, self.per_category_key)
                if taken.get(key, 0) < cfg.per_category:
                    taken[key] = taken.get(key, 0) + 1
                    kept.append(sample)
            samples = kept
        if cfg.limit is not None:
            samples = samples[: cfg.limit]
        return samples

    def build_messages(self, sample: Sample, turn: int, previous_answers: list[str]) -> list[dict[str, str]]:
        """Chat messages for ``sample.turns[turn]``.

        Args:
            sample: the sample being decoded.
            turn: 0-based turn index.
            previous_answers: the model's own answers to turns ``0 .. turn-1``; they become the
                assistant messages between the user turns.

        Returns:
            ``[{"role": ..., "content": ...}, ...]``, starting with the config's system prompt
            when one is set and ending with the user message of ``turn``.
        """
        if not 0 <= turn < len(sample.turns) or len(previous_answers) != turn:
            raise ValueError(
                f"turn {turn} of sample {sample.sample_id} needs {turn} previous answers "
                f"(got {len(previous_answers)}; the sample has {len(sample.turns)} turns)"
            )
        messages = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        for question, answer in zip(sample.turns, previous_answers):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": sample.turns[turn]})
        return messages

    def resolve(self, relative_path: str, url: str | None = None) -> Path:
        """Locate another data file of this task (same lookup and download rules as ``data_file``)."""
        return resolve_data_file(relative_path, self.data_dir, self.cache_dir, url)

    def turn_settings(self, sample: Sample, turn: int) -> TurnSettings:
        """Prompt/generation settings for ``sample.turns[turn]``; default: the run's own."""
        return TurnSettings()

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float] | None:
        """Quality metrics of one output (e.g. ``{"exact_match": 1.0}``), or None when the task
        has no automatic metric for this sample. Stored in the record's ``quality`` field and
        averaged per metric in the summary."""
        return None

    def answers(self, sample: Sample, turn: int, output_text: str) -> dict[str, str] | None:
        """The answer each metric of :meth:`score` judged (metric -> answer; equal answers score
        equally), or None when the task's metrics judge no discrete answer. Stored in the record's
        ``answers`` field: the samples of one problem vote with it (``<metric> maj@n``,
        :func:`decodebench.records.sample_aggregates`)."""
        return None
