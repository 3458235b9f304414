"""MT-Bench (Zheng et al., 2023): 80 two-turn questions in 8 categories, judged by an LLM.

Turn 2 is asked with the model's own turn-1 answer in the conversation (the runner passes it to
:meth:`Task.build_messages`). Groups are the 8 categories. With ``use_category_temperatures`` each
question is decoded at FastChat's temperature for its category (0 = greedy; the lossless audit
then covers only the greedy categories).

Quality (``judge`` != none): FastChat's single-answer grading (:mod:`.mt_bench_judging`) by the
judge backend of :mod:`.judges`; the records get ``mt_bench_score`` (1-10, every turn) and
``mt_bench_score_turn1`` / ``mt_bench_score_turn2``. Reference answers (GPT-4's, for math,
reasoning and coding) and judge prompts are read from FastChat's files. The judge is built on the
first score, and identical (prompt, answer) pairs — a lossless method's output equals AR's — are
judged once.

Judging turn 2 needs the turn-1 answer: the task remembers the ``previous_answers`` the runner
gave to :meth:`build_messages` for the turn being decoded (build_messages → generate → score).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from decodebench.config import check
from decodebench.tasks.base import Sample, Task, TurnSettings
from decodebench.tasks.data import load_jsonl_records
from decodebench.tasks.judges import JUDGE_KINDS, HFJudgeConfig, OpenAIJudgeConfig, build_judge
from decodebench.tasks.mt_bench_judging import build_request, load_judge_prompts, parse_rating
from decodebench.tasks.spec_bench import MT_BENCH_CATEGORIES

log = logging.getLogger(__name__)

FASTCHAT_DATA_URL = "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data"
# FastChat gen_model_answer.py temperature_config
FASTCHAT_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


class MTBench(Task):
    @dataclass
    class Params:
        judge: str = "none"  # none | openai | hf
        judge_prompts_file: str = "mt_bench/judge_prompts.jsonl"
        judge_prompts_url: str | None = f"{FASTCHAT_DATA_URL}/judge_prompts.jsonl"
        reference_file: str = "mt_bench/reference_answer_gpt-4.jsonl"
        reference_url: str | None = f"{FASTCHAT_DATA_URL}/mt_bench/reference_answer/gpt-4.jsonl"
        reference_categories: list[str] = field(default_factory=lambda: ["math", "reasoning", "coding"])
        use_category_temperatures: bool = False
        category_temperatures: dict[str, float] = field(default_factory=lambda: dict(FASTCHAT_TEMPERATURES))
        openai: OpenAIJudgeConfig = field(default_factory=OpenAIJudgeConfig)
        hf: HFJudgeConfig = field(default_factory=HFJudgeConfig)

        def __post_init__(self) -> None:
            check(self.judge in JUDGE_KINDS, "task.params.judge", self.judge, " | ".join(JUDGE_KINDS))
            for category, temperature in self.category_temperatures.items():
                check(temperature >= 0, f"task.params.category_temperatures.{category}", temperature, ">= 0")
            missing = sorted(set(MT_BENCH_CATEGORIES) - set(self.category_temperatures))
            check(
                not self.use_category_temperatures or not missing,
                "task.params.category_temperatures",
                self.category_temperatures,
                f"a temperature for every category (missing: {', '.join(missing)})",
            )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.judge: Any = None  # built on the first score
        self._prompts: dict | None = None
        self._previous_answers: dict[tuple[str, int], list[str]] = {}
        self._judgments: dict[tuple[str, str], str] = {}

    def to_sample(self, row: dict[str, Any]) -> Sample:
        category = row["category"]
        return Sample(sample_id=str(row["question_id"]), category=category, group=category, turns=list(row["turns"]))

    def all_samples(self) -> list[Sample]:
        samples = super().all_samples()
        if self.params.judge != "none":  # reference answers are needed only to judge
            references = self.reference_answers()
            for sample in samples:
                sample.reference = references.get(sample.sample_id)
        return samples

    def reference_answers(self) -> dict[str, list[str]]:
        """FastChat's reference answers by question id (both turns)."""
        path = self.resolve(self.params.reference_file, self.params.reference_url)
        return {
            str(row["question_id"]): list(row["choices"][0]["turns"])
            for row in load_jsonl_records(path, self.cache_dir)
        }

    def turn_settings(self, sample: Sample, turn: int) -> TurnSettings:
        if not self.params.use_category_temperatures:
            return TurnSettings()
        if sample.category not in self.params.category_temperatures:
            raise KeyError(
                f"no temperature for MT-Bench category '{sample.category}' in task.params.category_temperatures"
            )
        return TurnSettings(temperature=float(self.params.category_temperatures[sample.category]))

    def build_messages(self, sample: Sample, turn: int, previous_answers: list[str]) -> list[dict[str, str]]:
        self._previous_answers[(sample.sample_id, turn)] = list(previous_answers)
        return super().build_messages(sample, turn, previous_answers)

    def score(self, sample: Sample, turn: int, output_text: str) -> dict[str, float] | None:
        if self.params.judge == "none":
            return None
        previous = self._previous_answers.pop((sample.sample_id, turn), None)
        if previous is None or len(previous) != turn:
            log.warning("MT-Bench %s turn %d: the earlier answers are unknown; not judged", sample.sample_id, turn + 1)
            return None
        rating = self.rate(sample, turn, [*previous, output_text])
        if rating is None:
            return None
        return {"mt_bench_score": rating, f"mt_bench_score_turn{turn + 1}": rating}

    def rate(self, sample: Sample, turn: int, answers: list[str]) -> float | None:
        """The judge's 1-10 rating of ``answers[turn]`` (None when its reply has no rating)."""
        if self._prompts is None:
            self._prompts = load_judge_prompts(
                self.resolve(self.params.judge_prompts_file, self.params.judge_prompts_url)
            )
        request = build_request(
            self._prompts,
            sample.category,
            turn,
            sample.turns,
            answers,
            sample.reference,
            self.params.reference_categories,
        )
        key = (request.system, request.user)
        if key not in self._judgments:
            if self.judge is None:
                self.judge = build_judge(self.params.judge, self.params.openai, self.params.hf, str(self.cache_dir))
            self._judgments[key] = self.judge.complete(request.system, request.user)
        rating = parse_rating(self._judgments[key])
        if rating is None:
            log.warning(
                "MT-Bench %s turn %d: no [[rating]] in the judgment of %s", sample.sample_id, turn + 1, self.judge.name
            )
        return rating
