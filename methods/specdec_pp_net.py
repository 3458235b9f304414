"""SpecDec++'s acceptance head as a ``decodebench-train`` network (``drafter=specdec_pp``).

Data: the pipeline's corpus (the target's own greedy answers, :mod:`decodebench.training.corpus`).
For every answer position ``t`` with true prefix ``x_<t`` (prepared once per sequence, the target
and the draft model stay frozen):

* the target's next-token distribution ``p_t`` (its LM head on the stored feature) and the
  draft's ``q_t`` (one teacher-forced draft forward);
* a draft token ``y_t``: the draft's argmax (``mode: greedy``) or a sample from ``q_t`` at
  ``temperature`` (``mode: sampling``);
* its label: greedy ``1[argmax p_t = y_t]``; sampling the acceptance probability
  ``min(1, p_t(y_t) / q_t(y_t))`` (a soft label, as in the paper);
* its feature: the draft's final hidden state AT ``y_t`` given the true prefix — exactly what
  the drafter sees at inference. The engine's tree attention gives all of them in ONE draft
  forward (every ``y_t`` is a leaf hanging off ``x_{t-1}``). The paper instead feeds a causal
  sequence mixing draft and target tokens (mixing ratio 0.15) because a plain causal forward
  cannot attach each draft token to its own true prefix; the tree forward removes that
  approximation.

Loss: the paper's soft-label binary cross-entropy with weight ``weight_mismatch`` (paper: 6) on the
rejection class. The "agreement" the trainer reports is the share of positions whose predicted
acceptance (sigmoid > 0.5) matches the label (label >= 0.5). One head per (target, draft, mode):
checkpoint ``<cache>/drafters/<target>/specdec_pp-<mode>-<draft>/``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from decodebench.config import check
from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.engine.sampling import SamplingParams, logits_to_probs
from decodebench.methods.draft_heads import DraftVocab, model_key
from decodebench.methods.eagle_net import Agreement, FeatureSequence
from decodebench.methods.specdec_pp import MODES, AcceptanceHead, head_network
from decodebench.methods.sps import fit_vocab


@dataclass
class AcceptanceExamples:
    """One corpus sequence's training examples: draft features at each drafted token and labels."""

    features: torch.Tensor  # (n, draft hidden)
    labels: torch.Tensor  # (n,) in [0, 1]


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weight_mismatch: float) -> torch.Tensor:
    """Soft-label BCE, the rejection term weighted by ``weight_mismatch``, normalised by the
    total weight (the paper's loss)."""
    log_accept = nn.functional.logsigmoid(logits)
    log_reject = nn.functional.logsigmoid(-logits)
    loss = -(labels * log_accept + weight_mismatch * (1 - labels) * log_reject)
    return loss.sum() / (labels.sum() + weight_mismatch * (1 - labels).sum()).clamp(min=1e-8)


class SpecDecPPNet(nn.Module):
    """The acceptance head of one (target, draft, mode), trained on the draft model's features."""

    needs_draft_model = True  # decodebench-train loads model.draft and passes it as ``draft``

    @dataclass
    class Params:
        mode: str = "greedy"  # greedy | sampling: the decoding the head predicts acceptance for
        num_layers: int = 3  # paper: 3 residual blocks
        weight_mismatch: float = 6.0  # paper: BCE weight of the rejection class
        temperature: float = 1.0  # sampling mode: the decoding temperature of the labels

        def __post_init__(self) -> None:
            check(self.mode in MODES, "drafter.params.mode", self.mode, " | ".join(MODES))
            check(self.num_layers >= 0, "drafter.params.num_layers", self.num_layers, ">= 0")
            check(self.weight_mismatch > 0, "drafter.params.weight_mismatch", self.weight_mismatch, "> 0")
            check(self.temperature > 0, "drafter.params.temperature", self.temperature, "> 0")

    def __init__(self, backbone: Backbone, params: SpecDecPPNet.Params, vocab: DraftVocab | None, draft: Backbone):
        super().__init__()
        self.params = params
        self.head = AcceptanceHead(draft.config.hidden_size, params.num_layers)
        self.network = head_network(params.mode, model_key(draft))  # the checkpoint folder
        self.draft_name = model_key(draft)
        self._frozen = {"draft": draft}
        self._generator = torch.Generator().manual_seed(0)
        self.to(device=draft.device, dtype=torch.float32)

    # -- checkpoint --------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": "specdec_pp",
            "params": asdict(self.params),
            "draft": self.draft_name,
            "hidden_size": self.head.hidden_size,  # the draft's (the head reads draft features)
            "num_layers": self.head.num_layers,
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    # -- training ----------------------------------------------------------------------------------
    @torch.no_grad()  # not inference_mode: the examples are inputs of autograd-tracked training
    def prepare(self, sequence: FeatureSequence, backbone: Backbone) -> AcceptanceExamples:
        """Features and labels of one corpus sequence (see the module docstring)."""
        draft = self._frozen["draft"]
        ids = sequence.ids.tolist()
        first, count = sequence.answer_start - 1, len(ids) - sequence.answer_start
        rows = slice(first, first + count)  # row t predicts answer token t
        target_logits = backbone.head(sequence.features[rows].to(backbone.device, backbone.dtype))
        draft_logits = fit_vocab(
            draft.forward(ids, draft.new_cache(len(ids)), logits_rows=rows).logits, target_logits.shape[-1]
        )
        if self.params.mode == "greedy":
            drafted = draft_logits.argmax(-1)
            labels = (target_logits.argmax(-1) == drafted).float()
        else:
            sampling = SamplingParams(temperature=self.params.temperature)
            p, q = logits_to_probs(target_logits, sampling), logits_to_probs(draft_logits, sampling)
            drafted = torch.multinomial(q.cpu(), 1, generator=self._generator)[:, 0].to(q.device)
            labels = (p.gather(-1, drafted[:, None])[:, 0] / q.gather(-1, drafted[:, None])[:, 0]).clamp(max=1.0)
        # one tree forward: the true sequence as a chain, each y_t a leaf under x_{t-1}
        tokens, parents = ids + drafted.tolist(), [*range(-1, len(ids) - 1), *(first + t for t in range(count))]
        hidden = draft.forward(
            tokens, draft.new_cache(len(tokens)), layout=BlockLayout(parents=parents), logits_rows=[]
        ).last_hidden
        return AcceptanceExamples(features=hidden[len(ids) :].float().clone(), labels=labels.float().clone())

    def loss(self, examples: AcceptanceExamples, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        logits = self.head(examples.features)
        loss = weighted_bce(logits, examples.labels, self.params.weight_mismatch)
        correct = int(((logits > 0) == (examples.labels >= 0.5)).sum())
        return loss, Agreement(correct, int(examples.labels.shape[0]))
