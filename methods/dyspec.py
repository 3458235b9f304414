"""DySpec: a dynamic draft-token tree grown greedily from a max-heap (Xiong et al. 2024,
arXiv 2410.11744; no public code — this is DecodeBench's own implementation of the paper).

The paper's observation: the probability that the target accepts a draft token is well predicted
by the draft's own probability for it, so the value of a tree node is the product of draft
probabilities along its path, and the best tree for a token budget is grown greedily: pop the
most valuable candidate from a max-heap, add it, push its first child and its next sibling,
until the budget is spent. One target forward verifies the whole tree (tree attention).

Construction (node value ``v(n)`` = product of draft probabilities from the root to ``n``):

* Every node with its draft distribution known ("expanded") has at most ONE pending candidate in
  the heap: its next child. Keys never grow along a path, so an unexpanded node ``u`` bounds
  every key below it by ``v(u)``. The loop pops while the heap's best key beats every unexpanded
  node's bound; otherwise it expands all unexpanded nodes in one batched draft forward (tree
  mask over the committed draft cache) and continues. The popped order is therefore exactly the
  sequential greedy order, with as few draft forwards as that order allows (about one per tree
  level).
* Greedy decoding: the ``k``-th child of ``n`` is the draft's ``k``-th most probable token, its key
  ``v(n)·q(k-th)`` — the paper's heap, exactly; verification takes the longest path whose every
  token is the target's argmax (identical output to AR).
* Sampling (lossless; SpecInfer-style multi-draft verification with recursive rejection
  sampling): siblings are drawn WITHOUT replacement — the ``k``-th child of ``n`` is drawn from
  ``q_k = norm(q_n`` with the earlier siblings' tokens zeroed``)`` and ``q_k`` is recorded as that
  node's draft distribution. The engine's verifier tries the children in creation order: child
  ``k`` is accepted with ``min(1, r(x)/q_k(x))`` where ``r`` is the target distribution after the
  earlier rejections, else ``r ← norm(max(0, r − q_k))``; when no child is accepted the bonus is
  drawn from ``r``. This is exact whenever, given everything decided before it, each child's token
  is a fresh draw from its recorded ``q_k``. The danger is letting a sibling's OWN sampled value
  decide whether it joins the tree (e.g. sampling it first and keeping it only if ``q(x)`` is
  large): that conditions ``x`` on being likely and biases the output. So a candidate's key is
  fixed before its token exists: ``v(n)·E_{x~q_k}[q_n(x)] = v(n)·(Σ_{y∉S} q_n(y)²)/(1 − q_n(S))``
  (``S`` = earlier siblings), the expected draft probability of the token it will draw; the token
  is drawn only after the candidate wins the heap. The number of siblings may depend on earlier
  siblings and on other branches (both drawn before, or independently of, the new token) — never
  on the new token itself. Once drawn, the node's value ``v(n)·q_n(x)`` keys its own children,
  which is the paper's product-of-probabilities rule (a node's children may depend on the node).

CPU note: the engine's attention mask always shows the whole committed cache, so the tree drafted
so far cannot stay cached while other branches grow; each expansion round re-forwards the
ancestor closure of the nodes it expands on top of the committed context (then crops the draft
cache back). The target side is one tree-masked forward per step, as in the paper.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from decodebench.config import check
from decodebench.engine.backbone import BlockLayout
from decodebench.engine.drafting import Proposal
from decodebench.engine.sampling import sample
from decodebench.methods.sps import DraftModelDrafter, fit_vocab

# Stop offering siblings once the draft distribution left for them holds less mass than this.
MIN_REMAINING_MASS = 1e-6


@dataclass
class _DraftTree:
    """Nodes of one step's tree; node 0 is the root (the last emitted token, not a draft)."""

    tokens: list[int]
    parents: list[int]
    values: list[float]  # product of draft probabilities from the root (root = 1)
    depths: list[int]
    rows: list[torch.Tensor | None]  # distribution each draft was drawn from (sampling only)

    @classmethod
    def rooted_at(cls, token: int) -> _DraftTree:
        return cls(tokens=[token], parents=[-1], values=[1.0], depths=[0], rows=[None])

    def add(self, token: int, parent: int, probability: float, row: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.values.append(self.values[parent] * probability)
        self.depths.append(self.depths[parent] + 1)
        self.rows.append(row)
        return len(self.tokens) - 1

    def ancestor_closure(self, nodes: list[int]) -> list[int]:
        """``nodes`` and all their ancestors (root excluded), in index (= topological) order."""
        keep: set[int] = set()
        for node in nodes:
            while node > 0 and node not in keep:
                keep.add(node)
                node = self.parents[node]
        return sorted(keep)


@dataclass
class _Expansion:
    """What a node's draft distribution offers its children."""

    probs: torch.Tensor  # (vocab,) distribution of the node's next token (keys; sampling draws)
    drawn: list[int]  # children's tokens, in creation order
    drawn_mass: float = 0.0  # probs mass of the drawn tokens
    drawn_square_mass: float = 0.0  # sum of their squared probabilities
    square_mass: float = 0.0  # sum of probs**2 (sampling keys)
    ranked: torch.Tensor | None = None  # greedy: token ids by decreasing probability
    ranked_probs: torch.Tensor | None = None


class DySpecDrafter(DraftModelDrafter):
    """Dynamic token tree from a max-heap over path probabilities (see module docstring)."""

    @dataclass
    class Params:
        token_budget: int = 64  # draft tokens per step (the tree's size, root excluded)
        max_depth: int | None = None  # deepest draft level; null = only the budget limits it

        def __post_init__(self) -> None:
            check(self.token_budget >= 1, "method.params.token_budget", self.token_budget, ">= 1")
            check(
                self.max_depth is None or self.max_depth >= 1, "method.params.max_depth", self.max_depth, ">= 1 or null"
            )

    def __init__(self, params: DySpecDrafter.Params):
        super().__init__()
        self.params = params

    # -- one step -------------------------------------------------------------------------------
    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        # ``max_tokens`` bounds what a step can still emit, i.e. the tree's DEPTH; the node count
        # is the token budget (a wide, shallow tree still helps near the end of a generation)
        budget = self.params.token_budget
        max_depth = min(self.params.max_depth or budget, budget, max_tokens)
        if max_depth <= 0:
            return Proposal()
        committed = len(context)
        root_logits = self.draft.sync(context).logits[-1]

        tree = _DraftTree.rooted_at(context[-1])
        expansions: dict[int, _Expansion] = {}
        heap: list[tuple[float, int]] = []  # (-key, parent): the parent's next child
        unexpanded: list[int] = []  # drafted nodes whose distribution is not known yet

        def offer_next_child(parent: int) -> None:
            key = self._next_child_key(expansions[parent], tree.values[parent])
            if key > 0.0:
                heapq.heappush(heap, (-key, parent))

        def expand(node: int, logits: torch.Tensor) -> None:
            expansions[node] = self._expansion(logits, budget)
            offer_next_child(node)

        expand(0, root_logits)
        while len(tree.tokens) - 1 < budget:
            best_key = -heap[0][0] if heap else 0.0
            if any(tree.values[node] > best_key for node in unexpanded):
                # a child of an unexpanded node might beat every known candidate: learn them all
                for node, logits in zip(unexpanded, self._tree_logits(tree, unexpanded, committed)):
                    expand(node, logits)
                unexpanded = []
                continue
            if not heap:
                break
            _, parent = heapq.heappop(heap)
            token, probability, row = self._draw_child(expansions[parent])
            node = tree.add(token, parent, probability, row)
            offer_next_child(parent)
            if tree.depths[node] < max_depth:
                unexpanded.append(node)

        drafts = range(1, len(tree.tokens))
        rows = [tree.rows[i] for i in drafts]
        return Proposal(
            tokens=[tree.tokens[i] for i in drafts],
            parents=[tree.parents[i] - 1 for i in drafts],
            probs=torch.stack(rows) if rows and rows[0] is not None else None,
        )

    # -- pieces ---------------------------------------------------------------------------------
    def _expansion(self, logits: torch.Tensor, budget: int) -> _Expansion:
        """A node's child distribution: the request's sampling distribution under sampling; the
        draft's softmax (temperature 1, for keys) and its ranking under greedy decoding."""
        if self.sampling.greedy:
            probs = fit_vocab(torch.softmax(logits.float(), dim=-1), self.target_vocab)
            ranked_probs, ranked = torch.topk(probs, min(budget, probs.shape[-1]))
            return _Expansion(probs=probs, drawn=[], ranked=ranked, ranked_probs=ranked_probs)
        probs = self.draft_distribution(logits)
        return _Expansion(probs=probs, drawn=[], square_mass=float((probs * probs).sum()))

    def _next_child_key(self, expansion: _Expansion, parent_value: float) -> float:
        """Heap key of the parent's next child, fixed BEFORE that child's token is drawn."""
        k = len(expansion.drawn)
        if self.sampling.greedy:
            if k >= expansion.ranked.shape[0]:
                return 0.0
            return parent_value * float(expansion.ranked_probs[k])
        remaining = 1.0 - expansion.drawn_mass
        if remaining <= MIN_REMAINING_MASS:
            return 0.0
        # E_{x ~ q_k}[q(x)] for q_k = q without the drawn siblings, renormalised
        expected = max(expansion.square_mass - expansion.drawn_square_mass, 0.0) / remaining
        return parent_value * expected

    def _draw_child(self, expansion: _Expansion) -> tuple[int, float, torch.Tensor | None]:
        """The parent's next child: ``(token, q_parent(token), row it was drawn from or None)``."""
        if self.sampling.greedy:
            k = len(expansion.drawn)
            token, probability, row = int(expansion.ranked[k]), float(expansion.ranked_probs[k]), None
        else:
            row = expansion.probs.clone()
            if expansion.drawn:
                row[expansion.drawn] = 0.0  # without replacement: earlier siblings cannot repeat
            row /= row.sum()
            token = sample(row, self.generator)
            probability = float(expansion.probs[token])
            expansion.drawn_square_mass += probability * probability
        expansion.drawn.append(token)
        expansion.drawn_mass += probability
        return token, probability, row

    def _tree_logits(self, tree: _DraftTree, nodes: list[int], committed: int) -> torch.Tensor:
        """Draft logits ``(len(nodes), vocab)`` after each of ``nodes``, from one tree-masked draft
        forward of their ancestor closure on top of the committed context; the cache is cropped
        back to the context afterwards."""
        block = tree.ancestor_closure(nodes)
        position = {node: i for i, node in enumerate(block)}
        parents = [position[tree.parents[node]] if tree.parents[node] > 0 else -1 for node in block]
        out = self.draft.backbone.forward(
            [tree.tokens[node] for node in block],
            self.draft.cache,
            layout=BlockLayout(parents=parents),
            logits_rows=[position[node] for node in nodes],
        )
        self.draft.cache.crop(committed)
        return out.logits
