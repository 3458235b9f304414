"""SkipDecode (Del Corro et al. 2023, arXiv 2307.02628; no official code) — lossy.

Every decode step runs a reduced forward: the token at generation index ``i`` runs a layer budget
``B(i)`` that decays linearly from ``max_layer_fraction`` (first generated token after the
prefill) to ``min_layer_fraction`` (at ``decay_tokens`` and after), shared by every sequence of
the batch (the step index is the same for all rows of a left-padded batch). The skipped layers are
the LOWER/middle ones: the top ``B(i) - keep_bottom`` layers always run, plus the bottom
``keep_bottom`` layers.

Why no KV recomputation is ever needed: ``B`` is non-increasing with position, so the layers run
at step ``i`` are a subset of those run at every earlier step (and the prefill runs all of them);
whatever a layer attends to was written by that same layer earlier.

Deviation, on purpose: the paper's model is fine-tuned for its exit schedule and may skip from
the embedding straight to a middle layer. Here ``keep_bottom >= 1`` — layer 0 always runs: the
harness cache's length is layer 0's (``KVCache.length``), and an un-fine-tuned model's middle layers
expect layer-0 features, not raw embeddings. The method is NOT a drafter of tokens: it never
drafts, so the decode loop's verification reduces to taking the reduced forward's next token
(``lossless: false``). It runs at batch size 1 through :func:`generate` and at
``gen.batch_size > 1`` through :func:`generate_batch` (the point of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Drafter, ForwardPlan


def layer_budget(
    generated: int, num_layers: int, max_fraction: float, min_fraction: float, decay_tokens: int, keep_bottom: int
) -> int:
    """Layers run for the token at generation index ``generated`` (>= 1; 0 is the prefill).

    Linear decay from ``max_fraction·L`` at index 1 to ``min_fraction·L`` at ``decay_tokens``;
    never below ``keep_bottom + 1`` (at least one top layer) nor above ``L``.
    """
    progress = min(1.0, max(0, generated - 1) / max(1, decay_tokens - 1))
    fraction = max_fraction - (max_fraction - min_fraction) * progress
    return max(keep_bottom + 1, min(num_layers, round(fraction * num_layers)))


def skipdecode_layers(budget: int, num_layers: int, keep_bottom: int) -> list[int]:
    """The bottom ``keep_bottom`` layers, then the top ``budget - keep_bottom`` layers."""
    top = budget - keep_bottom
    return [*range(keep_bottom), *range(num_layers - top, num_layers)]


class SkipDecode(Drafter):
    @dataclass
    class Params:
        max_layer_fraction: float = 1.0  # budget of the first generated token (fraction of layers)
        min_layer_fraction: float = 0.6  # budget from ``decay_tokens`` on
        decay_tokens: int = 128  # generation index where the linear decay reaches the minimum
        keep_bottom: int = 1  # bottom layers always run (>= 1: layer 0 holds the cache length)

        def __post_init__(self) -> None:
            check(
                0.0 < self.min_layer_fraction <= 1.0,
                "method.params.min_layer_fraction",
                self.min_layer_fraction,
                "(0, 1]",
            )
            check(
                self.min_layer_fraction <= self.max_layer_fraction <= 1.0,
                "method.params.max_layer_fraction",
                self.max_layer_fraction,
                f"[min_layer_fraction ({self.min_layer_fraction}), 1]",
            )
            check(self.decay_tokens >= 1, "method.params.decay_tokens", self.decay_tokens, ">= 1")
            check(self.keep_bottom >= 1, "method.params.keep_bottom", self.keep_bottom, ">= 1 (layer 0 always runs)")

    def __init__(self, params: SkipDecode.Params):
        self.params = params
        self.num_layers: int | None = None
        self._plans: dict[int, ForwardPlan] = {}
        self._layers_run = 0
        self._steps = 0

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        check(
            self.params.keep_bottom < backbone.num_layers,
            "method.params.keep_bottom",
            self.params.keep_bottom,
            f"< the model's {backbone.num_layers} layers",
        )
        self.num_layers = backbone.num_layers
        self._plans.clear()

    def begin(self, prompt_ids: list[int]) -> None:
        self._layers_run = self._steps = 0

    def forward_plan(self, generated: int) -> ForwardPlan:
        p = self.params
        budget = layer_budget(
            generated, self.num_layers, p.max_layer_fraction, p.min_layer_fraction, p.decay_tokens, p.keep_bottom
        )
        self._layers_run += budget
        self._steps += 1
        if budget not in self._plans:
            layers = skipdecode_layers(budget, self.num_layers, p.keep_bottom)
            self._plans[budget] = ForwardPlan(layers=None if budget == self.num_layers else layers)
        return self._plans[budget]

    def request_stats(self) -> dict[str, float]:
        """``layer_fraction``: mean fraction of decoder layers run per decode step (prefill excluded)."""
        if not self._steps:
            return {}
        return {"layer_fraction": self._layers_run / (self._steps * self.num_layers)}
