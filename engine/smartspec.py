"""SmartSpec: each step's speculation length chosen for maximal expected goodput.

Liu et al. 2024, "Optimizing Speculative Decoding for Serving Large Language Models Using
Goodput": speculation pays only while the extra verify work costs less than the tokens it saves,
and batching eats the spare compute it lives on. SmartSpec estimates, before every step, the
goodput (tokens generated per unit time) of each speculation length ``k`` for the current batch,
and drafts the best one — ``k = 0``, no speculation, when plain batched decoding wins:

    goodput(k) = Σ_rows E_row(k) / (T(B, w) + k · Σ_rows draft_time_per_token)

* ``E_row(k) = 1 + p · (α + α² + … + α^k)``: tokens a row emits with ``k`` chain drafts (the bonus
  token always, drafts while accepted), ``α`` the per-token acceptance rate and ``p`` the
  fraction of steps whose drafter found something to propose (model-free drafters such as PLD
  propose nothing without a match); both are moving averages (exponential, weight ``DECAY`` per
  step) of what the verifier counted, started from the method's ``expected_acceptance``;
* ``T(B, w)``: the measured batched verify surface (:mod:`decodebench.engine.batch_curve`) at the
  block width ``w`` a step costs: ``k + 1`` where the forward runs every padded row, ``1 + p · k``
  (the rows that propose) where it packs the padding out (the C++ decoder layer,
  :func:`decodebench.engine.fused_layers.packs_padding`);
* draft time per token: a moving average of the drafter's measured propose time per drafted token
  (zero-cost for lookup drafters, a draft model's forward for SpS).

As in the paper, one length serves every row of a step. A step without speculation observes no acceptance, so after ``PROBE_EVERY``
such steps one step drafts 1 token to keep ``α`` current. Used by the decode loop through
``Drafter.speculation`` (``method.params.smartspec=true`` for PLD, SpS and SuffixDecoding); every
row of a batch shares the drafter's one controller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decodebench.engine.batch_curve import cost_ratio

DECAY = 0.9  # moving-average weight of the past per observed step (~10 steps of memory)
PRIOR_WEIGHT = 4.0  # the starting acceptance counts as this many observed draft tokens
PROBE_EVERY = 16  # steps without speculation before a 1-token probe


@dataclass
class SmartSpec:
    """Goodput-optimal speculation length per step (see the module docstring)."""

    surface: dict[str, Any]  # T(B, k) (batch_curve.measure_batch_curve)
    max_draft: int  # the drafter's cap (its fixed setting's budget or more)
    prior_acceptance: float = 0.5
    packs_padding: bool = False  # the batch forward runs only real rows (rows without drafts cost 1)
    accepted: float = field(init=False)  # moving sums: accepted drafts, acceptance trials
    trials: float = field(init=False)
    proposing: float = 1.0  # p: fraction of rows that proposed when allowed
    draft_s_per_token: float = 0.0
    idle_steps: int = 0
    chosen: list[int] = field(default_factory=list)  # every step's k (request stats)

    def __post_init__(self) -> None:
        self.accepted = self.prior_acceptance * PRIOR_WEIGHT
        self.trials = PRIOR_WEIGHT

    @property
    def acceptance(self) -> float:
        """α: accepted drafts per acceptance trial (a chain's rejection is one failed trial)."""
        return self.accepted / self.trials if self.trials > 0 else self.prior_acceptance

    def goodput(self, batch: int, k: int) -> float:
        """Expected tokens per millisecond of a step with ``k`` drafts per row for ``batch`` rows."""
        alpha = self.acceptance
        tokens = batch * (1.0 + self.proposing * sum(alpha**i for i in range(1, k + 1)))
        width = 1.0 + self.proposing * k if self.packs_padding else k + 1.0
        step_ms = cost_ratio(self.surface, batch, width) * self._ar_step_ms(batch)
        draft_ms = k * batch * self.proposing * self.draft_s_per_token * 1000.0
        return tokens / (step_ms + draft_ms)

    def _ar_step_ms(self, batch: int) -> float:
        sizes = self.surface["batch_sizes"]
        row = next((i for i, b in enumerate(sizes) if b >= batch), len(sizes) - 1)
        return float(self.surface["ms"][row][0])

    def choose(self, batch: int) -> int:
        """This step's drafts per row (0 = a plain AR step)."""
        best = max(range(self.max_draft + 1), key=lambda k: (self.goodput(batch, k), -k))
        if best == 0:
            self.idle_steps += 1
            if self.idle_steps >= PROBE_EVERY:
                self.idle_steps, best = 0, 1
        else:
            self.idle_steps = 0
        self.chosen.append(best)
        return best

    def observe(self, allowed: int, outcomes: list[tuple[int, int, float]]) -> None:
        """After verification: each row's ``(drafted, accepted, propose seconds)`` for a step that
        allowed ``allowed`` drafts per row."""
        if allowed <= 0 or not outcomes:
            return
        drafted_rows = [o for o in outcomes if o[0] > 0]
        self.proposing = DECAY * self.proposing + (1 - DECAY) * len(drafted_rows) / len(outcomes)
        if not drafted_rows:
            return
        accepted = sum(a for _, a, _ in drafted_rows)
        failures = sum(1 for d, a, _ in drafted_rows if a < d)
        self.accepted = DECAY * self.accepted + accepted
        self.trials = DECAY * self.trials + accepted + failures
        per_token = sum(s for _, _, s in drafted_rows) / sum(d for d, _, _ in drafted_rows)
        self.draft_s_per_token = DECAY * self.draft_s_per_token + (1 - DECAY) * per_token

    def stats(self) -> dict[str, float]:
        """Request stats: the mean chosen length and the share of steps without speculation."""
        if not self.chosen:
            return {}
        return {
            "smartspec_mean_k": sum(self.chosen) / len(self.chosen),
            "smartspec_no_spec_share": sum(1 for k in self.chosen if k == 0) / len(self.chosen),
            "smartspec_acceptance": self.acceptance,
        }
