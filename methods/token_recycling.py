"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure"; Luowaterbi/TokenRecycling,
Spec-Bench ``model/recycling``).

The target's logits at every verified position hold candidate tokens that plain decoding throws
away. Token Recycling keeps them in an adjacency matrix ``adj[V, k]``: row ``t`` lists the top-k
next tokens the target predicted the last time ``t`` was a verified node. Each step:

1. propose — fill a static tree template by breadth-first lookups: the root is the last emitted
   token, a node with template path ``[i0, ..., ij]`` gets ``adj[parent token, ij]``;
2. the decode loop verifies the whole tree in one tree-masked forward;
3. feedback — the top-k of EVERY tree node's target logits (root and all drafts, accepted or not)
   is written back into ``adj`` at that node's token.

Followed from the reference: ``adj`` starts as all zeros (token 0 everywhere) and is never
cleared between prompts by default (``state: per_task``); the default template is the paper's
"2.2.2" tree (80 nodes, depth 6, in ``conf/method/token_recycling.yaml``); the update covers every
node of the forward; no update from the prefill.

Differs, and why:

* When one token occurs at several nodes of a tree, the reference's ``adj[ids] = topk`` scatter
  leaves the winner undefined (CUDA duplicate indices). Here the winner is deterministic: nodes on
  the accepted path (their logits saw the true context) win, otherwise the last node in template
  order.
* Near the end of a generation the loop allows at most ``max_tokens`` drafts (the tokens that
  can still be emitted): the template is cut to its first ``max_tokens`` nodes (shallowest first).
  The reference drafts the full template until it stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from decodebench.config import check
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy

# The paper's default static tree (reference version "2.2.2"): 8 + 21 + 25 + 15 + 8 + 3 = 80 nodes.
# A node is the path of candidate ranks from the root. Kept here as the Params default so the
# class works without its YAML; the YAML states it explicitly.
PAPER_TREE: list[list[int]] = [
    *([i] for i in range(8)),
    *([0, i] for i in range(8)),
    [1, 0],
    [1, 1],
    [1, 2],
    [1, 3],
    [2, 0],
    [2, 1],
    [2, 2],
    [3, 0],
    [3, 1],
    [4, 0],
    [5, 0],
    [6, 0],
    [7, 0],
    *([0, 0, i] for i in range(8)),
    [0, 1, 0],
    [0, 1, 1],
    [0, 1, 2],
    [0, 2, 0],
    [0, 2, 1],
    [0, 3, 0],
    [0, 4, 0],
    [0, 5, 0],
    [0, 6, 0],
    [0, 7, 0],
    [1, 0, 0],
    [1, 0, 1],
    [1, 1, 0],
    [2, 0, 0],
    [3, 0, 0],
    [4, 0, 0],
    [5, 0, 0],
    *([0, 0, 0, i] for i in range(5)),
    [0, 0, 1, 0],
    [0, 0, 1, 1],
    [0, 0, 2, 0],
    [0, 0, 3, 0],
    [0, 0, 4, 0],
    [0, 1, 0, 0],
    [0, 2, 0, 0],
    [1, 0, 0, 0],
    [2, 0, 0, 0],
    [3, 0, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1],
    [0, 0, 0, 0, 2],
    [0, 0, 0, 1, 0],
    [0, 0, 0, 2, 0],
    [0, 0, 1, 0, 0],
    [0, 1, 0, 0, 0],
    [1, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 1],
    [0, 0, 0, 1, 0, 0],
]


@dataclass
class TreeTemplate:
    """A static draft tree: node ``i`` takes candidate ``ranks[i]`` of node ``parents[i]``'s token.

    ``parents[i]`` indexes an earlier node (``-1`` = the root, i.e. the last emitted token);
    ``depths[i]`` is the node's distance from the root (1 for the root's children).
    """

    parents: list[int]
    ranks: list[int]
    depths: list[int]

    @classmethod
    def from_paths(cls, paths: list[list[int]]) -> TreeTemplate:
        """Build from rank paths (``[0, 2]`` = 3rd candidate of the root's 1st candidate).

        Paths must be listed parents first, as in the reference's templates.
        """
        index = {tuple(path): i for i, path in enumerate(paths)}
        parents = [index[tuple(path[:-1])] if len(path) > 1 else -1 for path in paths]
        return cls(parents=parents, ranks=[path[-1] for path in paths], depths=[len(path) for path in paths])

    def truncated(self, max_nodes: int) -> TreeTemplate:
        """The first ``max_nodes`` nodes (a sub-tree, since parents are listed first)."""
        return TreeTemplate(self.parents[:max_nodes], self.ranks[:max_nodes], self.depths[:max_nodes])


def check_tree(paths: list[list[int]], candidates: int) -> None:
    """Validate a template: non-empty, unique paths, ranks < ``candidates``, parents listed first."""
    check(isinstance(paths, list) and len(paths) > 0, "method.params.tree", paths, "a non-empty list of rank paths")
    seen: set[tuple[int, ...]] = set()
    for path in paths:
        key = tuple(path) if isinstance(path, (list, tuple)) else ()
        check(
            len(key) > 0 and all(isinstance(r, int) and 0 <= r < candidates for r in key),
            "method.params.tree",
            path,
            f"a non-empty list of ranks in [0, {candidates})",
        )
        check(key not in seen, "method.params.tree", path, "each path once")
        check(len(key) == 1 or key[:-1] in seen, "method.params.tree", path, "its parent path listed before it")
        seen.add(key)


def by_rank_sum(paths: list[list[int]]) -> list[list[int]]:
    """Tree paths ordered by candidate rank sum plus depth (then depth, then the path): the likelier
    nodes first, a parent always before its children, so every prefix of the order is a tree.
    [0] (1), then [1] and [0, 0] (2), then [2], [0, 1], [1, 0], [0, 0, 0] (3), ..."""
    return sorted((list(p) for p in paths), key=lambda p: (sum(p) + len(p), len(p), p))


class TokenRecyclingDrafter(StatefulDrafter):
    """Drafts a static tree from the adjacency matrix of recycled top-k candidates."""

    state_name = "token_recycling"

    @dataclass
    class Params:
        candidates: int = 8  # k: top-k next tokens kept per token (reference --output-id-topk 8)
        tree: list[list[int]] = field(default_factory=lambda: [list(p) for p in PAPER_TREE])
        state: str = "per_task"  # per_prompt | per_task | persistent (reference: kept across prompts)
        # cpu preset: keep the first nodes of ``tree`` in rank-sum order (:func:`by_rank_sum`), as many
        # as the stored latency curve of the backend in use allows for a verify costing <= this x a
        # 1-token step (engine/budget.py node_budget)
        max_verify_cost: float | None = None

        def __post_init__(self) -> None:
            check(
                self.max_verify_cost is None or self.max_verify_cost >= 1.0,
                "method.params.max_verify_cost",
                self.max_verify_cost,
                ">= 1.0 or null",
            )
            check(self.candidates >= 1, "method.params.candidates", self.candidates, ">= 1")
            self.tree = [list(path) for path in self.tree]
            check_tree(self.tree, self.candidates)
            check_state_policy(self.state)

    def __init__(self, params: TokenRecyclingDrafter.Params):
        super().__init__(params)
        self._use_tree(params.tree)
        self.vocab_size = 0
        self.adj = torch.zeros(0, params.candidates, dtype=torch.long)

    def _use_tree(self, paths: list[list[int]]) -> None:
        self.tree = [list(path) for path in paths]
        self.template = TreeTemplate.from_paths(self.tree)
        self.levels = self._levels(self.template)

    @staticmethod
    def _levels(template: TreeTemplate) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per depth: (node indices, their parents' slots in [root, nodes...], their ranks)."""
        levels = []
        for depth in range(1, max(template.depths) + 1):
            nodes = [i for i, d in enumerate(template.depths) if d == depth]
            levels.append(
                (
                    torch.tensor(nodes, dtype=torch.long),
                    torch.tensor([template.parents[i] + 1 for i in nodes], dtype=torch.long),
                    torch.tensor([template.ranks[i] for i in nodes], dtype=torch.long),
                )
            )
        return levels

    # -- state -----------------------------------------------------------------------------------
    def setup(self, backbone, cache_dir=None) -> None:
        """Allocate ``adj`` for the target's vocabulary, then apply the state policy."""
        self.vocab_size = int(backbone.lm_head.weight.shape[0])  # rows of the logits
        if self.params.max_verify_cost is not None:
            ordered = by_rank_sum(self.params.tree)
            self._use_tree(
                ordered[
                    : self.budget_from_curve(backbone, cache_dir, self.params.max_verify_cost, len(ordered) + 1) - 1
                ]
            )
        super().setup(backbone, cache_dir)

    def _clear_state(self) -> None:
        # the reference starts from torch.zeros: every token's candidates are token 0
        self.adj = torch.zeros(self.vocab_size, self.params.candidates, dtype=torch.long)

    def _state_dict(self) -> dict[str, Any]:
        return {"adj": self.adj.clone()}

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        adj = state.get("adj")
        if not isinstance(adj, torch.Tensor) or tuple(adj.shape) != tuple(self.adj.shape):
            return False
        self.adj = adj.to(torch.long).clone()
        return True

    # -- drafting --------------------------------------------------------------------------------
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        """Fill the template breadth-first from ``adj``, starting at the last emitted token."""
        if max_tokens <= 0:
            return Proposal()
        template, levels = self.template, self.levels
        if max_tokens < len(template.parents):  # the loop's budget near max_new_tokens
            template = template.truncated(max_tokens)
            levels = self._levels(template)
        slots = torch.empty(len(template.parents) + 1, dtype=torch.long)  # [root, node 0, node 1, ...]
        slots[0] = context[-1]
        for nodes, parent_slots, ranks in levels:
            slots[nodes + 1] = self.adj[slots[parent_slots], ranks]
        return Proposal(tokens=slots[1:].tolist(), parents=list(template.parents))

    def feedback(self, outcome: StepOutcome) -> None:
        """Recycle: write the top-k of every verified node's logits into ``adj`` at its token."""
        block = outcome.block_tokens
        logits = outcome.target.logits[: len(block)]
        topk = logits.topk(self.params.candidates, dim=-1).indices.cpu()  # (nodes, k)
        winner: dict[int, int] = {}  # token -> block row whose candidates it keeps
        for row, token in enumerate(block):
            winner[token] = row
        for row in (0, *outcome.result.accepted_nodes):  # the true context's logits win ties
            winner[block[row]] = row
        tokens = torch.tensor(list(winner.keys()), dtype=torch.long)
        rows = torch.tensor(list(winner.values()), dtype=torch.long)
        self.adj[tokens] = topk[rows]
