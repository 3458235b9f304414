"""Verification: pure functions from (block, target logits) to the accepted path.

The verified block has the root at index 0 — the last emitted token, not yet in the cache — and
draft nodes 1..n with parent pointers inside the block (a chain is ``[-1, 0, 1, ...]``). Row ``i``
of the target logits predicts the token after node ``i``. Every verifier returns the accepted
draft nodes along one root-to-leaf path plus one bonus token drawn from the target at the path's
end, so each target forward emits ``accepted + 1`` tokens.

* :func:`verify_greedy` — longest path whose every token is the target's argmax (greedy
  decoding; output identical to AR).
* :func:`verify_sampling` — speculative sampling (Leviathan et al. 2023) generalised to trees as
  SpecInfer's multi-draft rule: at each node the children are tried in order, child ``c`` with
  draft distribution ``q_c`` is accepted with ``min(1, p(x_c) / q_c(x_c))``, otherwise ``p`` becomes
  ``norm(max(0, p - q_c))``; if no child is accepted the bonus is drawn from the final ``p``.
  Drafts without probabilities (prompt lookup, n-gram pools) are deterministic: ``q_c`` is
  one-hot, so acceptance is ``p(x_c)`` and rejection zeroes ``x_c``. The output distribution equals
  the target's (tested statistically).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from decodebench.engine.sampling import SamplingParams, logits_to_probs, sample
from decodebench.engine.tree import children_lists


@dataclass
class VerifyResult:
    accepted_nodes: list[int]  # block indices (root excluded) along the accepted path, in order
    accepted_tokens: list[int]  # their token ids
    bonus_token: int  # drawn from the target after the last accepted node
    drafted: int  # draft nodes in the block (root excluded)

    @property
    def accepted(self) -> int:
        return len(self.accepted_tokens)

    @property
    def emitted_tokens(self) -> list[int]:
        return [*self.accepted_tokens, self.bonus_token]


def verify_greedy(tokens: Sequence[int], parents: Sequence[int], logits: torch.Tensor) -> VerifyResult:
    """Greedy longest accepted path.

    Args:
        tokens: ``(n+1,)`` block token ids, root first.
        parents: ``(n+1,)`` parent pointers, ``parents[0] == -1``.
        logits: ``(n+1, vocab)`` target logits for every block node.
    """
    target_next = logits.argmax(dim=-1).tolist()
    children = children_lists(parents)
    path: list[int] = []
    node = 0
    while True:
        wanted = target_next[node]
        match = next((c for c in children[node] if tokens[c] == wanted), None)
        if match is None:
            break
        path.append(match)
        node = match
    return VerifyResult(
        accepted_nodes=path,
        accepted_tokens=[int(tokens[i]) for i in path],
        bonus_token=int(target_next[node]),
        drafted=len(tokens) - 1,
    )


def verify_sampling(
    tokens: Sequence[int],
    parents: Sequence[int],
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> VerifyResult:
    """Lossless speculative sampling over a chain or tree (see module docstring).

    Args:
        tokens, parents, logits: as in :func:`verify_greedy`.
        params: target sampling parameters (temperature > 0).
        generator: random generator (seeded per request for reproducibility).
        draft_probs: ``(n+1, vocab)`` distribution each node was drawn from (row 0 unused), or
            ``None`` for deterministic drafts.
    """
    target_probs = logits_to_probs(logits, params)
    children = children_lists(parents)
    path: list[int] = []
    node = 0
    while True:
        residual = target_probs[node].clone()
        accepted_child = None
        for child in children[node]:
            token = int(tokens[child])
            draft_p = 1.0 if draft_probs is None else float(draft_probs[child, token])
            target_p = float(residual[token])
            if draft_p > 0 and torch.rand((), generator=generator).item() < min(1.0, target_p / draft_p):
                accepted_child = child
                break
            if draft_probs is None:
                residual[token] = 0.0
            else:
                residual = torch.clamp(residual - draft_probs[child], min=0.0)
            total = residual.sum()
            # p ⊆ q (numerically): nothing left to reject into — fall back to the target itself
            residual = residual / total if total > 0 else target_probs[node].clone()
        if accepted_child is None:
            return VerifyResult(
                accepted_nodes=path,
                accepted_tokens=[int(tokens[i]) for i in path],
                bonus_token=sample(residual, generator),
                drafted=len(tokens) - 1,
            )
        path.append(accepted_child)
        node = accepted_child
