"""The draft → verify contract between methods and the decode loop.

A :class:`Drafter` proposes draft tokens (a chain or a tree, possibly empty) from the current
context; the loop verifies them with one target forward and hands the outcome back through
``feedback``. A zero-length proposal is legal and makes the step a plain AR step, so "no
speculation this step" needs no special path (and AR itself is the drafter that never drafts).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# ForwardPlan / FULL_MODEL are part of the drafter contract (Drafter.forward_plan); defined next to
# the forward they configure
from decodebench.engine.backbone import FULL_MODEL, Backbone, ForwardOutput, ForwardPlan, MlpGate  # noqa: F401
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import SamplingParams
from decodebench.engine.smartspec import SmartSpec
from decodebench.engine.timing import now
from decodebench.engine.verify import VerifyResult

log = logging.getLogger("decodebench")


@dataclass
class Proposal:
    """Draft tokens for one step.

    ``parents[i]`` is the parent of draft ``i`` among the drafts (``-1`` = child of the last
    emitted token); ``None`` means a chain. ``probs`` (``(n, vocab)``) is the distribution each draft
    was drawn from, for lossless speculative sampling; ``None`` for deterministic drafters.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] | None = None
    probs: torch.Tensor | None = None
    # Auxiliary tokens forwarded after the drafts in the same target forward but never accepted
    # (e.g. LADE's Jacobi lookahead branch); their logits reach ``feedback``. ``aux_mask`` is
    # ``(a, 1 + n + a)`` bool over [last emitted token, drafts, aux] (True = attend; the prefix is
    # always visible) and ``aux_offsets`` their position offsets from the last emitted token.
    aux_tokens: list[int] = field(default_factory=list)
    aux_mask: torch.Tensor | None = None
    aux_offsets: list[int] | None = None
    # ``unverified``: the tokens are emitted as they are, with NO target forward this step (a lossy
    # method generating with another model: EAD's small model); ``parents``, ``probs`` and aux tokens
    # must be empty. The target's KV cache lags behind them and catches up on them, as a chain in
    # front of the block, at its next forward.
    unverified: bool = False

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class RowProposals:
    """One step's proposals for the live rows of a batch (:meth:`Drafter.propose_rows`), in row order,
    with the drafting seconds charged to each row (a batched draft forward's time is split evenly over
    the rows that drafted in it)."""

    proposals: list[Proposal]
    draft_s: list[float]


@dataclass
class RowForward:
    """A batch's target forward run by the drafter (:meth:`Drafter.verify_forward_rows`): ``output``
    has ``(batch, width, ...)`` rows, of which row ``r``'s first ``sizes[r]`` are its own (the first
    ``len(block_tokens[r])`` are the verify logits; more may follow, e.g. Hidden Transfer's pseudo
    rows); the feedback of row ``r`` gets exactly those ``sizes[r]`` rows."""

    output: ForwardOutput
    sizes: list[int]


@dataclass
class StepOutcome:
    """What the loop tells the drafter after verifying its proposal."""

    proposal: Proposal
    result: VerifyResult
    block_tokens: list[int]  # root (last emitted token) + drafts (aux tokens follow in the logits)
    block_parents: list[int]  # parent pointers within the block
    target: ForwardOutput  # target logits for every block node (hidden states if requested)
    context_length: int  # tokens (prompt + emitted) before this step's emitted tokens


class Drafter:
    """Base class: subclasses override :meth:`propose` and, if they learn, :meth:`feedback`."""

    #: set True when the drafter needs the target's per-layer hidden states in ``feedback``
    needs_hidden_states = False
    #: set True by methods that draft with a separate draft model (config ``model.draft``); the
    #: runner loads it, checks it shares the target's tokenizer, and calls :meth:`attach_draft`.
    needs_draft_model = False
    #: the request's sampling parameters and RNG, set by :meth:`start_request` (drafters that
    #: sample their drafts must draw from the same tempered distribution family as the target)
    sampling: SamplingParams = SamplingParams()
    generator: torch.Generator | None = None
    #: the decode loop's KV cache, set by ``generate`` before :meth:`start_request`. Self-speculative
    #: drafters (SWIFT, early exit) draft with the target's own layers on top of its committed
    #: prefix and must leave it as they found it (crop back to ``len(context) - 1``) before
    #: returning their proposal.
    target_cache: KVCache | None = None
    #: the target's tokenizer (set by the runner before :meth:`setup`; None for tokenizer-less tiny
    #: models), for drafters that read text (a retrieval corpus: REST, SAM-Decoding)
    tokenizer: Any = None
    #: batched speculation (``gen.batch_size > 1``): every row gets its own copy of the drafter
    #: (:func:`row_drafters`), proposes its own drafts and sits at its own cache length; a drafter
    #: that cannot sets this False and says why in ``batch_refusal`` (refused before loading)
    supports_batch = True
    batch_refusal = ""
    #: SmartSpec's goodput controller (:meth:`enable_smartspec`): when set, the decode loop asks it
    #: for each step's drafts per row (the ``max_tokens`` of :meth:`propose`) and tells it the outcome
    speculation: SmartSpec | None = None
    #: tokens per verify forward (root included) that :meth:`budget_from_curve` chose from the stored
    #: latency curve of the backend in use (None: the method's params decide), and where it came from
    verify_budget: int | None = None
    budget_source: str = "params"

    def reads_latency_curve(self) -> bool:
        """True when :meth:`setup` sizes the drafts from the stored verify-latency curve (the ``cpu``
        presets: ``budget_from_curve: true`` for chain budgets, ``max_verify_cost`` for trees); the
        runner then makes sure a curve is stored, measuring one on first use, before ``setup``."""
        params = getattr(self, "params", None)
        return bool(getattr(params, "budget_from_curve", False)) or getattr(params, "max_verify_cost", None) is not None

    def budget_from_curve(
        self, backbone: Backbone, cache_dir: str | None, max_verify_cost: float | None, largest: int
    ) -> int:
        """Tokens per verify forward for a CPU preset: the largest ``k <= largest`` whose verify costs
        at most ``max_verify_cost`` × a 1-token step on the stored curve of ``backbone``'s backend
        (:func:`decodebench.engine.budget.node_budget`); ``largest`` itself when ``max_verify_cost``
        is None or no curve is stored. Records the choice (``verify_budget`` in the request stats)."""
        from decodebench.engine.budget import curve_node_budget

        chosen = curve_node_budget(backbone, cache_dir, max_verify_cost, largest)
        if chosen is None:
            if max_verify_cost is not None:
                log.warning(
                    "%s: no verify-latency curve stored for %s (%s backend): drafting the full budget "
                    "(%d tokens per verify); run decodebench-profile or decode through the runner, which "
                    "measures one on first use",
                    type(self).__name__,
                    getattr(backbone, "model_name", None),
                    getattr(backbone, "backend", None),
                    largest,
                )
            return largest
        self.verify_budget, self.budget_source = chosen
        return self.verify_budget

    def enable_smartspec(self, backbone: Backbone, cache_dir: str | None, max_draft: int) -> None:
        """Choose each step's speculation length (at most ``max_draft``) for maximal expected goodput
        (:mod:`decodebench.engine.smartspec`) from the T(B, k) surface of ``backbone`` (measured now
        when none is stored), the measured acceptance and draft time; the prior acceptance is the
        method's ``expected_acceptance`` param when it has one."""
        from decodebench.engine.batch_curve import ensure_batch_curve
        from decodebench.engine.fused_layers import packs_padding

        prior = getattr(getattr(self, "params", None), "expected_acceptance", 0.5)
        surface = ensure_batch_curve(backbone, cache_dir, max_k=max_draft + 1)  # blocks: root + drafts
        self.speculation = SmartSpec(surface, max_draft, prior_acceptance=prior, packs_padding=packs_padding(backbone))

    def attach_draft(self, draft: Backbone) -> None:
        """Receive the draft model (only when ``needs_draft_model``)."""
        raise TypeError(f"{type(self).__name__} does not use a draft model")

    def start_request(self, prompt_ids: list[int], sampling: SamplingParams, generator: torch.Generator | None) -> None:
        """Called by the decode loop at the start of each generation; records the sampling
        settings, then calls :meth:`begin`."""
        self.sampling, self.generator = sampling, generator
        if self.speculation is not None:
            self.speculation.chosen = []  # per request (a batch's rows share it and start together)
        self.begin(prompt_ids)

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        """Called once after the target model is loaded (allocate state, read dimensions).
        ``cache_dir`` is the DecodeBench cache, for drafters that persist state or checkpoints."""

    def reset_state(self) -> None:
        """Return learned state (pools, tries, matrices) to where it stood before the run; the
        runner calls it after warm-up so warm-up prompts never leak into measured ones.
        Stateless drafters ignore it."""

    def finish(self) -> None:
        """Called once after the run's last generation (e.g. to persist learned state)."""

    def begin(self, prompt_ids: list[int]) -> None:
        """Called at the start of each generation with the prompt's token ids."""

    def prefilled(self, output: ForwardOutput) -> None:
        """Called after the prefill with its forward output (``last_hidden``: the target's final
        hidden state of every prompt token), for drafters that draft from target features (EAGLE,
        Medusa, Hydra); their ``feedback`` gets the same for every verified block."""

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        """Draft at most ``max_tokens`` tokens to follow ``context`` (prompt + emitted tokens)."""
        return Proposal()

    @classmethod
    def propose_rows(
        cls,
        drafters: Sequence[Drafter],
        contexts: Sequence[list[int]],
        limits: Sequence[int],
        device: torch.device,
    ) -> RowProposals:
        """Proposals for the live rows of a batch (``drafters[r]`` is row ``r``'s drafter, all of this
        class): :meth:`propose` row after row, each row timed on ``device``. Drafters that draft with a
        model override it to run that model once for all rows (SpS: one batched draft forward per
        draft level)."""
        proposals, draft_s = [], []
        for drafter, context, limit in zip(drafters, contexts, limits):
            start = now(device)
            proposals.append(drafter.propose(context, limit))
            draft_s.append(now(device) - start)
        return RowProposals(proposals=proposals, draft_s=draft_s)

    def feedback(self, outcome: StepOutcome) -> None:
        """Learn from the verification outcome (acceptance, target logits)."""

    def verify(
        self,
        block_tokens: list[int],
        block_parents: list[int],
        logits: torch.Tensor,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> VerifyResult | None:
        """The method's own verifier for this step (a lossy one, e.g. Medusa's typical acceptance,
        declared by ``lossless: false``); ``None`` = the loop's exact verifiers."""
        return None

    def verify_forward(self, block_tokens: list[int], block_parents: list[int], cache: KVCache) -> ForwardOutput | None:
        """The step's target forward over ``block_tokens`` (root + drafts), if the drafter can do it
        cheaper than a plain full forward with the same logits (LayerSkip: the draft already ran
        the first E layers of most block tokens, with exact K/V); ``None`` = the loop runs
        ``backbone.forward``. Must append every layer's K/V of the whole block to ``cache``."""
        return None

    def verify_forward_rows(
        self,
        drafters: Sequence[Drafter],
        block_tokens: Sequence[list[int]],
        block_parents: Sequence[list[int]],
        cache: KVCache,
    ) -> RowForward | None:
        """:meth:`verify_forward` for the live rows of a batch (``drafters[r]`` is row ``r``'s, all of
        this class; row ``r`` sits in cache row ``r``): one forward over every row's block, or
        ``None`` = the loop runs ``backbone.forward_batch``. Drafters whose drafts come out of their
        own verify forward (Hidden Transfer) override both."""
        return None

    def forward_plan(self, generated: int) -> ForwardPlan:
        """The part of the model the next target forward runs, given ``generated`` tokens emitted
        so far in this request (the prefill always runs the full model). Exact methods keep the
        default; lossy methods reduce it."""
        return FULL_MODEL

    def request_stats(self) -> dict[str, float]:
        """Method-specific counters of the generation that just ended (recorded per record as
        ``method_stats``), e.g. the fraction of FFN blocks skipped. Base: the verify budget chosen
        from the latency curve, when one was."""
        stats = {} if self.verify_budget is None else {"verify_budget": float(self.verify_budget)}
        return stats if self.speculation is None else {**stats, **self.speculation.stats()}


def row_drafters(drafter: Drafter, rows: int) -> list[Drafter]:
    """One drafter per row of a batch, for batched speculation: ``drafter`` itself for row 0 and
    copies of it (made once, after its ``setup``, and kept) for the others.

    Each row is its own request stream, so a drafter's per-request state (n-gram index, draft
    model cache, pending draft) and its learned state (Token Recycling's matrix, a trie, a suffix
    tree) are per row, as when the rows were served one after another by separate servers. Models,
    backbones and the tokenizer are shared, never copied. :func:`forget_row_drafters` drops the
    copies (the runner calls it after ``reset_state`` so they restart from the reset state).
    """
    copies: list[Drafter] = drafter.__dict__.setdefault("_row_copies", [])
    while len(copies) < rows - 1:
        copies.append(row_copy(drafter))
    return [drafter, *copies[: rows - 1]]


def forget_row_drafters(drafter: Drafter) -> None:
    """Drop the row copies :func:`row_drafters` made of ``drafter``."""
    drafter.__dict__.pop("_row_copies", None)


#: objects a row copy shares with its original (models and their wrappers, RNGs); found anywhere
#: in the drafter's attributes, lists, dicts and tuples
SHARED_TYPES = (Backbone, torch.nn.Module, torch.Generator, SmartSpec)


def row_copy(drafter: Drafter) -> Drafter:
    """A copy of ``drafter`` with its own state that shares its models, RNGs and SmartSpec controller."""
    shared: dict[int, Any] = {}
    seen: set[int] = set()

    def collect(value: Any) -> None:
        if id(value) in seen or value is None or isinstance(value, (str, int, float, bool, torch.Tensor)):
            return
        seen.add(id(value))
        if isinstance(value, SHARED_TYPES) or (value is drafter.tokenizer):
            shared[id(value)] = value  # deepcopy's memo: reused, not copied
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple, set)):
            for item in value:
                collect(item)
        elif hasattr(value, "__dict__"):
            for item in vars(value).values():
                collect(item)

    collect(drafter)
    if "_row_copies" in drafter.__dict__:
        shared[id(drafter.__dict__["_row_copies"])] = []
    if drafter.target_cache is not None:
        shared[id(drafter.target_cache)] = None  # the loop hands each row a view of the batch's cache
    return copy.deepcopy(drafter, shared)
