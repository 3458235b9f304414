"""Medusa's typical acceptance (Cai et al. 2024, arXiv 2401.10774 §2.3.1; FasterDecoding/Medusa
``evaluate_posterior`` and ``get_typical_one_token``): a LOSSY verifier for sampling.

A drafted token ``x`` under a node whose target distribution (after temperature) is ``p`` is
accepted when ``p(x) > min(ε, α · exp(-H(p)))`` — the posterior threshold ``ε`` caps the bar, the
entropy term lowers it where the target is unsure. The accepted path is the longest root-to-node
chain of accepted tokens, ties broken by the highest summed log-probability; the bonus token is
sampled from the target at the path's end after dropping every token below that node's threshold
(typical sampling of one token). The output follows a truncated target distribution, not the
target's: methods using it declare ``lossless: false``. Greedy decoding keeps the exact verifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodebench.engine.sampling import SamplingParams, logits_to_probs, sample
from decodebench.engine.verify import VerifyResult


def typical_thresholds(probs: torch.Tensor, posterior_threshold: float, posterior_alpha: float) -> torch.Tensor:
    """``(n, vocab)`` probabilities → ``(n,)`` acceptance bars ``min(ε, α · exp(-H(p)))``."""
    entropy = -(probs * torch.log(probs + 1e-5)).sum(-1)  # the reference's 1e-5
    return torch.minimum(torch.full_like(entropy, posterior_threshold), torch.exp(-entropy) * posterior_alpha)


def verify_typical(
    tokens: Sequence[int],
    parents: Sequence[int],
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    posterior_threshold: float,
    posterior_alpha: float,
) -> VerifyResult:
    """Typical acceptance over a verified block (root at 0, parent pointers; rows of ``logits``
    predict the token after each node, as in :mod:`decodebench.engine.verify`)."""
    probs = logits_to_probs(logits, params)
    bars = typical_thresholds(probs, posterior_threshold, posterior_alpha)
    depth, score = [0] * len(tokens), [0.0] * len(tokens)
    best = 0  # the deepest node whose whole chain is accepted (highest likelihood among equals)
    for node in range(1, len(tokens)):  # parents come before their children
        parent = parents[node]
        if parent != 0 and depth[parent] == 0:
            continue  # an ancestor was rejected
        p = float(probs[parent, tokens[node]])
        if p <= float(bars[parent]):
            continue
        depth[node], score[node] = depth[parent] + 1, score[parent] + float(torch.log(torch.tensor(p)))
        if (depth[node], score[node]) > (depth[best], score[best]):
            best = node
    path: list[int] = []
    node = best
    while node != 0:
        path.append(node)
        node = parents[node]
    path.reverse()
    bonus = probs[best].masked_fill(probs[best] < bars[best], 0.0)
    return VerifyResult(
        accepted_nodes=path,
        accepted_tokens=[int(tokens[i]) for i in path],
        bonus_token=sample(bonus / bonus.sum(), generator),
        drafted=len(tokens) - 1,
    )
