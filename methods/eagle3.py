"""EAGLE-3 (Li et al. 2025, arXiv 2503.01840; SafeAILab/EAGLE ``main``) on the engine's one decode loop.

The trained :class:`~decodebench.methods.eagle3_net.Eagle3Net` (``decodebench-train drafter=eagle3``)
drafts EAGLE-2's context-aware dynamic tree — the tree code is
:meth:`~decodebench.methods.eagle.Eagle2Drafter.grow`, shared. What changes is what the committed
tokens carry: instead of the target's last hidden state, the inputs of three target layers (low,
middle, high) concatenated, which the network fuses with its ``fc``. The drafter therefore asks the
loop for every layer's hidden states (``needs_hidden_states``) in the prefill and each verify
forward, and keeps the three it fuses for the committed rows. Drafts are deterministic (top-k), so
greedy and sampling verification stay lossless.
"""

from __future__ import annotations

import logging
from pathlib import Path

from decodebench.engine.backbone import Backbone, ForwardOutput
from decodebench.engine.backends import follow_backend
from decodebench.engine.drafting import StepOutcome
from decodebench.methods.draft_heads import checkpoint_dir, model_key, require_checkpoint
from decodebench.methods.eagle import Eagle2Drafter
from decodebench.methods.eagle3_net import Eagle3Net

log = logging.getLogger("decodebench")


class Eagle3Drafter(Eagle2Drafter):
    """EAGLE-3: fused multi-layer features, own draft head, EAGLE-2's dynamic tree."""

    Params = Eagle2Drafter.Params  # total_tokens, depth, top_k, checkpoint (null = <cache>/drafters/<model>/eagle3)
    method_name = "eagle3"
    needs_hidden_states = True

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        from decodebench.methods.published import load_eagle3_checkpoint

        self.backbone = backbone
        directory = (
            Path(self.params.checkpoint).expanduser()
            if self.params.checkpoint
            else require_checkpoint(
                checkpoint_dir(cache_dir, model_key(backbone), Eagle3Net.network),
                self.method_name,
                Eagle3Net.network,
                model_key(backbone),
            )
        )
        self.net = load_eagle3_checkpoint(backbone, directory)
        kernels = follow_backend(backbone, self.net)
        self.cache = self.net.new_cache(backbone)
        self.max_nodes = (
            self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, self.largest_block()) - 1
        )
        log.info(
            "%s: drafter %s (target layers %s, %d draft nodes per step; its linears: %s)",
            self.method_name,
            directory,
            self.net.feature_layers,
            self.max_nodes,
            kernels,
        )

    # -- committed features: the fused layers instead of the last hidden state ----------------------
    def prefilled(self, output: ForwardOutput) -> None:
        self._add_features(self.net.fuse_input(output.hidden_states))

    def feedback(self, outcome: StepOutcome) -> None:
        rows = [0, *outcome.result.accepted_nodes]  # the root and the accepted path are now committed
        self._add_features(self.net.fuse_input(outcome.target.hidden_states)[rows])
