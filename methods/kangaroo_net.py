"""Kangaroo's adapter as a ``decodebench-train`` network (``drafter=kangaroo``).

Data — self-distillation on the pipeline's corpus (the model's OWN greedy answers,
:mod:`decodebench.training.corpus`): one teacher-forced forward of ``prompt + answer`` per sequence
(prepared once) gives, at every position, the shallow hidden state (output of layer
``exit_layer - 1``) — the adapter's input; the corpus holds the target's final hidden state,
whose LM-head distribution is the adapter's soft label (as in the reference ``train.py``: cross
entropy against the target's distribution). Only the adapter trains (attention + 2 norms, from the
target's layer ``exit_layer`` and final norm); the shallow layers and the LM head are the target's,
frozen. Checkpoint: ``<cache>/drafters/<model>/kangaroo/``, read by ``method=kangaroo``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.methods.draft_heads import DraftVocab
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.methods.kangaroo import KangarooAdapter


@dataclass
class ShallowSequence:
    """One corpus sequence as the adapter trains on it."""

    shallow: torch.Tensor  # (T, hidden): output of layer exit_layer - 1
    final: torch.Tensor  # (T, hidden): target's final hidden state after the final norm
    answer_start: int  # positions >= answer_start - 1 predict answer tokens (loss positions)


class KangarooNet(nn.Module):
    network = "kangaroo"

    @dataclass
    class Params:
        exit_layer: int = 2  # shallow sub-network depth (paper: 2 layers)

        def __post_init__(self) -> None:
            check(self.exit_layer >= 1, "drafter.params.exit_layer", self.exit_layer, ">= 1")

    def __init__(self, backbone: Backbone, params: KangarooNet.Params, vocab: DraftVocab | None = None):
        super().__init__()
        if params.exit_layer >= backbone.config.num_hidden_layers:
            from decodebench.registry import DecodeBenchError

            raise DecodeBenchError(
                f"drafter.params.exit_layer={params.exit_layer}: the model has only "
                f"{backbone.config.num_hidden_layers} layers"
            )
        self.params = params
        self.adapter = KangarooAdapter.from_backbone(backbone, params.exit_layer)

    # -- checkpoint --------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.adapter.state_dict()

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": asdict(self.params),
            "exit_layer": self.params.exit_layer,
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.adapter.parameters())

    # -- training ----------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: the states are inputs of autograd-tracked training
    def prepare(self, sequence: FeatureSequence, backbone: Backbone) -> ShallowSequence:
        ids = sequence.ids.tolist()
        out = backbone.forward(ids, backbone.new_cache(len(ids) + 8), output_hidden_states=True, logits_rows=[])
        return ShallowSequence(
            shallow=out.hidden_states[self.params.exit_layer].clone(),
            final=sequence.features.to(backbone.device, backbone.dtype),
            answer_start=sequence.answer_start,
        )

    def loss(self, sequence: ShallowSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """Soft cross entropy against the target's distribution at the answer positions, and top-1
        agreement (adapter argmax = target argmax, an estimate of per-token acceptance)."""
        hidden = sequence.shallow[None]
        length = hidden.shape[1]
        positions = torch.arange(length, device=hidden.device)
        mask = backbone._block_mask(0, positions, None, None)  # None (= causal) for sdpa
        rotary = backbone.layer_position_embeddings(hidden, positions[None], self.params.exit_layer)
        rows = slice(sequence.answer_start - 1, length)
        out = self.adapter(hidden, rotary, mask)[0][rows]
        log_q = torch.log_softmax(backbone.head(out).float(), dim=-1)
        with torch.no_grad():
            p = torch.softmax(backbone.head(sequence.final[rows]).float(), dim=-1)
        loss = -(p * log_q).sum(-1).mean()
        return loss, Agreement(int((log_q.argmax(-1) == p.argmax(-1)).sum()), int(p.shape[0]))
