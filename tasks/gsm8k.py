"""GSM8K (Cobbe et al., 2021): 1319 grade-school math word problems, exact-match accuracy.

Prompt styles (``params.prompt_style``):

- ``chat``: zero-shot; the question inside ``chat_instruction`` as one user message, through the
  model's chat template.
- ``fewshot``: the standard 8 chain-of-thought exemplars of Wei et al. (2022), written out in
  ``conf/task/gsm8k.yaml``, then the question, as one plain-text completion prompt (no chat
  template, as lm-evaluation-harness does by default); generation stops at ``fewshot_stop_strings``.

Both answer extractions are reported for every output, as lm-evaluation-harness does:
``exact_match_strict`` (the first ``#### N``) and ``exact_match_flexible`` (the last number); see
:mod:`decodebench.tasks.quality` and the ``gsm8k_exact_match`` metric module. With
``gen.num_samples`` n > 1 the samples of a problem vote with their extracted answers
(:meth:`GSM8K.answers`): the report adds ``exact_match_strict maj@n`` / ``exact_match_flexible maj@n``
beside the mean accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from decodebench.config import check
from decodebench.tasks.base import Sample, Task, TurnSettings
from decodebench.tasks.data import load_jsonl_records
from decodebench.tasks.metrics import compute
from decodebench.tasks.quality import GSM8K_FLEXIBLE_PATTERN, GSM8K_STRICT_PATTERN, gsm8k_answers, truncate_at_stop

PROMPT_STYLES = ("chat", "fewshot")
ROW_INDEX = "_row_index"  # key under which all_samples passes a row's line number to to_sample


@dataclass
class Exemplar:
    question: str
    rationale: str  # the chain of thought, without the final answer
    answer: str  # the final number


class GSM8K(Task):
    @dataclass
    class Params:
        prompt_style: str = "chat"
        chat_instruction: str = "{question}"
        chat_stop_strings: list[str] = field(default_factory=list)
        fewshot_question_template: str = "Question: {question}\nAnswer:"
        fewshot_answer_template: str = " {rationale}\n#### {answer}"
        fewshot_separator: str = "\n\n"
        fewshot_exemplars: list[Exemplar] = field(default_factory=list)  # dicts in YAML
        fewshot_stop_strings: list[str] = field(default_factory=lambda: ["Question:", "\n\n"])
        strict_pattern: str = GSM8K_STRICT_PATTERN
        flexible_pattern: str = GSM8K_FLEXIBLE_PATTERN

        def __post_init__(self) -> None:
            check(
                self.prompt_style in PROMPT_STYLES,
                "task.params.prompt_style",
                self.prompt_style,
                " | ".join(PROMPT_STYLES),
            )
            check(
                "{question}" in self.chat_instruction,
                "task.params.chat_instruction",
                self.chat_instruction,
                "a text containing {question}",
            )
            for name in ("strict_pattern", "flexible_pattern"):
                try:
                    re.compile(getattr(self, name))
                except re.error as error:
                    check(False, f"task.params.{name}", getattr(self, name), f"a valid regex ({error})")
            try:
                self.fewshot_exemplars = [
                    e if isinstance(e, Exemplar) else Exemplar(**e) for e in self.fewshot_exemplars
                ]
            except TypeError as error:
                check(
                    False,
                    "task.params.fewshot_exemplars",
                    "...",
                    f"a list of {{question, rationale, answer}} ({error})",
                )
            check(
                self.prompt_style != "fewshot" or bool(self.fewshot_exemplars),
                "task.params.fewshot_exemplars",
                [],
                "at least one exemplar for prompt_style=fewshot",
            )

    def to_sample(self, row: dict[str, Any]) -> Sample:
        return Sample(
            sample_id=str(row[ROW_INDEX]),
            category="gsm8k",
            group="gsm8k",
            turns=[row["question"]],
            reference=[row["answer"]],
        )

    def all_samples(self) -> list[Sample]:
        """Every problem; GSM8K rows carry no id, so the 0-based line number is the sample id."""
        rows = load_jsonl_records(self.data_path(), self.cache_dir)
        return [self.to_sample({**row, ROW_INDEX: index}) for index, row in enumerate(rows)]

    def fewshot_prefix(self) -> str:
        """The exemplars, each question followed by its worked answer, joined by the separator."""
        p = self.params
        return "".join(
            p.fewshot_question_template.format(question=e.question)
            + p.fewshot_answer_template.format(rationale=e.rationale, answer=e.answer)
            + p.fewshot_separator
            for e in p.fewshot_exemplars
        )

    def build_messages(self, sample: Sample, turn: int, previous_answers: list[str]) -> list[dict[str, str]]:
        question = sample.turns[turn]
        if self.params.prompt_style == "fewshot":
            text = self.fewshot_prefix() + self.params.fewshot_question_template.format(question=question)
        else:
            text = self.params.chat_instruction.format(question=question)
        return super().build_messages(
            Sample(sample.sample_id, sample.category, sample.group, [text]), turn, previous_answers
        )

    def stop_strings(self) -> list[str]:
        p = self.params
        return p.fewshot_stop_strings if p.prompt_style == "fewshot" else p.chat_stop_strings

    def turn_settings(self, sample: Sample, turn: int) -> TurnSettings:
        return TurnSettings(chat_template=self.params.prompt_style == "chat", stop_strings=tuple(self.stop_strings()))

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float]:
        answer = truncate_at_stop(output_text, self.stop_strings())
        return compute(
            "gsm8k_exact_match",
            [answer],
            [sample.reference[turn]],
            strict_pattern=self.params.strict_pattern,
            flexible_pattern=self.params.flexible_pattern,
        )

    def answers(self, sample: Sample, turn: int, output_text: str) -> dict[str, str]:
        """The strict and flexible answers that :meth:`score` judged (normalised; ``[invalid]``)."""
        answer = truncate_at_stop(output_text, self.stop_strings())
        return gsm8k_answers(answer, self.params.strict_pattern, self.params.flexible_pattern)
