"""ADED's data structures: the tri-gram matrix and the MCTS that turns it into draft paths.

Reference: liuxukun2000/ADED (renamed Adaptix), its Rust ``DraftRetriever`` (``src/lib.rs``:
``Writer`` / ``Reader.search``, ``cut_to_choices``; ``src/mcts_sub.rs``: ``MCTS``).

* :class:`TrigramMatrix` — ``(a, b) -> {c: weight}``: normalised tri-gram frequencies of a corpus,
  pruned to the ``top_k`` most likely successors per pair; during decoding every tri-gram among
  the context's last ``window`` tokens gains ``step`` per step (capped at ``cap``), so recent
  output outweighs the corpus.
* :func:`mcts_paths` — a search tree over token pairs from the context's last two tokens: PUCT
  selection, expansion of every successor at a leaf, a rollout sampled from the matrix up to the
  path length, back-propagation of the rollout's score; the most visited nodes become draft paths
  (each extended by its most likely next token).
* :func:`cut_to_choices` and :func:`paths_to_tree` — prune the paths to a token budget and merge
  them into one draft tree.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

Pair = tuple[int, int]


class TrigramMatrix:
    """Successor weights of token pairs: ``rows[(a, b)][c]``, successors by decreasing weight."""

    def __init__(self, rows: dict[Pair, dict[int, float]] | None = None):
        self.rows: dict[Pair, dict[int, float]] = rows if rows is not None else {}

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], top_k: int) -> TrigramMatrix:
        """Normalised tri-gram frequencies, keeping the ``top_k`` most frequent successors per pair.

        Weights stay normalised over all successors (the reference prunes after normalising), so a
        pruned row sums to at most 1. Ties keep the successor seen first.
        """
        counts: dict[Pair, dict[int, int]] = {}
        for tokens in sequences:
            for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
                row = counts.setdefault((a, b), {})
                row[c] = row.get(c, 0) + 1
        rows = {}
        for pair, row in counts.items():
            total = sum(row.values())
            best = sorted(row.items(), key=lambda item: -item[1])[:top_k]
            rows[pair] = {token: count / total for token, count in best}
        return cls(rows)

    def successors(self, pair: Pair) -> dict[int, float]:
        return self.rows.get(pair, {})

    def reinforce(self, tokens: Sequence[int], window: int, step: float, cap: float) -> None:
        """Add ``step`` (at most up to ``cap``) to every tri-gram among the last ``window`` tokens."""
        recent = tokens[-window:]
        for a, b, c in zip(recent, recent[1:], recent[2:]):
            row = self.rows.setdefault((a, b), {})
            row[c] = min(row.get(c, 0.0) + step, cap)

    def copy(self) -> TrigramMatrix:
        return TrigramMatrix({pair: dict(row) for pair, row in self.rows.items()})

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class MctsConfig:
    """The reference's constants (``mcts_sub.rs`` and ``Reader.search``)."""

    iterations: int = 150  # MCTS::run(150)
    path_length: int = 4  # sentence_length: the root pair + 3 tokens
    top_paths: int = 24  # top_k sentences by visits
    c1: float = 1.814  # PUCT exploration constants
    c2: float = 8.0


@dataclass(eq=False)
class _SearchNode:
    pair: Pair
    parent: _SearchNode | None
    prior: float
    successors: list[int]  # tokens that may follow ``pair`` (the reference's untried_words)
    children: list[_SearchNode] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0

    def puct(self, parent_visits: int, config: MctsConfig) -> float:
        if self.visits == 0:
            return math.inf
        explore = (config.c1 + math.log((parent_visits + config.c2 + 1) / config.c2)) * self.prior
        return self.value / self.visits + explore * math.sqrt(parent_visits) / (1 + self.visits)

    def best_child(self, config: MctsConfig) -> _SearchNode:
        """Highest PUCT score; the first child wins ties (unvisited children score infinity)."""
        best, best_score = self.children[0], 0.0
        for child in self.children:
            score = child.puct(self.visits, config)
            if score > best_score:
                best, best_score = child, score
        return best


def mcts_paths(matrix: TrigramMatrix, start: Pair, config: MctsConfig, rng: random.Random) -> list[list[int]]:
    """Draft paths after the context ending in ``start`` (the last two context tokens).

    Returns up to ``config.top_paths`` token paths (the context's last token excluded), most
    visited first, each extended by the most likely successor of its last pair.
    """
    root = _SearchNode(start, None, 0.0, list(matrix.successors(start)))
    for _ in range(config.iterations):
        node, path = _select(root, config)
        if node.successors and len(path) < config.path_length:
            node = _expand(node, matrix)
            path.append(node.pair)
        _rollout(path, matrix, config.path_length, rng)
        _backpropagate(node, _score(path, matrix))
    ranked = sorted(_tree_paths(root, [start[1]]), key=lambda item: -item[1])[: config.top_paths]
    paths = []
    for tokens, _ in ranked:
        if len(tokens) < 2:  # the root itself proposes nothing
            continue
        follow = matrix.successors((tokens[-2], tokens[-1]))
        if follow:
            tokens = [*tokens, max(follow.items(), key=lambda item: item[1])[0]]
        paths.append(tokens[1:])
    return paths


def _select(root: _SearchNode, config: MctsConfig) -> tuple[_SearchNode, list[Pair]]:
    """Descend by PUCT while the node has children, up to the path length."""
    node, path = root, [root.pair]
    while node.successors and node.children and len(path) < config.path_length:
        node = node.best_child(config)
        path.append(node.pair)
    return node, path


def _expand(node: _SearchNode, matrix: TrigramMatrix) -> _SearchNode:
    """Add a child for every successor; continue from the last one (as the reference does)."""
    weights = matrix.successors(node.pair)
    for token in node.successors:
        pair = (node.pair[1], token)
        node.children.append(_SearchNode(pair, node, weights.get(token, 0.0), list(matrix.successors(pair))))
    return node.children[-1]


def _rollout(path: list[Pair], matrix: TrigramMatrix, length: int, rng: random.Random) -> None:
    """Extend ``path`` to ``length`` pairs, sampling successors in proportion to their weight."""
    while len(path) < length:
        row = matrix.successors(path[-1])
        if not row:
            return
        token = rng.choices(list(row), weights=list(row.values()))[0]
        path.append((path[-1][1], token))


def _score(path: list[Pair], matrix: TrigramMatrix) -> float:
    """1 + the sum of the matrix weights of the path's transitions."""
    return 1.0 + sum(matrix.successors(pair).get(following[1], 0.0) for pair, following in zip(path, path[1:]))


def _backpropagate(node: _SearchNode | None, score: float) -> None:
    while node is not None:
        node.visits += 1
        node.value += score
        node = node.parent


def _tree_paths(node: _SearchNode, tokens: list[int]) -> list[tuple[list[int], int]]:
    """(tokens from the root, visits) of every search node, depth first."""
    found = [(tokens, node.visits)]
    for child in node.children:
        found.extend(_tree_paths(child, [*tokens, child.pair[1]]))
    return found


def cut_to_choices(paths: list[list[int]], choices: int) -> list[list[int]]:
    """Drop paths, those with the most distinct tokens first, until the paths' distinct-token
    counts sum to at most ``choices`` (the reference's ``cut_to_choices``)."""
    sizes = [len(set(path)) for path in paths]
    total = sum(sizes)
    dropped = set()
    for index in sorted(range(len(paths)), key=lambda i: -sizes[i]):
        if total <= choices:
            break
        total -= sizes[index]
        dropped.add(index)
    return [path for i, path in enumerate(paths) if i not in dropped]


def paths_to_tree(paths: list[list[int]], max_nodes: int, max_depth: int) -> tuple[list[int], list[int]]:
    """Merge paths into a prefix tree, breadth first, keeping the first ``max_nodes`` nodes.

    Returns (tokens, parents) with parents before children (``-1`` = the context's last token).
    """
    nodes: dict[tuple[int, ...], int] = {}  # prefix -> insertion index
    for path in paths:
        for depth in range(1, min(len(path), max_depth) + 1):
            nodes.setdefault(tuple(path[:depth]), len(nodes))
    ordered = sorted(nodes, key=lambda prefix: (len(prefix), nodes[prefix]))[:max_nodes]
    index = {prefix: i for i, prefix in enumerate(ordered)}
    tokens = [prefix[-1] for prefix in ordered]
    parents = [index[prefix[:-1]] if len(prefix) > 1 else -1 for prefix in ordered]
    return tokens, parents
