"""PEARL: parallel speculative decoding with adaptive draft length (Liu et al. 2024, "PEARL:
Parallel Speculative Decoding with Adaptive Draft Length"; reference code
smart-lty/ParallelSpeculativeDecoding runs the two models in two processes on two GPUs).

The draft model and the target run AT THE SAME TIME: the draft model drafts in a background thread
of this process while the decode loop's target forward runs in the main thread; torch kernels
release the GIL, so on a CPU the two forwards occupy different cores. torch's intra-op thread count
is process-wide (measured here: ``torch.set_num_threads(1)`` in the draft thread changes the main
thread's ``torch.get_num_threads()`` too), so both threads use the run's ``threads``; run with
``threads=1`` on a 2-core machine and the two models get one core each. The wall-clock gain is real, not simulated: every step's time is the decode loop's
own clock, and the background work a step depends on is waited for inside :meth:`propose`.

The two PEARL strategies, in the terms of the decode loop's steps (propose → one target forward →
verify → feedback):

* **pre-verify** (after a rejection, or at the start): the draft model drafts ONE token ``d1`` and
  proposes it alone; the target verifies ``d1`` while the background thread keeps drafting
  ``d2, d3, ...`` behind it (γ + 1 of them). A rejected ``d1`` costs one target step instead of a
  whole window; an accepted one leaves ``d3, ...`` for the next step (the bonus token checks ``d2``).
* **post-verify** (after a fully accepted step): the drafts the background thread made during the
  last verification are the next proposal, and while the target verifies them the thread keeps
  drafting behind them. The target's bonus token of the last step checks the first of them (it is
  kept only when the bonus equals it, so the rest continue the real context).

Draft length: ``adaptive: false`` drafts a fixed window of ``num_draft_tokens`` (γ) per round, as the
paper's PEARL with γ set to the target/draft speed ratio; ``adaptive: true`` stops the background
drafting as soon as the target's verification ends (the draft step in flight finishes), so each
round drafts as many tokens as fit in the verify time (at most ``max_draft_tokens`` + 1): the draft
length adapts to the measured speeds of the two models on this machine instead of a preset γ.
Either way drafting stops early when a step rejects a draft (the work behind it is useless).

Lossless: the target verifies every proposal with the engine's verifier (greedy longest prefix;
under sampling ``min(1, p/q)`` with residual resampling, each draft's ``q`` recorded). A prefetched
continuation is used only when the target's emitted tokens equal its head, and its drafts were drawn
from the draft model's distribution given exactly that context, independently of the target's
draws, so the verifier's guarantee holds as for SpS. Drafts are sampled with the draft thread's
own generator (seeded from the request's), since two threads never share one RNG.

Differs, and why:

* One process, two threads, one machine (the paper: two processes on two GPUs). The two models share
  the CPU's memory bandwidth, so each runs slower in parallel than alone; the reported speedup is
  what the machine really gives.
* Under sampling the first prefetched draft is kept only when the target's sampled bonus equals it
  (the paper verifies it with ``min(1, p/q)``): lossless, a little less often accepted.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from decodebench.config import check
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.engine.sampling import sample
from decodebench.methods.sps import DraftModelDrafter


@dataclass
class DraftRun:
    """Drafts the background thread made after ``base`` (the context it drafted from).

    ``tokens[i]`` was drawn from ``probs[i]`` (sampling only; empty lists of rows under greedy).
    """

    base: list[int]
    tokens: list[int] = field(default_factory=list)
    probs: list[torch.Tensor] = field(default_factory=list)

    def continuation(self, context: list[int]) -> tuple[list[int], list[torch.Tensor]]:
        """The drafts that still continue ``context`` (nothing when it left this run's path)."""
        n = len(self.base)
        if len(context) < n or context[:n] != self.base:
            return [], []
        emitted = context[n:]
        if self.tokens[: len(emitted)] != emitted or len(emitted) > len(self.tokens):
            return [], []
        k = len(emitted)
        return self.tokens[k:], self.probs[k:]


class PearlDrafter(DraftModelDrafter):
    """PEARL: pre-verify / post-verify with the draft model in a concurrent thread."""

    # The paper's setting is one sequence (batch size 1). In a batch each row is its own PEARL
    # stream: its own draft cache, pending run and background thread (a row copy gets fresh ones,
    # __deepcopy__), so every row's draft thread overlaps the batch's one target forward.

    @dataclass
    class Params:
        num_draft_tokens: int = 5  # γ: the window drafted per round (the paper sets γ to the speed ratio c)
        adaptive: bool = False  # stop drafting when the target's verification ends (≤ max_draft_tokens)
        max_draft_tokens: int = 16  # cap of one background run under adaptive drafting

        def __post_init__(self) -> None:
            check(self.num_draft_tokens >= 1, "method.params.num_draft_tokens", self.num_draft_tokens, ">= 1")
            check(self.max_draft_tokens >= 1, "method.params.max_draft_tokens", self.max_draft_tokens, ">= 1")

    def __init__(self, params: PearlDrafter.Params):
        super().__init__()
        self.params = params
        # one draft more than the window: the target's bonus token checks the first of a background run
        self.window = 1 + (params.max_draft_tokens if params.adaptive else params.num_draft_tokens)
        self.executor: ThreadPoolExecutor | None = None
        self.pending: Future | None = None
        self.stop = threading.Event()
        self.draft_generator: torch.Generator | None = None
        self.counts = {"pre_verify_steps": 0, "post_verify_steps": 0, "background_drafts": 0}

    def __deepcopy__(self, memo: dict) -> PearlDrafter:
        """A row copy (``engine.drafting.row_copy``): everything copied or shared as usual, except
        the thread machinery, which is the row's own (an idle pool, no pending run, a new stop flag)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        own = {"executor": None, "pending": None, "stop": threading.Event()}
        for name, value in vars(self).items():
            setattr(clone, name, own[name] if name in own else copy.deepcopy(value, memo))
        return clone

    # -- lifecycle -------------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        self._settle(cancel=True)
        super().begin(prompt_ids)
        self.counts = dict.fromkeys(self.counts, 0)
        self.draft_generator = None
        if not self.sampling.greedy:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            self.draft_generator = torch.Generator().manual_seed(seed)

    def finish(self) -> None:
        self._settle(cancel=True)
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None

    def request_stats(self) -> dict[str, float]:
        # called once the request's wall time is taken: a run still drafting past the request's end
        # (its last step stopped on EOS) is stopped here, so it never overlaps the next request
        self._settle(cancel=True)
        stats = {**super().request_stats(), **{k: float(v) for k, v in self.counts.items()}}
        stats["intra_op_threads"] = float(torch.get_num_threads())  # each model's (process-wide)
        return stats

    # -- drafting ----------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if self.sampling.greedy:
            return int(logits.argmax()), None
        q = self.draft_distribution(logits)
        return sample(q, self.draft_generator), q

    def _draft(self, base: list[int], count: int, stop_early: bool) -> DraftRun:
        """Background job: draft up to ``count`` tokens after ``base``; with ``stop_early`` stop as
        soon as :attr:`stop` is set (the target's verification ended or rejected a draft)."""
        run = DraftRun(base=list(base))
        out = self.draft.sync(base)
        while True:
            token, q = self._choose(out.logits[-1])
            run.tokens.append(token)
            if q is not None:
                run.probs.append(q)
            if len(run.tokens) >= count or (stop_early and self.stop.is_set()):
                return run
            out = self.draft.feed([token])

    def _launch(self, base: list[int], count: int) -> None:
        if self.executor is None:  # one draft thread, kept across requests until finish()
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pearl-draft")
        self.stop.clear()
        self.pending = self.executor.submit(self._draft, base, count, True)

    def _settle(self, cancel: bool = False) -> DraftRun | None:
        """Wait for the background run (if any) and return it; ``cancel`` stops it after the draft
        step in flight."""
        if self.pending is None:
            return None
        if cancel:
            self.stop.set()
        run, self.pending = self.pending.result(), None
        return run

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        run = self._settle()
        if max_tokens <= 0:
            return Proposal()
        tokens, rows = run.continuation(context) if run is not None else ([], [])
        if tokens:  # post-verify: the drafts made during the last verification
            self.counts["post_verify_steps"] += 1
            tokens, rows = tokens[:max_tokens], rows[: min(max_tokens, len(rows))]
            if len(tokens) < max_tokens:
                self._launch(context + tokens, self.window)
        else:  # pre-verify: one draft now, the rest behind it while the target checks it
            self.counts["pre_verify_steps"] += 1
            first = self._draft(context, 1, stop_early=False)
            tokens, rows = first.tokens, first.probs
            if max_tokens > 1:
                self._launch(context + tokens, self.window)
        self.counts["background_drafts"] += 0 if run is None else len(run.tokens)
        return Proposal(tokens=tokens, probs=torch.stack(rows) if rows else None)

    def feedback(self, outcome: StepOutcome) -> None:
        if self.pending is None:
            return
        if outcome.result.accepted < len(outcome.proposal):
            self._settle(cancel=True)  # a draft was rejected: what the thread drafts behind it is useless
        elif self.params.adaptive:
            self.stop.set()  # the verification is over: finish the draft step in flight and hand over
