"""Speculative sampling with a draft model (SpS; Leviathan et al. 2023, Chen et al. 2023).

A smaller model of the same tokenizer (``model.draft``) drafts ``γ`` tokens autoregressively; the
target verifies them in one forward with the engine's verifier: greedy longest prefix under
greedy decoding, and under sampling the Leviathan rule (accept ``x`` with ``min(1, p(x)/q(x))``,
resample the first rejection from ``norm(max(0, p − q))``), which needs the distribution ``q``
every draft was drawn from (``Proposal.probs``). Lossless under greedy and sampling.

Draft length: ``schedule: constant`` keeps ``γ = num_draft_tokens``; ``heuristic`` is the
transformers assisted-generation heuristic (``γ += 2`` when every draft was accepted, else
``γ −= 1``, at least 1), carried across requests like transformers' ``"heuristic"`` schedule (and
reset after warm-up by :meth:`reset_state`); ``heuristic_transient`` restarts from
``num_draft_tokens`` at every request. ``max_draft_tokens`` caps the heuristic.

Draft KV cache: the draft keeps its own :class:`KVCache` across steps together with the list of
token ids whose K/V it holds (:class:`DraftModelState`). Each step it is cropped to the longest
common prefix of that list and the context (everything up to the first rejected draft survives),
then only the missing tokens — the accepted drafts it has not seen and the bonus token, usually
1 or 2 — are fed. The last draft of a step is never fed (its distribution is not needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.drafting import Drafter, Proposal, StepOutcome
from decodebench.engine.sampling import logits_to_probs, sample

SCHEDULES = ("constant", "heuristic", "heuristic_transient")


class DraftModelState:
    """A draft model with its own KV cache that persists across decode steps.

    Attributes:
        backbone: the draft model's engine wrapper.
        cache: its KV cache; entry ``i`` holds the K/V of ``fed[i]``.
        fed: token ids whose K/V are in ``cache`` (a prefix of the request's context, possibly
            followed by drafts that were later rejected).
    """

    def __init__(self, backbone: Backbone, capacity: int = 512):
        self.backbone = backbone
        self.cache = backbone.new_cache(capacity)
        self.fed: list[int] = []

    def reset(self) -> None:
        """Forget the previous request."""
        self.cache.reset()
        self.fed = []

    def sync(self, context: Sequence[int]) -> ForwardOutput:
        """Crop the cache to its common prefix with ``context`` and feed the rest.

        At least the last context token is (re)fed, since its logits are what the caller needs.

        Args:
            context: ``(t,)`` prompt + emitted tokens.

        Returns:
            ForwardOutput whose last logits row predicts the token after ``context``
            (``last_hidden`` holds the fed tokens' final hidden states).
        """
        limit = min(len(self.fed), len(context) - 1)
        common = 0
        while common < limit and self.fed[common] == context[common]:
            common += 1
        self.crop(common)
        return self.feed(context[common:])

    def crop(self, length: int) -> None:
        """Keep the first ``length`` cached tokens."""
        self.cache.crop(length)
        del self.fed[length:]

    def feed(self, tokens: Sequence[int]) -> ForwardOutput:
        """Append ``tokens`` (a chain) to the cache; logits only for the last one."""
        out = self.backbone.forward(list(tokens), self.cache, logits_rows=slice(-1, None))
        self.fed.extend(int(t) for t in tokens)
        return out


def fit_vocab(row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Pad (with zeros) or cut a ``(..., draft_vocab)`` tensor to the target's ``vocab_size``.

    Same-tokenizer checkpoints may pad their embedding matrices differently; ids beyond the
    tokenizer's length are never real tokens, so zero probability there is exact.
    """
    size = row.shape[-1]
    if size == vocab_size:
        return row
    if size > vocab_size:
        return row[..., :vocab_size]
    return torch.nn.functional.pad(row, (0, vocab_size - size))


class DraftModelDrafter(Drafter):
    """Shared plumbing of drafters that draft with a separate model (``model.draft``)."""

    needs_draft_model = True

    def __init__(self) -> None:
        self.draft: DraftModelState | None = None
        self.target_vocab: int | None = None

    def attach_draft(self, draft: Backbone) -> None:
        self.draft = DraftModelState(draft)

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        if self.draft is None:
            raise RuntimeError(
                f"{type(self).__name__} needs a draft model: the runner calls attach_draft() "
                "before setup() when model.draft is set"
            )
        self.target_vocab = backbone.lm_head.out_features

    def begin(self, prompt_ids: list[int]) -> None:
        self.draft.reset()

    def draft_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """``(vocab,)`` draft logits → the distribution drafts are sampled from (the request's
        temperature / top-k / top-p, exactly as the target's), on the target's vocabulary."""
        return fit_vocab(logits_to_probs(logits, self.sampling), self.target_vocab)

    def choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """Next draft token from ``(vocab,)`` draft logits: argmax under greedy decoding, else a
        sample; returns the token and the ``(target_vocab,)`` distribution it was drawn from."""
        if self.sampling.greedy:
            return int(logits.argmax()), None
        q = self.draft_distribution(logits)
        return sample(q, self.generator), q


class SpeculativeSamplingDrafter(DraftModelDrafter):
    """SpS: a chain of ``γ`` draft-model tokens per step (fixed or heuristic ``γ``)."""

    @dataclass
    class Params:
        num_draft_tokens: int = 5  # γ (the start value under the heuristic schedules)
        schedule: str = "constant"  # constant | heuristic | heuristic_transient
        max_draft_tokens: int = 32  # cap for the heuristic schedules (and for budget_from_curve)
        # cpu preset: γ from the target's stored latency curve and its draft cost ratio c (decodebench-
        # profile --draft): max E(γ) / (γc + T(γ+1)/T(1)) at this per-draft acceptance (engine/budget.py)
        budget_from_curve: bool = False
        expected_acceptance: float = 0.8  # per-draft acceptance assumed when picking γ from the curve
        # SmartSpec (Liu et al. 2024): each step's draft length from the batch size, the moving-average
        # acceptance and the T(B, k) surface, for maximal expected goodput (0 = no speculation);
        # max(γ, num_draft_tokens) is the cap; replaces the γ schedule (engine/smartspec.py)
        smartspec: bool = False

        def __post_init__(self) -> None:
            check(
                0.0 <= self.expected_acceptance <= 1.0,
                "method.params.expected_acceptance",
                self.expected_acceptance,
                "0 .. 1",
            )
            check(self.num_draft_tokens >= 1, "method.params.num_draft_tokens", self.num_draft_tokens, ">= 1")
            check(self.schedule in SCHEDULES, "method.params.schedule", self.schedule, " | ".join(SCHEDULES))
            check(
                self.max_draft_tokens >= self.num_draft_tokens,
                "method.params.max_draft_tokens",
                self.max_draft_tokens,
                f">= num_draft_tokens ({self.num_draft_tokens})",
            )

    def __init__(self, params: SpeculativeSamplingDrafter.Params):
        super().__init__()
        self.params = params
        self.gamma = self.start_gamma = params.num_draft_tokens

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        self.gamma = self.start_gamma = self._gamma_from_curve(backbone, cache_dir) or self.params.num_draft_tokens
        if self.params.smartspec:
            self.gamma = self.start_gamma = max(self.gamma, self.params.num_draft_tokens)
            self.enable_smartspec(backbone, cache_dir, self.gamma)

    def _gamma_from_curve(self, backbone: Backbone, cache_dir: str | None) -> int | None:
        """γ from the stored curve of the target's backend when it also holds this draft's cost ratio."""
        if not self.params.budget_from_curve or not getattr(backbone, "model_name", None):
            return None
        from decodebench.engine.budget import pick_draft_budget
        from decodebench.engine.profile import load_latency_curve

        curve = load_latency_curve(backbone.model_name, backbone.backend, backbone.device.type, cache_dir)
        draft = (curve or {}).get("draft") or {}
        if draft.get("model") != getattr(self.draft.backbone, "model_name", None) or "cost_ratio" not in draft:
            return None
        choice = pick_draft_budget(
            curve,
            self.params.expected_acceptance,
            self.params.max_draft_tokens,
            draft_cost_ratio=float(draft["cost_ratio"]),
        )
        if choice.draft_tokens < 1:
            return None
        self.verify_budget, self.budget_source = choice.draft_tokens + 1, f"curve:{backbone.backend}"
        return choice.draft_tokens

    def reset_state(self) -> None:
        self.gamma = self.start_gamma

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        if self.params.schedule == "heuristic_transient":
            self.gamma = self.start_gamma

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = min(self.gamma, max_tokens)
        if budget <= 0:
            return Proposal()
        out = self.draft.sync(context)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        while True:
            token, q = self.choose(out.logits[-1])
            tokens.append(token)
            if q is not None:
                rows.append(q)
            if len(tokens) == budget:
                break
            out = self.draft.feed([token])
        return Proposal(tokens=tokens, probs=torch.stack(rows) if rows else None)

    def feedback(self, outcome: StepOutcome) -> None:
        if self.params.schedule == "constant" or self.speculation is not None or not outcome.proposal.tokens:
            return
        if outcome.result.accepted == len(outcome.proposal):
            self.gamma = min(self.gamma + 2, self.params.max_draft_tokens)
        else:
            self.gamma = max(1, self.gamma - 1)
