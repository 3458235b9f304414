"""Spec-Bench (Xia et al., 2024): 480 questions, 13 categories reported as 6 groups.

The 8 MT-Bench categories (80 two-turn questions) form the group ``mt_bench``; translation,
summarization, qa, math_reasoning and rag (80 single-turn questions each) are their own groups.

``per_category`` counts Spec-Bench's 6 GROUPS, not its 13 categories: ``per_category=2`` gives
the foundation's 12-question bench ("2 questions per category group"), taking the first two
questions of each group in file order (for mt_bench: two writing questions).

Quality, for rows that carry a ``reference`` (one per turn), by group: translation → sentence
BLEU and chrF (sacrebleu), summarization → ROUGE-L (rouge-score), math_reasoning → GSM8K exact
match (strict ``#### N`` and flexible last number), qa / rag → exact match, token F1 and answer
containment against the accepted answers. mt_bench rows are judged by the ``mt_bench`` task, not
here (their references are hints for a judge). Each metric is an ``evaluate`` module loaded by
local path (:mod:`decodebench.tasks.metrics`).
"""

from __future__ import annotations

from typing import Any

from decodebench.tasks.base import Sample, Task
from decodebench.tasks.metrics import compute
from decodebench.tasks.quality import as_answer_list

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
GROUP_OF_CATEGORY = {category: "mt_bench" for category in MT_BENCH_CATEGORIES}
# group -> (metric module, whether it takes the list of accepted answers instead of one reference)
METRIC_OF_GROUP = {
    "translation": ("translation_quality", False),
    "summarization": ("rouge_l", False),
    "math_reasoning": ("gsm8k_exact_match", False),
    "qa": ("qa_match", True),
    "rag": ("qa_match", True),
}


class SpecBench(Task):
    per_category_key = "group"

    def to_sample(self, row: dict[str, Any]) -> Sample:
        category = row["category"]
        return Sample(
            sample_id=str(row["question_id"]),
            category=category,
            group=GROUP_OF_CATEGORY.get(category, category),
            turns=list(row["turns"]),
            reference=row.get("reference"),
        )

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float] | None:
        if sample.group not in METRIC_OF_GROUP or not sample.reference or turn >= len(sample.reference):
            return None
        metric, takes_answer_list = METRIC_OF_GROUP[sample.group]
        answers = as_answer_list(sample.reference[turn])
        if answers is None:
            return None
        return compute(metric, [output_text], [answers if takes_answer_list else answers[0]])
