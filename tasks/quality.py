"""Answer extraction and matching: the harness's own metric code.

The ``evaluate`` metric modules in ``tasks/metric_modules/`` call these functions, so every task
(and Spec-Bench's math_reasoning / qa / rag rows) scores with one definition.

GSM8K follows lm-evaluation-harness: ``strict`` takes the first ``#### N`` of the output,
``flexible`` the last number-like span; both are compared with the target after removing ``,``,
``$``, everything up to ``#### `` and a trailing ``.``, case-insensitively. An output with no match
scores 0 (lm-eval's ``[invalid]``).

QA follows SQuAD's answer normalisation (lower case, no punctuation, no articles, single spaces):
``exact_match`` and token ``f1`` take the best accepted answer; ``contains`` is 1 when a normalised
accepted answer occurs in the normalised output as whole words (chat models answer in sentences).
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

GSM8K_STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
GSM8K_FLEXIBLE_PATTERN = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
GSM8K_IGNORE = (r",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval's regexes_to_ignore
INVALID = "[invalid]"


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = min((text.find(stop) for stop in stop_strings if stop and stop in text), default=len(text))
    return text[:cut]


def regex_extract(text: str, pattern: str, select: int) -> str:
    """lm-eval's regex filter: the ``select``-th match (0 first, -1 last); for patterns with
    alternative groups the first non-empty group; ``[invalid]`` when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return INVALID
    match = matches[select]
    if isinstance(match, tuple):
        match = next((group for group in match if group), INVALID)
    return match.strip()


def normalize_gsm8k(text: str) -> str:
    for pattern in GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.strip().lower()


def gsm8k_answers(
    prediction: str, strict_pattern: str = GSM8K_STRICT_PATTERN, flexible_pattern: str = GSM8K_FLEXIBLE_PATTERN
) -> dict[str, str]:
    """The strict and flexible answers of one output, normalised as exact match compares them
    (``[invalid]`` when the pattern does not match), keyed by the metric that judges them.

    Args:
        prediction: the model's output (already cut at stop strings).
        strict_pattern: regex whose FIRST match is the strict answer.
        flexible_pattern: regex whose LAST match is the flexible answer.
    """
    answers = {
        "exact_match_strict": regex_extract(prediction, strict_pattern, 0),
        "exact_match_flexible": regex_extract(prediction, flexible_pattern, -1),
    }
    return {metric: a if a == INVALID else normalize_gsm8k(a) for metric, a in answers.items()}


def gsm8k_scores(
    prediction: str,
    reference: str,
    strict_pattern: str = GSM8K_STRICT_PATTERN,
    flexible_pattern: str = GSM8K_FLEXIBLE_PATTERN,
) -> dict[str, float]:
    """Strict and flexible exact match of one output.

    Args:
        prediction: the model's output (already cut at stop strings).
        reference: a GSM8K solution ending in ``#### N``, or just ``N``.
        strict_pattern: regex whose FIRST match is the strict answer.
        flexible_pattern: regex whose LAST match is the flexible answer.

    Returns:
        ``{"exact_match_strict": 0|1, "exact_match_flexible": 0|1}``.
    """
    target = normalize_gsm8k(reference)
    answers = gsm8k_answers(prediction, strict_pattern, flexible_pattern)
    return {metric: float(answer != INVALID and answer == target) for metric, answer in answers.items()}


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, answer: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if not predicted or not expected or common == 0:
        return float(predicted == expected)
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def qa_scores(prediction: str, answers: Sequence[str]) -> dict[str, float]:
    """``exact_match``, ``f1`` and ``contains`` of one output against its accepted answers."""
    answers = [a for a in answers if normalize_answer(a)]
    if not answers:
        raise ValueError("qa_scores needs at least one non-empty accepted answer")
    output = f" {normalize_answer(prediction)} "
    return {
        "exact_match": float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers)),
        "f1": max(token_f1(prediction, a) for a in answers),
        "contains": float(any(f" {normalize_answer(a)} " in output for a in answers)),
    }


def as_answer_list(reference: Sequence[str] | None) -> list[str] | None:
    """A turn's reference as a list of accepted answers (a string or a list of strings), or None."""
    if reference is None:
        return None
    if isinstance(reference, str):
        return [reference] if reference.strip() else None
    answers = [str(a) for a in reference if str(a).strip()]
    return answers or None
