"""SpecDec++: adaptive candidate length from a predicted acceptance probability (Huang, Guo and
Wang 2024, arXiv 2405.19715; Kaffaljidhmah2/SpecDec_pp).

Speculative sampling with a draft model (as ``sps``), but the draft length is decided token by
token: after drafting ``y_1..y_i`` the drafter estimates the probability that each would be
accepted, ``a_j``, and stops when the predicted probability that at least one of them is rejected,
``1 − Π_{j≤i} a_j``, exceeds ``stop_threshold`` (the paper's MDP result: stopping is optimal once
that probability crosses a threshold), within ``[min_draft_tokens, max_draft_tokens]``.

``a_j`` comes from a small acceptance head on the draft model — residual SiLU blocks on the
draft's final (normed) hidden state at ``y_j`` and a linear output — trained on CPU by
``python -m decodebench.methods.specdec_pp_train`` (see that module) and stored in the cache per
(target, draft, decoding mode). Without a trained head the drafter falls back to the draft's own
confidence, ``a_j = q(y_j)`` (the draft probability of the drafted token; DySpec's observation is
that it tracks the acceptance rate), under the same stopping rule.

Losslessness: whether ``y_{i+1}`` is drafted depends only on ``y_1..y_i`` (never on ``y_{i+1}``
itself), so the engine's Leviathan verifier keeps the target distribution (greedy: AR output).
With a head, ``y_i`` is fed to the draft before the decision (its hidden state is the feature);
that forward also yields ``y_{i+1}``'s distribution, so continuing costs nothing extra. The
confidence fallback decides before feeding ``y_i`` and saves that forward when it stops.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decodebench.config import check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Proposal
from decodebench.methods.sps import DraftModelDrafter

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


def model_key(backbone: Backbone) -> str:
    """A file-name-safe name for a model: its directory's name (catalogue models live in
    ``<cache>/models/<name>``), else a fingerprint of its shape (random tiny models)."""
    config = backbone.config
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name
    if name:
        return name
    return f"{config.model_type}-h{config.hidden_size}-l{config.num_hidden_layers}-v{config.vocab_size}"


def head_path(cache_dir: str | None, target: Backbone, draft: Backbone, mode: str) -> Path:
    """Default location of a trained head: ``<cache>/specdec_pp/<target>__<draft>/head-<mode>.pt``."""
    root = Path(cache_dir or default_cache_dir()).expanduser()
    return root / "specdec_pp" / f"{model_key(target)}__{model_key(draft)}" / f"head-{mode}.pt"


def save_head(path: Path, head: AcceptanceHead, meta: dict[str, Any]) -> None:
    """Write the head's weights (``path``) and a JSON description next to it (``.json``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "hidden_size": head.hidden_size, "num_layers": head.num_layers}
    torch.save({"state_dict": head.state_dict(), "meta": meta}, path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_head(path: Path, hidden_size: int) -> AcceptanceHead:
    """Read a head written by :func:`save_head`; its width must match the draft model's."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    meta = payload["meta"]
    if meta["hidden_size"] != hidden_size:
        raise ValueError(
            f"acceptance head {path} is for hidden size {meta['hidden_size']}, the draft model has {hidden_size}"
        )
    head = AcceptanceHead(meta["hidden_size"], meta["num_layers"])
    head.load_state_dict(payload["state_dict"])
    return head.eval()


class SpecDecPPDrafter(DraftModelDrafter):
    """Draft-model chain whose length is chosen by a predicted P(at least one rejection)."""

    @dataclass
    class Params:
        stop_threshold: float = 0.3  # stop once predicted P(>= 1 rejection) exceeds this
        min_draft_tokens: int = 2  # paper's bound [2, 20]
        max_draft_tokens: int = 20
        # trained head: null = <cache>/specdec_pp/<target>__<draft>/head-<greedy|sampling>.pt;
        # a file that does not exist means the confidence fallback
        head_path: str | None = None
        use_head: bool = True  # false: always the confidence fallback

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

    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        super().setup(backbone, cache_dir)
        self.target, self.cache_dir = backbone, cache_dir
        self.heads = {}

    def _head_for(self, mode: str) -> AcceptanceHead | None:
        """The trained head for ``mode`` (loaded once), or None for the confidence fallback."""
        if mode not in self.heads:
            head = None
            if self.params.use_head:
                path = (
                    Path(self.params.head_path.replace("{mode}", mode)).expanduser()
                    if self.params.head_path
                    else head_path(self.cache_dir, self.target, self.draft.backbone, mode)
                )
                if path.is_file():
                    head = load_head(path, self.draft.backbone.config.hidden_size)
                    head.to(self.draft.backbone.device)
                    log.info("specdec_pp: %s acceptance head %s", mode, path)
                else:
                    log.warning(
                        "specdec_pp: no trained %s acceptance head at %s; using the draft-confidence "
                        "fallback (train one: python -m decodebench.methods.specdec_pp_train)",
                        mode,
                        path,
                    )
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

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        budget = min(self.params.max_draft_tokens, max_tokens)
        if budget <= 0:
            return Proposal()
        out = self.draft.sync(context)
        tokens: list[int] = []
        rows: list[torch.Tensor] = []
        log_all_accepted = 0.0  # log Π a_j
        stop_below = math.log1p(-self.params.stop_threshold)  # stop once Π a_j < 1 - threshold
        while True:
            token, q = self.choose(out.logits[-1])
            tokens.append(token)
            if q is not None:
                rows.append(q)
            if len(tokens) == budget:
                break
            if self.head is None:
                accept = self._confidence(out.logits[-1], token, q)
                out = None
            else:
                out = self.draft.feed([token])
                accept = self._head_acceptance(out.last_hidden[-1])
            log_all_accepted += math.log(max(accept, 1e-12))
            if len(tokens) >= self.params.min_draft_tokens and log_all_accepted < stop_below:
                break
            if out is None:
                out = self.draft.feed([token])
        return Proposal(tokens=tokens, probs=torch.stack(rows) if rows else None)
