"""The EAGLE drafter network (Li et al. 2024, arXiv 2401.15077; SafeAILab/EAGLE branch ``v1``,
``eagle/model/cnets1.py``): feature-level autoregression.

At position ``t`` the network reads the target's feature ``f_t`` (its last hidden state after the
final norm, the one the LM head turns into the token after ``t``) and the embedding of that next
token ``x_{t+1}``: ``h = fc([embed(x_{t+1}); f_t])`` (Linear 2h → h), then ONE decoder layer of the
target's own architecture whose input norm is absent, and no final norm. The output predicts the
next feature ``f_{t+1}``; the target's LM head (or the reduced draft head, see
:class:`~decodebench.methods.draft_heads.DraftVocab`) turns it into the token after ``x_{t+1}``.
Drafting feeds predicted features back in, so one network drafts any depth.

Training (:meth:`EagleNet.loss`): ``1.0 · SmoothL1(f̂, f) + 0.1 · CE(head(f̂), softmax(head(f)))``
with uniform noise on the input features, as in the reference; the decoder layer starts from
random weights as in the reference (starting from the target's last layer was tried: on SmolLM2
its outputs are ~15x the scale of the features it must predict, and training stalled).

Weight names follow the published EAGLE-1/2 checkpoints (``fc.weight``, ``fc.bias``,
``layers.0.self_attn.*``, ``layers.0.mlp.*``, ``layers.0.post_attention_layernorm.weight``;
``embed_tokens.weight`` is the target's and is not stored here); a reduced head adds EAGLE-3's
``d2t`` / ``t2d``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from decodebench.config import check
from decodebench.engine.architectures import cache_keyword
from decodebench.engine.backbone import Backbone
from decodebench.engine.kv_cache import KVCache
from decodebench.methods.draft_heads import DraftVocab


@dataclass
class FeatureSequence:
    """One corpus sequence as the drafters train on it (see :mod:`decodebench.training.corpus`)."""

    ids: torch.Tensor  # (T,) prompt + the target's answer
    features: torch.Tensor  # (T, hidden) target's last hidden state after the final norm
    target_next: torch.Tensor  # (T,) the target's argmax after each position
    answer_start: int  # index of the first answer token


@dataclass
class Agreement:
    """Top-1 agreement with the target on a batch of positions."""

    correct: int
    positions: int


class EagleNet(nn.Module):
    network = "eagle"  # checkpoint folder and ``drafter=`` name

    @dataclass
    class Params:
        draft_vocab_size: int | None = None  # null = the target's full vocabulary (EAGLE-1/2)
        bias: bool = True  # fc bias (published EAGLE-1 configs: "bias": true)
        feature_noise: float = 0.2  # reference AddUniformNoise std (scaled by 512 / sequence length)
        feature_weight: float = 1.0  # reference p_w / v_w: 0.1 · token CE + 1.0 · feature SmoothL1
        token_weight: float = 0.1

        def __post_init__(self) -> None:
            check(
                self.draft_vocab_size is None or self.draft_vocab_size >= 2,
                "drafter.params.draft_vocab_size",
                self.draft_vocab_size,
                ">= 2 or null",
            )
            check(self.feature_noise >= 0, "drafter.params.feature_noise", self.feature_noise, ">= 0")

    def __init__(self, backbone: Backbone, params: EagleNet.Params, vocab: DraftVocab | None = None):
        super().__init__()
        config = backbone.config
        hidden = config.hidden_size
        self.params = params
        self.vocab = vocab
        self.attn_implementation = backbone.attn_implementation
        self.fc = nn.Linear(2 * hidden, hidden, bias=params.bias)
        # a fresh decoder layer of the target's own class, randomly initialised as in the reference
        # (slot 0 of the drafter's own one-layer cache)
        layer = type(backbone.layers[-1])(backbone.config, 0)
        layer.input_layernorm = nn.Identity()  # EAGLE's first layer has no input norm
        self.layers = nn.ModuleList([layer])
        self.cache_keyword = cache_keyword(layer)  # cache | past_key_values (transformers < 5.25) | layer_past
        # frozen, shared with the target (not stored in checkpoints)
        self._target = {"embed": backbone.embed_tokens, "rotary": backbone.rotary_emb}
        head = backbone.lm_head.weight if vocab is None else backbone.lm_head.weight[vocab.ids]
        self.head = nn.Linear(hidden, head.shape[0], bias=False)
        self.head.weight = nn.Parameter(head.detach().clone(), requires_grad=False)
        if vocab is not None:
            self.register_buffer("d2t", vocab.d2t)
            self.register_buffer("t2d", vocab.t2d)
        self.to(device=backbone.device, dtype=backbone.dtype)

    # -- shape / checkpoint ------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trained weights under the published names (the frozen head is the target's)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}

    def checkpoint_config(self, backbone: Backbone) -> dict[str, Any]:
        return {
            "network": self.network,
            "params": asdict(self.params),
            "hidden_size": backbone.config.hidden_size,
            "vocab_size": backbone.config.vocab_size,
            "num_hidden_layers": 1,
            "bias": self.params.bias,
            "draft_vocab_size": None if self.vocab is None else self.vocab.size,
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("head.")]

    # -- forward -----------------------------------------------------------------------------------
    def new_cache(self, backbone: Backbone, capacity: int = 512) -> KVCache:
        return KVCache(
            1,
            backbone.config.num_key_value_heads,
            backbone.head_dim,
            capacity,
            dtype=backbone.dtype,
            device=backbone.device,
        )

    def forward(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """``(q, hidden)`` features ``f_t`` and ``(q,)`` next tokens ``x_{t+1}`` at ``positions`` →
        the drafter's ``(q, ·)`` output for ``x_{t+1}``: here the predicted features ``f̂_{t+1}``
        (:meth:`draft_logits` reads tokens from it, :meth:`next_feature` the feature fed back).
        ``attention_mask`` None with ``cache`` None = causal."""
        hidden = self.layer_input(self._target["embed"](tokens), features.to(self.fc.weight.dtype))[None]
        rotary = self._target["rotary"](hidden, positions[None])
        return self.decoder_layer(hidden, attention_mask, positions[None], cache, rotary)[0]

    def layer_input(self, embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """What the decoder layer reads: ``fc([embed(x_{t+1}); f_t])``."""
        return self.fc(torch.cat([embeddings, features], dim=-1))

    def decoder_layer(self, hidden: torch.Tensor, attention_mask, position_ids, cache, rotary) -> torch.Tensor:
        """The one decoder layer, ``(1, q, hidden)`` in and out."""
        return self.layers[0](
            hidden,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{self.cache_keyword: cache},
            use_cache=cache is not None,
            position_embeddings=rotary,
        )

    def draft_logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """The network's ``(q, ·)`` output → ``(q, draft vocab)`` logits."""
        return self.head(predicted).float()

    def next_feature(self, predicted: torch.Tensor) -> torch.Tensor:
        """The network's output → the ``(q, hidden)`` feature a child node reads (the prediction itself)."""
        return predicted

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.vocab is None else draft_ids + self.d2t[draft_ids]

    # -- training ----------------------------------------------------------------------------------
    def loss(self, sequence: FeatureSequence, backbone: Backbone, noise: bool) -> tuple[torch.Tensor, Agreement]:
        """The reference loss over the answer positions of one sequence, and top-1 agreement of the
        drafted token with the target's argmax there."""
        features, ids = sequence.features, sequence.ids
        length = ids.shape[0]
        inputs = features[:-1]
        if noise and self.params.feature_noise > 0:
            inputs = inputs + (torch.rand_like(inputs) - 0.5) * self.params.feature_noise * 512 / length
        positions = torch.arange(length - 1, device=features.device)
        mask = backbone._block_mask(0, positions, None, None)  # None (= causal) for sdpa
        predicted = self(inputs, ids[1:], positions, mask, None)
        rows = slice(max(sequence.answer_start - 2, 0), length - 1)  # predicting f_{t+1}, t+1 >= answer start - 1
        predicted, wanted = predicted[rows], features[1:][rows]
        feature_loss = F.smooth_l1_loss(self.next_feature(predicted), wanted)
        log_q = torch.log_softmax(self.draft_logits(predicted), dim=-1)
        with torch.no_grad():
            p = torch.softmax(self.head(wanted).float(), dim=-1)
        token_loss = -(p * log_q).sum(-1).mean()
        loss = self.params.feature_weight * feature_loss + self.params.token_weight * token_loss
        drafted = self.to_target(log_q.argmax(-1))
        correct = int((drafted == sequence.target_next[1:][rows]).sum())
        return loss, Agreement(correct, int(drafted.shape[0]))
