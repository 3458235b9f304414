"""FFN-SkipLLM (Jaiswal et al. 2024, arXiv 2404.03865) — lossy, input-adaptive FFN skipping.

Observation behind it: in the middle layers the residual stream barely changes across an FFN
(MLP) block — cos(h_before, h_after) saturates near 1 — and FFNs hold about two thirds of a
layer's weights. Per generated token, walking up the layers:

* the first ``keep_first`` and the last ``keep_last`` layers always run their FFN ("cold" regions
  that change the representation most);
* in between, a run FFN whose cosine similarity between input and output residual stream is at
  least ``threshold`` marks the stream as saturated: the next ``skip_span`` FFN blocks are skipped
  (greedy skipping), then one runs again and is re-checked;
* the first ``warmup_tokens`` generated tokens use the full model (the paper's warm-up: the early
  KV entries, attention sinks, stay exact).

Attention always runs, so every layer's K/V is written and no KV handling is needed. The defaults
(threshold, span) target the paper's 25–30 % of FFN blocks skipped; the realised fraction is
recorded per generation as ``method_stats.ffn_skipped``. In a batch the decision is shared: the
LOWEST similarity of the rows decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decodebench.config import check
from decodebench.engine.backbone import Backbone, MlpGate
from decodebench.engine.drafting import FULL_MODEL, Drafter, ForwardPlan


class SaturationGate(MlpGate):
    """Per-forward FFN decisions (see the module docstring); counts what it skipped."""

    def __init__(self, num_layers: int, params: FFNSkip.Params):
        self.num_layers = num_layers
        self.params = params
        self.skip_left = 0
        self.skipped = 0

    def start(self) -> None:
        """Reset the per-forward state (one gate object serves every step)."""
        self.skip_left = 0

    def _adaptive(self, layer_index: int) -> bool:
        return self.params.keep_first <= layer_index < self.num_layers - self.params.keep_last

    def run_mlp(self, layer_index: int, hidden: torch.Tensor) -> bool:
        if self._adaptive(layer_index) and self.skip_left > 0:
            self.skip_left -= 1
            self.skipped += 1
            return False
        return True

    def observe(self, layer_index: int, before: torch.Tensor, after: torch.Tensor) -> None:
        if not self._adaptive(layer_index):
            return
        similarity = torch.nn.functional.cosine_similarity(before[:, -1].float(), after[:, -1].float(), dim=-1)
        if float(similarity.min()) >= self.params.threshold:
            self.skip_left = self.params.skip_span


class FFNSkip(Drafter):
    @dataclass
    class Params:
        threshold: float = 0.97  # cos(before, after FFN) at which the stream counts as saturated
        skip_span: int = 2  # FFN blocks skipped after a saturated one
        keep_first: int = 2  # layers at the bottom that always run their FFN
        keep_last: int = 2  # layers at the top that always run their FFN
        warmup_tokens: int = 4  # first generated tokens decoded with the full model

        def __post_init__(self) -> None:
            check(-1.0 <= self.threshold <= 1.0, "method.params.threshold", self.threshold, "[-1, 1]")
            check(self.skip_span >= 1, "method.params.skip_span", self.skip_span, ">= 1")
            check(self.keep_first >= 1, "method.params.keep_first", self.keep_first, ">= 1 (the first layer is kept)")
            check(self.keep_last >= 1, "method.params.keep_last", self.keep_last, ">= 1 (the last layer is kept)")
            check(self.warmup_tokens >= 0, "method.params.warmup_tokens", self.warmup_tokens, ">= 0")

    def __init__(self, params: FFNSkip.Params):
        self.params = params
        self.gate: SaturationGate | None = None
        self._steps = 0

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        backbone.require_residual_halves("ffn_skip")  # gates each layer's MLP half
        self.gate = SaturationGate(backbone.num_layers, self.params)

    def begin(self, prompt_ids: list[int]) -> None:
        self.gate.skipped = 0
        self._steps = 0

    def forward_plan(self, generated: int) -> ForwardPlan:
        self._steps += 1
        if generated < self.params.warmup_tokens:
            return FULL_MODEL
        self.gate.start()
        return ForwardPlan(mlp_gate=self.gate)

    def request_stats(self) -> dict[str, float]:
        """``ffn_skipped``: skipped FFN blocks / all FFN blocks of the decode steps (prefill excluded)."""
        if not self._steps:
            return {}
        return {"ffn_skipped": self.gate.skipped / (self._steps * self.gate.num_layers)}
