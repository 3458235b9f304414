"""MT-Bench single-answer grading as FastChat's ``llm_judge`` does it: prompts and rating parsing.

- Prompt choice: ``single-v1`` (turn 1) / ``single-v1-multi-turn`` (turn 2); for the categories
  that need a reference answer (FastChat's ``NEED_REF_CATS``: math, reasoning, coding) the
  ``single-math-v1`` variants, filled with the GPT-4 reference answers.
- The judge sees the prompt's ``system_prompt`` and the filled ``prompt_template`` as the user
  message; it must answer with ``[[rating]]`` (1-10). Parsing takes ``[[x]]``, else FastChat's
  backup ``[x]``; no rating → None (FastChat's -1, dropped from averages).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

RATING_PATTERN = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_BACKUP_PATTERN = re.compile(r"\[(\d+\.?\d*)\]")


@dataclass(frozen=True)
class JudgePrompt:
    name: str  # e.g. "single-math-v1-multi-turn"
    system_prompt: str
    prompt_template: str
    output_format: str  # "[[rating]]" for single-answer grading


@dataclass(frozen=True)
class JudgeRequest:
    """One judgment to make: the judge's system and user messages."""

    prompt_name: str
    system: str
    user: str


class Judge(Protocol):
    """Anything that answers a judge request with text (an API, a local model, a test fake)."""

    name: str

    def complete(self, system: str, user: str) -> str: ...


def load_judge_prompts(path: Path) -> dict[str, JudgePrompt]:
    """FastChat's ``judge_prompts.jsonl`` → prompts by name."""
    prompts = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            prompts[row["name"]] = JudgePrompt(
                row["name"], row["system_prompt"], row["prompt_template"], row["output_format"]
            )
    return prompts


def prompt_name(category: str, turn: int, reference_categories: Sequence[str]) -> str:
    """FastChat's choice of single-answer prompt for a category and 0-based turn."""
    name = "single-math-v1" if category in reference_categories else "single-v1"
    return name + ("-multi-turn" if turn == 1 else "")


def build_request(
    prompts: dict[str, JudgePrompt],
    category: str,
    turn: int,
    questions: Sequence[str],
    answers: Sequence[str],
    references: Sequence[str] | None,
    reference_categories: Sequence[str],
) -> JudgeRequest:
    """Fill the judge prompt for the answer to ``questions[turn]`` (0-based turn 0 or 1).

    Args:
        prompts: from :func:`load_judge_prompts`.
        category: the question's MT-Bench category.
        turn: 0 judges the first answer alone; 1 the second answer in the two-turn conversation.
        questions: both user turns.
        answers: the model's answers, at least ``turn + 1`` of them.
        references: the reference answers (both turns) for reference categories, else None.
        reference_categories: categories graded against references (FastChat: math, reasoning, coding).

    Raises:
        ValueError: a reference category without reference answers, or too few answers.
    """
    if turn not in (0, 1) or len(answers) <= turn:
        raise ValueError(f"MT-Bench judging needs turn 0 or 1 and its answer (turn {turn}, {len(answers)} answers)")
    prompt = prompts[prompt_name(category, turn, reference_categories)]
    fields = {}
    if category in reference_categories:
        if not references:
            raise ValueError(f"category '{category}' is graded against a reference answer, but none was given")
        fields = (
            {"ref_answer_1": references[0]}
            if turn == 0
            else {"ref_answer_1": references[0], "ref_answer_2": references[1]}
        )
    if turn == 0:
        user = prompt.prompt_template.format(question=questions[0], answer=answers[0], **fields)
    else:
        user = prompt.prompt_template.format(
            question_1=questions[0], question_2=questions[1], answer_1=answers[0], answer_2=answers[1], **fields
        )
    return JudgeRequest(prompt.name, prompt.system_prompt, user)


def parse_rating(judgment: str) -> float | None:
    """The ``[[rating]]`` of a judgment (backup: ``[rating]``), or None when there is none."""
    match = RATING_PATTERN.search(judgment) or RATING_BACKUP_PATTERN.search(judgment)
    return float(ast.literal_eval(match.group(1))) if match else None
