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

Batched speculation (``gen.batch_size > 1``): the rows' drafters share one batched draft cache
(:class:`DraftBatch`, one row per live row, each with its ``fed`` list) and
:meth:`ChainDrafter.propose_rows` (SpS, SpecDec++) drafts for all rows at once: ONE catch-up forward
(every row feeds its own missing tokens, padded) and then one batched one-token forward per further
draft level, instead of one draft forward per row and draft token. A row whose chain ended (its
``γ`` under the heuristic schedule, the last tokens of a request, SpecDec++'s stopping rule) sits
out the remaining levels as padding.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.drafting import Drafter, Proposal, RowProposals, StepOutcome
from decodebench.engine.sampling import logits_to_probs, sample
from decodebench.engine.timing import now

SCHEDULES = ("constant", "heuristic", "heuristic_transient")


def reusable_prefix(fed: Sequence[int], context: Sequence[int]) -> int:
    """How many cached entries of ``fed`` still serve ``context``: their longest common prefix, but
    never the last context token, which is always (re)fed since its logits are what the caller needs."""
    limit = min(len(fed), len(context) - 1)
    common = 0
    while common < limit and fed[common] == context[common]:
        common += 1
    return common


class DraftModelState:
    """A draft model with its own KV cache that persists across decode steps.

    Attributes:
        backbone: the draft model's engine wrapper.
        cache: its KV cache; entry ``i`` holds the K/V of ``fed[i]``.
        fed: token ids whose K/V are in ``cache`` (a prefix of the request's context, possibly
            followed by drafts that were later rejected).
        batch: while the request drafts in a batch, the :class:`DraftBatch` whose cache holds the
            K/V of ``fed`` (in this state's row) instead of ``cache``.
    """

    def __init__(self, backbone: Backbone, capacity: int = 512):
        self.backbone = backbone
        self.cache = backbone.new_cache(capacity)
        self.fed: list[int] = []
        self.batch: DraftBatch | None = None

    def reset(self) -> None:
        """Forget the previous request (and the batch it drafted in)."""
        self.cache.reset()
        self.fed = []
        self.batch = None

    def sync(self, context: Sequence[int]) -> ForwardOutput:
        """Crop the cache to its common prefix with ``context`` and feed the rest.

        At least the last context token is (re)fed, since its logits are what the caller needs.

        Args:
            context: ``(t,)`` prompt + emitted tokens.

        Returns:
            ForwardOutput whose last logits row predicts the token after ``context``
            (``last_hidden`` holds the fed tokens' final hidden states).
        """
        if self.batch is not None:
            raise RuntimeError("this request drafts in a batch: its K/V are in the batch's draft cache")
        common = reusable_prefix(self.fed, context)
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


class DraftBatch:
    """The draft model's KV cache for the live rows of a batch (batched drafting): row ``r`` of
    ``cache`` holds the K/V of ``states[r].fed``, each row at its own length (right padding).

    Made at a batch's first batched proposal (every state's ``fed`` starts empty, as after
    :meth:`DraftModelState.reset`); rows whose sequence finished leave it as they leave the target's
    cache (:meth:`KVCache.keep_rows`), so they cost nothing afterwards.
    """

    def __init__(self, states: Sequence[DraftModelState], capacity: int):
        self.backbone = states[0].backbone
        self.cache = self.backbone.new_cache(capacity, batch_size=len(states))
        self.states = list(states)
        for state in self.states:
            state.fed, state.batch = [], self

    @classmethod
    def of(cls, states: Sequence[DraftModelState], capacity: int) -> DraftBatch:
        """The batch ``states`` (the live rows, in row order) draft in: the one they share, less the
        rows that left it since the last step; a new one when they share none (a new request)."""
        batch = states[0].batch
        if batch is None or any(state.batch is not batch for state in states):
            return cls(states, capacity)
        held = [id(state) for state in batch.states]
        if held != [id(state) for state in states]:
            kept = {id(state) for state in states}
            for state in batch.states:
                if id(state) not in kept:
                    state.batch = None  # its sequence finished; its next request starts afresh
            batch.cache.keep_rows([held.index(id(state)) for state in states])
            batch.states = list(states)
        return batch

    def catch_up(self, contexts: Sequence[Sequence[int] | None]) -> torch.Tensor:
        """Crop every row to what still serves its context (:func:`reusable_prefix`) and feed the
        rest, all rows in one forward; a ``None`` context feeds nothing (the row does not draft).

        Returns:
            ``(batch, vocab)`` logits predicting the token after each row's context (junk for rows
            that fed nothing).
        """
        tails: list[Sequence[int]] = []
        for state, context in zip(self.states, contexts):
            if context is None:
                tails.append([])
                continue
            common = reusable_prefix(state.fed, context)
            del state.fed[common:]
            tails.append(context[common:])
        return self.feed(tails)[0]

    def feed(self, tails: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``tails[r]`` (a chain, possibly empty) to row ``r``'s entries, all rows in one
        forward padded to the longest tail; logits only at each row's last fed token.

        Returns:
            ``(batch, vocab)`` logits and ``(batch, hidden)`` final hidden states (after the final
            norm) at each row's last fed token (junk for rows with an empty tail).
        """
        sizes = [len(tail) for tail in tails]
        width = max(sizes)
        ids = torch.tensor([[*tail, *[0] * (width - len(tail))] for tail in tails], device=self.backbone.device)
        self._settle()  # rows at the lengths of their fed lists (drops rejected drafts and padding)
        out = self.backbone.forward_batch(ids, self.cache, sizes=sizes, last_logits_only=True)
        for state, tail in zip(self.states, tails):
            state.fed.extend(int(token) for token in tail)
        self._settle()
        last = torch.tensor([max(size, 1) - 1 for size in sizes], device=out.last_hidden.device)
        return out.logits[:, -1], out.last_hidden[torch.arange(len(tails), device=last.device), last]

    def _settle(self) -> None:
        """Every row's length in ``cache`` := its ``fed`` length (the single source of truth)."""
        self.cache.row_lengths = [[len(state.fed) for state in self.states]] * self.cache.num_layers


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


class ChainDrafter(DraftModelDrafter, abc.ABC):
    """A draft-model chain per step (SpS, SpecDec++): draft, feed, draft again until the row's
    budget is spent or its stopping rule says stop; batched over the rows of a batch by
    :meth:`propose_rows`. Subclasses say how long a chain may get (:meth:`start_chain`) and, if they
    stop early, when (:meth:`keeps_drafting`, :meth:`keeps_drafting_after`)."""

    @abc.abstractmethod
    def start_chain(self, max_tokens: int) -> int:
        """Called before each chain: how many drafts it may hold (at most ``max_tokens``)."""

    def keeps_drafting(self, logits: torch.Tensor, token: int, q: torch.Tensor | None, drafted: int) -> bool:
        """After the ``drafted``-th draft ``token`` was chosen from ``logits`` (``q``: its distribution
        under sampling), before it is fed: whether the chain goes on (the budget aside)."""
        return True

    def keeps_drafting_after(self, hidden: torch.Tensor, drafted: int) -> bool:
        """After the ``drafted``-th draft was fed (``hidden``: its final hidden state): whether the
        chain goes on."""
        return True

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = self.start_chain(max_tokens)
        if budget <= 0:
            return Proposal()
        logits = self.draft.sync(context).logits[-1]
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        while True:
            token, q = self.choose(logits)
            tokens.append(token)
            if q is not None:
                rows.append(q)
            if len(tokens) == budget or not self.keeps_drafting(logits, token, q, len(tokens)):
                break
            out = self.draft.feed([token])
            if not self.keeps_drafting_after(out.last_hidden[-1], len(tokens)):
                break
            logits = out.logits[-1]
        return Proposal(tokens=tokens, probs=torch.stack(rows) if rows else None)

    @classmethod
    def propose_rows(
        cls,
        drafters: Sequence[Drafter],
        contexts: Sequence[list[int]],
        limits: Sequence[int],
        device: torch.device,
    ) -> RowProposals:
        """:meth:`propose` for every live row of a batch with the draft model run batched: one
        catch-up forward (each row feeds what its draft cache lacks, padded), then one one-token
        forward per further draft level over the rows still drafting; a row whose chain ended sits
        out the remaining levels as padding. Drafts are chosen level by level, row after row (under
        sampling from the shared generator: the same distribution as row by row, not the same
        draws). The batch's draft time is split evenly over the rows that drafted."""
        start = now(device)
        rows = cast("list[ChainDrafter]", list(drafters))  # the decode loop's row copies
        budgets = [drafter.start_chain(limit) for drafter, limit in zip(rows, limits)]
        tokens: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        drafting = [row for row, budget in enumerate(budgets) if budget > 0]
        if drafting:
            batch = DraftBatch.of([drafter.draft for drafter in rows], max(map(len, contexts)) + max(budgets) + 64)
            logits = batch.catch_up([context if budget > 0 else None for context, budget in zip(contexts, budgets)])
            while True:
                going = []
                for row in drafting:
                    token, q = rows[row].choose(logits[row])
                    tokens[row].append(token)
                    if q is not None:
                        probs[row].append(q)
                    drafted = len(tokens[row])
                    if drafted < budgets[row] and rows[row].keeps_drafting(logits[row], token, q, drafted):
                        going.append(row)
                if not going:
                    break
                logits, hidden = batch.feed([[tokens[row][-1]] if row in going else [] for row in range(len(rows))])
                drafting = [row for row in going if rows[row].keeps_drafting_after(hidden[row], len(tokens[row]))]
                if not drafting:
                    break
        proposals = [Proposal(tokens=t, probs=torch.stack(p) if p else None) for t, p in zip(tokens, probs)]
        drafted_rows = sum(1 for t in tokens if t)
        share = (now(device) - start) / max(drafted_rows, 1)
        return RowProposals(proposals=proposals, draft_s=[share if t else 0.0 for t in tokens])


class SpeculativeSamplingDrafter(ChainDrafter):
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

    def start_chain(self, max_tokens: int) -> int:
        return min(self.gamma, max_tokens)

    def feedback(self, outcome: StepOutcome) -> None:
        if self.params.schedule == "constant" or self.speculation is not None or not outcome.proposal.tokens:
            return
        if outcome.result.accepted == len(outcome.proposal):
            self.gamma = min(self.gamma + 2, self.params.max_draft_tokens)
        else:
            self.gamma = max(1, self.gamma - 1)
