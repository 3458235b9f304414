"""FSPAD (Gui et al. 2024, arXiv 2408.15562; reference Luc4Gui/FSPAD) on the engine's one decode loop.

The trained :class:`~decodebench.methods.fspad_net.FspadNet` (``decodebench-train drafter=fspad``)
drafts EAGLE-2's context-aware dynamic tree, as the reference does (its tree code is EAGLE-2's
``topK_genrate``, unchanged): :meth:`~decodebench.methods.eagle.Eagle2Drafter.grow`, shared. Tokens
come from the network's ``predict`` half, and each draft node hands its ``regress`` half to its
children as their feature. Drafts are deterministic (top-k), so greedy and sampling verification
stay lossless.
"""

from __future__ import annotations

from pathlib import Path

from decodebench.engine.backbone import Backbone
from decodebench.methods.eagle import Eagle2Drafter, load_eagle
from decodebench.methods.eagle_net import EagleNet
from decodebench.methods.fspad_net import FspadNet


class FspadDrafter(Eagle2Drafter):
    """FSPAD: feature sampling + partial alignment distillation, EAGLE-2's dynamic tree."""

    Params = Eagle2Drafter.Params  # total_tokens, depth, top_k, checkpoint (null = <cache>/drafters/<model>/fspad)
    method_name = "fspad"
    network = FspadNet

    def load_network(self, backbone: Backbone, directory: Path) -> EagleNet:
        return load_eagle(backbone, directory, FspadNet)
