"""Prompt lookup decoding (PLD; Saxena 2023, apoorvumang/prompt-lookup-decoding).

Drafting is string matching: take the last ``n`` tokens of the context (``n`` from
``max_ngram_size`` down to ``min_ngram_size``), find their EARLIEST earlier occurrence in the context
(prompt + output) and propose the tokens that followed it, up to ``num_draft_tokens``. No model,
no training; lossless under greedy decoding and, with one-hot draft probabilities, under sampling.

Matching follows transformers' ``PromptLookupCandidateGenerator`` (earliest match whose
continuation is non-empty). Instead of re-scanning the context every step with ``unfold``, an
incremental index maps each n-gram to its first occurrence — same answer, O(new tokens) per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from decodebench.config import check
from decodebench.engine.drafting import Drafter, Proposal


class PromptLookupDrafter(Drafter):
    @dataclass
    class Params:
        max_ngram_size: int = 3  # paper / Spec-Bench: n-gram window 3 -> 1
        min_ngram_size: int = 1
        num_draft_tokens: int = 10  # paper / Spec-Bench: 10 candidate tokens
        # true: draft the budget that maximises expected tokens per unit time on the stored latency
        # curve of the model and engine backend in use (decodebench-profile; engine/budget.py),
        # with ``expected_acceptance`` per draft; num_draft_tokens is the fallback when no curve is stored
        budget_from_curve: bool = False
        expected_acceptance: float = 0.6  # per-draft acceptance assumed when picking from the curve
        # SmartSpec (Liu et al. 2024): each step's draft length from the batch size, the moving-average
        # acceptance and the T(B, k) surface, for maximal expected goodput (0 = no speculation);
        # the fixed setting's budget is the cap (engine/smartspec.py)
        smartspec: bool = False

        def __post_init__(self) -> None:
            check(self.min_ngram_size >= 1, "method.params.min_ngram_size", self.min_ngram_size, ">= 1")
            check(
                self.max_ngram_size >= self.min_ngram_size,
                "method.params.max_ngram_size",
                self.max_ngram_size,
                f">= min_ngram_size ({self.min_ngram_size})",
            )
            check(self.num_draft_tokens >= 1, "method.params.num_draft_tokens", self.num_draft_tokens, ">= 1")
            check(
                0.0 <= self.expected_acceptance <= 1.0,
                "method.params.expected_acceptance",
                self.expected_acceptance,
                "0 .. 1",
            )

    def __init__(self, params: PromptLookupDrafter.Params):
        self.params = params
        self.first_start: dict[tuple[int, ...], int] = {}  # n-gram -> start of its first occurrence
        self.indexed_until = 0  # n-grams ending before this context position are indexed
        self.budget = params.num_draft_tokens  # drafts per step (from the curve when budget_from_curve)
        self.budget_source = "params"

    def setup(self, backbone, cache_dir: str | None = None) -> None:
        self._budget_from_curve(backbone, cache_dir)
        if self.params.smartspec:
            self.enable_smartspec(backbone, cache_dir, max(self.budget, self.params.num_draft_tokens))

    def _budget_from_curve(self, backbone, cache_dir: str | None) -> None:
        if not self.params.budget_from_curve or not getattr(backbone, "model_name", None):
            return
        from decodebench.engine.budget import pick_draft_budget
        from decodebench.engine.profile import load_latency_curve

        curve = load_latency_curve(backbone.model_name, backbone.backend, backbone.device.type, cache_dir)
        if curve is not None:
            self.budget = pick_draft_budget(curve, self.params.expected_acceptance).draft_tokens
            self.budget_source = f"curve:{backbone.backend}"

    def begin(self, prompt_ids: list[int]) -> None:
        self.first_start.clear()
        self.indexed_until = 0

    def _index(self, context: list[int]) -> None:
        for end in range(self.indexed_until + 1, len(context) + 1):
            for n in range(self.params.min_ngram_size, self.params.max_ngram_size + 1):
                if end - n >= 0:
                    self.first_start.setdefault(tuple(context[end - n : end]), end - n)
        self.indexed_until = len(context)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = min(self.budget, max_tokens)
        if budget <= 0:
            return Proposal()
        self._index(context)
        for n in range(min(self.params.max_ngram_size, len(context) - 1), self.params.min_ngram_size - 1, -1):
            start = self.first_start[tuple(context[-n:])]
            continuation = context[start + n : start + n + budget]
            if continuation:  # the suffix's own occurrence has no continuation
                return Proposal(tokens=continuation)
        return Proposal()
