"""Input-guided Aggressive Decoding for decoder-only models (Ge et al. 2022, "Lossless Acceleration
for Seq2seq Generation with Aggressive Decoding", IAD; microsoft/unilm ``decoding/IAD``; its
decoder-only analogue is LLMA, microsoft/LMOps ``llma``).

For tasks whose output largely copies the input (grammar correction, editing, summaries quoting
their source, retrieval-augmented answers) the input itself is the draft. The drafter keeps an
alignment: a position in the input (the prompt) that the output is currently copying.

* aligned — draft the input from the aligned position on (up to ``max_draft_tokens``, the whole
  remaining input in the paper); the loop verifies it in one forward; if every draft is accepted
  the alignment moves on past them (the bonus token must match the next input token to stay
  aligned), otherwise the alignment is lost at the first mismatch (the paper's bifurcation);
* not aligned — decode normally (no draft) until the last ``align_ngram`` output tokens occur in
  the input again: re-align right after that occurrence (the first one at or after the previous
  alignment, the output copying the input left to right; else the first one), and copy again.

Only output tokens are matched (never the prompt's own tail), and only the input is copied from.

Followed from the paper: draft = copy of the aligned input span, one verify pass, accept up to the
first mismatch, decode normally until the output suffix matches the input again, then copy again.

Differs, and why:

* Decoder-only: the "input" is the whole prompt (instruction and text), not an encoder input.
* ``max_draft_tokens`` caps a draft (the paper copies the whole remaining sentence; on a CPU a
  verify of many tokens costs many steps, see the ``cpu`` preset).
"""

from __future__ import annotations

from dataclasses import dataclass

from decodebench.config import check
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome


class AggressiveDrafter(Drafter):
    """Copies the prompt span the output is aligned with; re-aligns on an output n-gram."""

    @dataclass
    class Params:
        align_ngram: int = 2  # output tokens that must match the input to (re-)align
        max_draft_tokens: int = 64  # cap on one copied span (paper: the rest of the input)
        # cpu preset: max_draft_tokens from the stored latency curve of the backend in use (the largest
        # block whose verify costs <= this x a 1-token step, engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(self.align_ngram >= 1, "method.params.align_ngram", self.align_ngram, ">= 1")
            check(self.max_draft_tokens >= 1, "method.params.max_draft_tokens", self.max_draft_tokens, ">= 1")
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )

    def __init__(self, params: AggressiveDrafter.Params):
        self.params = params
        self.max_draft_tokens = params.max_draft_tokens
        self.source: list[int] = []
        self.aligned: int | None = None  # input position the next output token should copy
        self.previous = 0  # the last alignment (re-alignment prefers occurrences from here on)
        self.output_start = 0
        self.counts = {"copy_steps": 0, "realignments": 0}

    def setup(self, backbone, cache_dir: str | None = None) -> None:
        self.max_draft_tokens = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.params.max_draft_tokens + 1)
            - 1
        )

    def begin(self, prompt_ids: list[int]) -> None:
        self.source = list(prompt_ids)
        self.aligned, self.previous = None, 0
        self.output_start = len(prompt_ids)
        self.counts = {"copy_steps": 0, "realignments": 0}

    def realign(self, output: list[int]) -> int | None:
        """The input position right after an occurrence of the output's last ``align_ngram`` tokens
        (the first at or after the previous alignment, else the first), or None."""
        n = self.params.align_ngram
        if len(output) < n:
            return None
        pattern, source = output[-n:], self.source
        ends = [i + n for i in range(len(source) - n + 1) if source[i : i + n] == pattern and i + n < len(source)]
        if not ends:
            return None
        later = [e for e in ends if e >= self.previous]
        return later[0] if later else ends[0]

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = min(self.max_draft_tokens, max_tokens)
        if budget <= 0:
            return Proposal()
        if self.aligned is None:
            self.aligned = self.realign(context[self.output_start :])
            if self.aligned is None:
                return Proposal()
            self.counts["realignments"] += 1
        draft = self.source[self.aligned : self.aligned + budget]
        if draft:
            self.counts["copy_steps"] += 1
        return Proposal(tokens=draft)

    def feedback(self, outcome: StepOutcome) -> None:
        """Stay aligned only while the output keeps copying (every draft and the bonus match)."""
        if self.aligned is None:
            return
        result = outcome.result
        position = self.aligned + result.accepted
        self.previous = position
        copied = (
            result.accepted == result.drafted
            and position < len(self.source)
            and result.bonus_token == self.source[position]
        )
        self.aligned = position + 1 if copied else None

    def request_stats(self) -> dict[str, float]:
        return {**super().request_stats(), **{k: float(v) for k, v in self.counts.items()}}
