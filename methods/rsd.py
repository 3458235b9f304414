"""Recursive Speculative Decoding (Jeon et al. 2024, "Recursive Speculative Decoding: Accelerating
LLM Inference via Sampling Without Replacement"; no public code — DecodeBench's own implementation
of the paper's RSD-C).

Draft tree (RSD-C, constant branching): level ``d`` gives every node of level ``d - 1`` exactly
``branching[d - 1]`` children, drawn from the draft model's distribution ``q`` at that node WITHOUT
replacement by the Gumbel-top-k trick: perturb ``log q`` with i.i.d. Gumbel noise and keep the ``k``
largest, in decreasing order. That order is distributed exactly as ``k`` sequential draws without
replacement, so sibling ``i`` is a draw from ``q_i = norm(q`` with siblings ``1..i-1`` zeroed``)``,
and ``q_i`` is recorded as that node's draft distribution.

Verification (recursive rejection sampling): the engine's tree verifier
(:func:`decodebench.engine.verify.verify_sampling`) tries the siblings in order; sibling ``i`` is
accepted with ``min(1, r_i(x_i) / q_i(x_i))`` where ``r_1`` is the target distribution and, after a
rejection, ``r_{i+1} = norm(max(0, r_i - q_i))``; an accepted node continues with its own children
and the target's distribution there; when every sibling is rejected the bonus token is drawn from the
last residual. With ``q_i`` the without-replacement distributions this is the paper's recursive
rejection sampling, and the output follows the target's distribution exactly (tested by chi-square).
Under greedy decoding the Gumbel noise is dropped (the draft's top-k) and the longest path of target
argmaxes is accepted, identical to AR.

The number of children never depends on the drawn tokens (constant branching), so no sibling is
kept or dropped by its own sampled value (see methods/dyspec.py for why that would bias the output).

Differs, and why:

* Only RSD-C (constant branching); RSD-S (stochastic beam search, a budget of ``W`` beams per level)
  is not implemented.
* Each level re-forwards the draft tree so far on top of the committed draft cache (the engine's
  mask shows the whole cache, so branches cannot stay cached while others grow), then crops back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from decodebench.config import check
from decodebench.engine.backbone import BlockLayout
from decodebench.engine.drafting import Proposal
from decodebench.methods.sps import DraftModelDrafter, fit_vocab


def gumbel_top_k(probs: torch.Tensor, k: int, generator: torch.Generator | None) -> list[int]:
    """``k`` distinct tokens (fewer if ``probs`` has fewer non-zero entries) distributed as ``k``
    sequential draws without replacement from ``probs``, in draw order."""
    k = min(k, int((probs > 0).sum()))
    uniform = torch.rand(probs.shape, generator=generator, dtype=torch.float64).clamp_(min=1e-300)
    scores = probs.double().log() - (-uniform.log()).log()  # log p + Gumbel(0, 1)
    return scores.topk(k).indices.tolist()


def without(probs: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """``probs`` with ``tokens`` zeroed, renormalised (the distribution of the next sibling)."""
    row = probs.clone()
    if tokens:
        row[tokens] = 0.0
    return row / row.sum()


class RsdDrafter(DraftModelDrafter):
    """RSD-C: a constant-branching draft tree sampled without replacement (see module docstring)."""

    @dataclass
    class Params:
        # children per node at each draft level (RSD-C); the tree has sum_d prod(branching[:d]) drafts
        branching: list[int] = field(default_factory=lambda: [3, 2, 2, 1])

        def __post_init__(self) -> None:
            self.branching = list(self.branching)
            check(
                len(self.branching) >= 1 and all(isinstance(b, int) and b >= 1 for b in self.branching),
                "method.params.branching",
                self.branching,
                "a non-empty list of integers >= 1",
            )

    def __init__(self, params: RsdDrafter.Params):
        super().__init__()
        self.params = params

    @property
    def tree_size(self) -> int:
        return sum(math.prod(self.params.branching[: d + 1]) for d in range(len(self.params.branching)))

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        levels = self.params.branching[: max(0, max_tokens)]  # depth <= what the step may still emit
        if not levels:
            return Proposal()
        committed = len(context)
        tokens: list[int] = []  # drafts; node i's parent is parents[i] (-1 = the last emitted token)
        parents: list[int] = []
        rows: list[torch.Tensor] = []
        frontier, frontier_logits = [-1], self.draft.sync(context).logits[-1:]
        for depth, branches in enumerate(levels):
            new_frontier = []
            for node, logits in zip(frontier, frontier_logits):
                for token, row in self._children(logits, branches):
                    tokens.append(token)
                    parents.append(node)
                    rows.append(row)
                    new_frontier.append(len(tokens) - 1)
            frontier = new_frontier
            if depth + 1 < len(levels):
                frontier_logits = self._draft_logits(tokens, parents, frontier, committed)
        probs = None if self.sampling.greedy else torch.stack(rows)
        return Proposal(tokens=tokens, parents=parents, probs=probs)

    def _children(self, logits: torch.Tensor, k: int) -> list[tuple[int, torch.Tensor | None]]:
        """``k`` children of a node from its draft logits, each with the distribution it was drawn from
        (greedy: the draft's top-k, no distributions)."""
        if self.sampling.greedy:
            probs = fit_vocab(torch.softmax(logits.float(), dim=-1), self.target_vocab)
            return [(int(t), None) for t in probs.topk(k).indices]
        q = self.draft_distribution(logits)
        chosen = gumbel_top_k(q, k, self.generator)
        return [(token, without(q, chosen[:i])) for i, token in enumerate(chosen)]

    def _draft_logits(self, tokens: list[int], parents: list[int], nodes: list[int], committed: int) -> torch.Tensor:
        """Draft logits after each of ``nodes``: one tree-masked draft forward of the whole tree on top
        of the committed context, then the draft cache is cropped back."""
        out = self.draft.backbone.forward(
            tokens, self.draft.cache, layout=BlockLayout(parents=parents), logits_rows=nodes
        )
        self.draft.cache.crop(committed)
        return out.logits
