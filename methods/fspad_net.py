"""The FSPAD drafter network (Gui et al. 2024, "Boosting Lossless Speculative Decoding via Feature
Sampling and Partial Alignment Distillation", arXiv 2408.15562; reference code Luc4Gui/FSPAD,
``eagle/model/cnets_fspad.py`` and ``eagle/train/main_fspad.py``, a fork of EAGLE-2's).

EAGLE's drafter (:class:`~decodebench.methods.eagle_net.EagleNet`) with two changes:

* **feature sampling** (``feature_sampling``): the target feature ``f_t`` carries the uncertainty of
  the token that follows it; the embedding ``e`` of the token the target actually emitted resolves
  it. After EAGLE's ``fc`` a gated MLP in which that embedding is the gate samples the feature in
  the MLP's high-dimensional (intermediate) space, with a residual:

      h = fc([e; f_t]);   h' = h + W_down( SiLU(W_gate e) ⊙ W_up RMSNorm(h) )

  (``W_gate``, ``W_up``: hidden → the target's intermediate size, ``W_down`` back, no biases; the
  embedding is the target's, not normalised);
* **partial alignment distillation** (``partial_alignment``): feature regression and token
  confidence pull one output in two directions. The decoder layer's MLP projects to ``2h`` and its
  residual is duplicated, so the layer ends in two halves that share everything before the MLP's
  down projection: ``predict`` (first ``h``) goes only to the LM head and the token loss,
  ``regress`` (last ``h``) only to the feature loss — and ``regress`` is the feature a draft node
  feeds to its children (:meth:`FspadNet.next_feature`).

Loss, as EAGLE's with the halves split: ``1.0 · SmoothL1(regress, f_{t+1}) + 0.1 · CE(head(predict),
softmax(head(f_{t+1})))``, uniform noise on the input features. Inference is EAGLE-2's dynamic tree
(:class:`~decodebench.methods.fspad.FspadDrafter`). The reference trains 20 epochs on 68k ShareGPT
conversations at lr 5e-5 (AdamW, betas 0.9 / 0.95, 2000 warm-up steps); here the self-written corpus
and the CPU schedule of ``conf/drafter/fspad.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from decodebench.engine.backbone import Backbone
from decodebench.methods.draft_heads import DraftVocab
from decodebench.methods.eagle_net import EagleNet


class FeatureSampling(nn.Module):
    """``h + W_down(act(W_gate e) ⊙ W_up RMSNorm(h))``: the token embedding gates the feature."""

    def __init__(self, hidden: int, intermediate: int, eps: float, activation: str):
        super().__init__()
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACT2FN[activation]

    def forward(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        return hidden + self.down_proj(self.act(self.gate_proj(embeddings)) * self.up_proj(self.norm(hidden)))


class FspadNet(EagleNet):
    network = "fspad"

    @dataclass
    class Params(EagleNet.Params):
        feature_sampling: bool = True  # the embedding-gated MLP after fc (the reference's ablation "w/o FS": off)
        partial_alignment: bool = True  # predict / regress halves (the reference's ablation "w/o PAD": off)

    def __init__(self, backbone: Backbone, params: FspadNet.Params, vocab: DraftVocab | None = None):
        super().__init__(backbone, params, vocab)
        config = backbone.config
        hidden = config.hidden_size
        self.sampling = (
            FeatureSampling(hidden, config.intermediate_size, config.rms_norm_eps, config.hidden_act)
            if params.feature_sampling
            else None
        )
        self.partial_alignment = params.partial_alignment
        if params.partial_alignment:  # the MLP's down projection to [predict; regress]
            mlp = self.layers[0].mlp
            mlp.down_proj = nn.Linear(mlp.down_proj.in_features, 2 * hidden, bias=mlp.down_proj.bias is not None)
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- forward -----------------------------------------------------------------------------------
    def layer_input(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden = super().layer_input(embeddings, features)
        return hidden if self.sampling is None else self.sampling(hidden, embeddings)

    def decoder_layer(self, hidden: torch.Tensor, attention_mask, position_ids, cache, rotary) -> torch.Tensor:
        """The layer as the target family's (no input norm), ending in ``[predict; regress]`` (2h)
        under partial alignment: both halves are the post-attention residual plus their half of the
        MLP's output."""
        if not self.partial_alignment:
            return super().decoder_layer(hidden, attention_mask, position_ids, cache, rotary)
        layer = self.layers[0]
        attended, _ = layer.self_attn(
            hidden_states=hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{self.cache_keyword: cache},
            use_cache=cache is not None,
            position_embeddings=rotary,
        )
        hidden = hidden + attended
        return torch.cat([hidden, hidden], dim=-1) + layer.mlp(layer.post_attention_layernorm(hidden))

    def draft_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Tokens from the ``predict`` half."""
        hidden = self.fc.out_features
        return super().draft_logits(predicted[..., :hidden] if self.partial_alignment else predicted)

    def next_feature(self, predicted: torch.Tensor) -> torch.Tensor:
        """The ``regress`` half: the feature aligned with the target's, fed to a node's children."""
        hidden = self.fc.out_features
        return predicted[..., hidden:] if self.partial_alignment else predicted
