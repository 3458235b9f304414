"""DEL: context-aware dynamic exit layer for self-speculative decoding (Zarch et al. 2025).

Self-speculation as in LayerSkip (``methods/early_exit_spec.py``: draft with the target's first
``ℓ`` layers + its LM head, verify with the full model reusing the first ``ℓ`` layers' K/V), but
the exit layer ``ℓ`` and the draft length ``d`` are chosen anew every round, by maximising the
expected tokens per computed layer

    TPL(ℓ, d) = [(1 − α_ℓ^(d+1)) / (1 − α_ℓ)] / (d·ℓ + L)

(expected emitted tokens of a chain with per-token acceptance ``α_ℓ``, bonus included, over the
layer-forwards of ``d`` draft steps of ``ℓ`` layers and one ``L``-layer verification).
``d = 0`` (plain AR, TPL = 1/L) is a candidate too, so a model whose early layers never agree
with the final one falls back to AR instead of paying for useless drafts.

Acceptance rates come from *shadow tokens*: after each verification, the LM head is applied to
the hidden states of every candidate exit layer that the verify forward (and the draft) already
computed for the accepted tokens — no extra forwards. A shadow token "would have been accepted"
when its argmax equals the token the full model emitted at that position. Per layer the
matches and counts are kept with an exponential decay per observed token (``history_decay``), so
the estimate follows the current context; a weak prior ``α⁰_ℓ = ℓ/L`` worth ``prior_tokens``
observations starts it off. Drafting stops early after a draft whose top-1 probability is below
``stop_below`` (confidence early stop).

The DEL reference code was not available to us; the decay, prior, candidate stride and the
confidence threshold are DecodeBench's choices, written in conf/method/del.yaml. Works on plain
checkpoints (shared LM head from an early layer); LayerSkip-trained checkpoints draft far better.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.methods.early_exit_spec import EarlyExitDrafter


def expected_tokens(alpha: float, drafts: int) -> float:
    """Expected emitted tokens of a ``drafts``-long chain at per-token acceptance ``alpha``
    (bonus token included): 1 + α + … + α^d."""
    if alpha >= 1.0 - 1e-9:
        return drafts + 1.0
    return (1.0 - alpha ** (drafts + 1)) / (1.0 - alpha)


def best_exit(alphas: dict[int, float], num_layers: int, max_drafts: int) -> tuple[int, int, float]:
    """``(exit layer, draft length, TPL)`` maximising tokens per layer; ``(0, 0, 1/L)`` = AR wins."""
    best = (0, 0, 1.0 / num_layers)
    for layer, alpha in alphas.items():
        for drafts in range(1, max_drafts + 1):
            tpl = expected_tokens(alpha, drafts) / (drafts * layer + num_layers)
            if tpl > best[2] + 1e-12:
                best = (layer, drafts, tpl)
    return best


class DynamicExitDrafter(EarlyExitDrafter):
    """DEL: per-round exit layer and draft length from shadow-token acceptance estimates."""

    needs_hidden_states = True  # rounds without drafts learn from the loop's own verify forward

    @dataclass
    class Params:
        max_draft_tokens: int = 10  # largest d considered per round
        exit_layer_stride: int = 1  # candidate exit layers: stride, 2·stride, … < L (1 = every layer)
        min_exit_layer: int = 1  # smallest candidate exit layer
        stop_below: float = 0.5  # confidence early stop: end the draft after top-1 prob < this
        history_decay: float = 0.99  # per observed token; the estimate's memory is ~1/(1-decay) tokens
        prior_tokens: float = 4.0  # weight (in tokens) of the prior α⁰_ℓ = ℓ/L
        max_shadow_rows: int = 0  # shadow tokens per round (the last accepted ones); 0 = all
        shadow_interval: int = 1  # compute shadow tokens every n-th round (1 = every round)

        def __post_init__(self) -> None:
            check(self.max_draft_tokens >= 1, "method.params.max_draft_tokens", self.max_draft_tokens, ">= 1")
            check(self.exit_layer_stride >= 1, "method.params.exit_layer_stride", self.exit_layer_stride, ">= 1")
            check(self.min_exit_layer >= 1, "method.params.min_exit_layer", self.min_exit_layer, ">= 1")
            check(0.0 <= self.stop_below <= 1.0, "method.params.stop_below", self.stop_below, "0 .. 1")
            check(0.0 < self.history_decay <= 1.0, "method.params.history_decay", self.history_decay, "(0, 1]")
            check(self.prior_tokens >= 0, "method.params.prior_tokens", self.prior_tokens, ">= 0")
            check(self.max_shadow_rows >= 0, "method.params.max_shadow_rows", self.max_shadow_rows, ">= 0")
            check(self.shadow_interval >= 1, "method.params.shadow_interval", self.shadow_interval, ">= 1")

    def __init__(self, params: DynamicExitDrafter.Params):
        super().__init__()
        self.params = params
        self.candidates: list[int] = []
        self.matches: torch.Tensor | None = None  # (candidates,) decayed shadow-token matches
        self.counts: torch.Tensor | None = None  # (candidates,) decayed shadow-token counts
        self.last_choice: tuple[int, int] = (0, 0)  # (exit layer, draft length) of the last round
        self.rounds = 0  # verification rounds seen (for shadow_interval)
        self.planned: list[int] = []  # draft length chosen in each round of this request (0 = AR step)

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        layers, stride = backbone.num_layers, self.params.exit_layer_stride
        self.candidates = [layer for layer in range(stride, layers, stride) if layer >= self.params.min_exit_layer]
        if not self.candidates:  # a model shallower than the stride (tiny smoke-test models): every layer
            self.candidates = list(range(1, layers))
        self.reset_state()

    def reset_state(self) -> None:
        count = len(self.candidates)
        self.matches, self.counts = torch.zeros(count, dtype=torch.float64), torch.zeros(count, dtype=torch.float64)

    def alphas(self) -> dict[int, float]:
        """Current acceptance estimate per candidate exit layer."""
        num_layers, prior = self.backbone.num_layers, self.params.prior_tokens
        return {
            layer: float((self.matches[i] + prior * layer / num_layers) / (self.counts[i] + prior))
            if self.counts[i] + prior > 0
            else layer / num_layers
            for i, layer in enumerate(self.candidates)
        }

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.planned = []

    def request_stats(self) -> dict[str, float]:
        """The base's exit-layer stats over drafting rounds, plus ``draft_round_share`` (rounds that
        chose to draft; 0 = DEL judged every exit unprofitable) and ``planned_drafts`` (mean length)."""
        stats = super().request_stats()
        if self.planned:
            stats.update(
                draft_round_share=sum(d > 0 for d in self.planned) / len(self.planned),
                planned_drafts=sum(self.planned) / len(self.planned),
            )
        return stats

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        self.pending = None
        exit_layer, drafts, _ = best_exit(
            self.alphas(), self.backbone.num_layers, min(self.params.max_draft_tokens, max_tokens)
        )
        self.last_choice = (exit_layer, drafts)
        self.planned.append(drafts)
        if drafts == 0:
            return Proposal()
        return self.draft_chain(context, exit_layer, drafts, self.params.stop_below)

    def feedback(self, outcome: StepOutcome) -> None:
        """Shadow tokens: the LM head on each candidate layer's cached hidden states of the accepted
        path; a match = the argmax equals the token the full model emitted there."""
        states = self.block_states if self.block_states is not None else outcome.target.hidden_states
        self.block_states = None
        self.rounds += 1
        if states is None or (self.rounds - 1) % self.params.shadow_interval:
            return
        rows = [0, *outcome.result.accepted_nodes]
        emitted = outcome.result.emitted_tokens
        if self.params.max_shadow_rows:
            rows, emitted = rows[-self.params.max_shadow_rows :], emitted[-self.params.max_shadow_rows :]
        index = torch.tensor(rows, device=states[0].device)
        hidden = torch.stack([states[layer].index_select(0, index) for layer in self.candidates])  # (C, r, h)
        predicted = self.backbone.logits_from_hidden(hidden).argmax(-1).cpu()  # (C, r)
        matched = (predicted == torch.tensor(emitted)[None]).sum(-1).double()
        decay = self.params.history_decay ** len(rows)
        self.matches = self.matches * decay + matched
        self.counts = self.counts * decay + len(rows)
