"""SpecDec++: adaptive candidate length from a predicted acceptance probability (Huang, Guo and
Wang 2024, arXiv 2405.19715; Kaffaljidhmah2/SpecDec_pp).

Speculative sampling with a draft model (as ``sps``), but the draft length is decided token by
token: after drafting ``y_1..y_i`` the drafter estimates the probability that each would be
accepted, ``a_j``, and stops when the predicted probability that at least one of them is rejected,
``1 − Π_{j≤i} a_j``, exceeds ``stop_threshold`` (the paper's MDP result: stopping is optimal once
that probability crosses a threshold), within ``[min_draft_tokens, max_draft_tokens]``.

``a_j`` comes from a small acceptance head on the draft model — residual SiLU blocks on the
draft's final (normed) hidden state at ``y_j`` and a linear output — trained on the training
pipeline, ``decodebench-train drafter=specdec_pp drafter.params.mode=greedy|sampling``
(:mod:`decodebench.methods.specdec_pp_net`), one per (target, draft, decoding mode); a missing head
stops the run (exit code 2) with that command. ``use_head: false`` uses the draft's own
confidence instead, ``a_j = q(y_j)`` (the draft probability of the drafted token; DySpec's
observation is that it tracks the acceptance rate), under the same stopping rule.

Losslessness: whether ``y_{i+1}`` is drafted depends only on ``y_1..y_i`` (never on ``y_{i+1}``
itself), so the engine's Leviathan verifier keeps the target distribution (greedy: AR output).
With a head, ``y_i`` is fed to the draft before the decision (its hidden state is the feature);
that forward also yields ``y_{i+1}``'s distribution, so continuing costs nothing extra. The
confidence rule decides before feeding ``y_i`` and saves that forward when it stops.

The chain loop is SpS's (:class:`~decodebench.methods.sps.ChainDrafter`: the stopping rule is its
``keeps_drafting`` / ``keeps_drafting_after``), so in a batch (``gen.batch_size > 1``) the rows'
chains are drafted together, one batched draft forward per draft level, each row stopping by its
own rule.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from decodebench.config import check
from decodebench.engine.backbone import Backbone
from decodebench.methods.draft_heads import (
    WEIGHTS_FILE,
    MissingCheckpointError,
    checkpoint_dir,
    load_checkpoint,
    model_key,
)
from decodebench.methods.sps import ChainDrafter
from decodebench.registry import DecodeBenchError

log = logging.getLogger("decodebench")

MODES = ("greedy", "sampling")


class AcceptanceHead(nn.Module):
    """``num_layers`` residual blocks ``x + SiLU(W x + b)`` and a linear output (the paper's
    ResNet head); returns the logit of "this draft token is accepted"."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.blocks = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_layers))
        self.output = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., hidden)`` draft hidden states → ``(...,)`` acceptance logits."""
        for block in self.blocks:
            hidden = hidden + nn.functional.silu(block(hidden))
        return self.output(hidden).squeeze(-1)


def head_network(mode: str, draft_key: str) -> str:
    """The checkpoint folder of the head for ``mode`` with draft ``draft_key``:
    ``<cache>/drafters/<target>/specdec_pp-<mode>-<draft>/``."""
    return f"specdec_pp-{mode}-{draft_key}"


def train_command(target_key: str, mode: str) -> str:
    return f"decodebench-train drafter=specdec_pp model={target_key} drafter.params.mode={mode}"


def load_head(directory: Path, draft_hidden_size: int) -> AcceptanceHead:
    """A head written by ``decodebench-train drafter=specdec_pp``; its width must match the draft's."""
    state, config = load_checkpoint(directory)
    if int(config["hidden_size"]) != draft_hidden_size:
        raise DecodeBenchError(
            f"acceptance head {directory} is for a draft with hidden size {config['hidden_size']}, "
            f"this draft model has {draft_hidden_size}"
        )
    head = AcceptanceHead(int(config["hidden_size"]), int(config["num_layers"]))
    head.load_state_dict(state)
    return head.eval()


class SpecDecPPDrafter(ChainDrafter):
    """Draft-model chain whose length is chosen by a predicted P(at least one rejection)."""

    @dataclass
    class Params:
        stop_threshold: float = 0.3  # stop once predicted P(>= 1 rejection) exceeds this
        min_draft_tokens: int = 2  # paper's bound [2, 20]
        max_draft_tokens: int = 20
        # trained head folder: null = <cache>/drafters/<target>/specdec_pp-<greedy|sampling>-<draft>/
        # (decodebench-train drafter=specdec_pp drafter.params.mode=...); a missing one is an error
        checkpoint: str | None = None
        use_head: bool = True  # false: the draft's confidence q(y_j) instead of a trained head

        def __post_init__(self) -> None:
            check(0.0 < self.stop_threshold < 1.0, "method.params.stop_threshold", self.stop_threshold, "(0, 1)")
            check(self.min_draft_tokens >= 1, "method.params.min_draft_tokens", self.min_draft_tokens, ">= 1")
            check(
                self.max_draft_tokens >= self.min_draft_tokens,
                "method.params.max_draft_tokens",
                self.max_draft_tokens,
                f">= min_draft_tokens ({self.min_draft_tokens})",
            )

    def __init__(self, params: SpecDecPPDrafter.Params):
        super().__init__()
        self.params = params
        self.heads: dict[str, AcceptanceHead | None] = {}
        self.head: AcceptanceHead | None = None
        self.cache_dir: str | None = None
        self.target: Backbone | None = None
        self.log_all_accepted = 0.0  # log Π a_j over the current chain's drafts (start_chain resets it)

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        self.target, self.cache_dir = backbone, cache_dir
        self.heads = {}
        if self.params.use_head and not any(self._head_dir(mode).joinpath(WEIGHTS_FILE).is_file() for mode in MODES):
            self._missing("greedy")  # nothing trained at all: stop before decoding (the run's mode is not known yet)

    def _head_dir(self, mode: str) -> Path:
        if self.params.checkpoint:
            return Path(self.params.checkpoint).expanduser()
        return checkpoint_dir(
            self.cache_dir, model_key(self.target), head_network(mode, model_key(self.draft.backbone))
        )

    def _missing(self, mode: str) -> None:
        target_key, draft_key = model_key(self.target), model_key(self.draft.backbone)
        raise MissingCheckpointError(
            f"method 'specdec_pp' needs a trained {mode} acceptance head for target '{target_key}' with draft "
            f"'{draft_key}', and there is none at {self._head_dir(mode)}. Train it with: "
            f"{train_command(target_key, mode)} (or method.params.use_head=false for the draft's confidence)"
        )

    def _head_for(self, mode: str) -> AcceptanceHead | None:
        """The trained head for ``mode`` (loaded once), or None with ``use_head: false``."""
        if mode not in self.heads:
            head = None
            if self.params.use_head:
                directory = self._head_dir(mode)
                if not (directory / WEIGHTS_FILE).is_file():
                    self._missing(mode)
                head = load_head(directory, self.draft.backbone.config.hidden_size)
                head.to(self.draft.backbone.device)
                log.info("specdec_pp: %s acceptance head %s", mode, directory)
            self.heads[mode] = head
        return self.heads[mode]

    def begin(self, prompt_ids: list[int]) -> None:
        super().begin(prompt_ids)
        self.head = self._head_for("greedy" if self.sampling.greedy else "sampling")

    def _confidence(self, logits: torch.Tensor, token: int, q: torch.Tensor | None) -> float:
        """Fallback acceptance estimate: the draft's probability of the token it drafted."""
        if q is not None:
            return float(q[token])
        return float(torch.softmax(logits.float(), dim=-1)[token])

    @torch.inference_mode()
    def _head_acceptance(self, hidden: torch.Tensor) -> float:
        return float(torch.sigmoid(self.head(hidden.float())))

    def start_chain(self, max_tokens: int) -> int:
        self.log_all_accepted = 0.0  # log Π a_j over this chain's drafts
        return min(self.params.max_draft_tokens, max_tokens)

    def keeps_drafting(self, logits: torch.Tensor, token: int, q: torch.Tensor | None, drafted: int) -> bool:
        # without a head the acceptance estimate needs no forward: decide before feeding the draft
        return self.head is not None or self._still_likely(self._confidence(logits, token, q), drafted)

    def keeps_drafting_after(self, hidden: torch.Tensor, drafted: int) -> bool:
        return self.head is None or self._still_likely(self._head_acceptance(hidden), drafted)

    def _still_likely(self, accept: float, drafted: int) -> bool:
        """Count draft ``drafted``'s acceptance estimate in; False once Π a_j < 1 - threshold (and the
        chain holds at least ``min_draft_tokens``)."""
        self.log_all_accepted += math.log(max(accept, 1e-12))
        stop_below = math.log1p(-self.params.stop_threshold)
        return drafted < self.params.min_draft_tokens or self.log_all_accepted >= stop_below
