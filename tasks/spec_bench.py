"""Spec-Bench (Xia et al., 2024): 480 questions, 13 categories reported as 6 groups.

The 8 MT-Bench categories (80 two-turn questions) form the group ``mt_bench``; translation,
summarization, qa, math_reasoning and rag (80 single-turn questions each) are their own groups.

``per_category`` counts Spec-Bench's 6 GROUPS, not its 13 categories: ``per_category=2`` gives
the foundation's 12-question bench ("2 questions per category group"), taking the first two
questions of each group in file order (for mt_bench: two writing questions).
"""

from __future__ import annotations

from typing import Any

from decodebench.tasks.base import Sample, Task

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                       "humanities")
GROUP_OF_CATEGORY = {category: "mt_bench" for category in MT_BENCH_CATEGORIES}


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
