"""Token trees for verification: parent pointers → depths and ancestor masks.

A verified block is a list of nodes in topological order; ``parents[i]`` is the index of node
``i``'s parent within the block, or ``-1`` for a root (a root attends only to the cached prefix).
Position ids are ``prefix_length + depth``. A chain is a tree with one branch
(``parents = [-1, 0, 1, ...]``), so one verifier serves both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chain_parents(length: int) -> list[int]:
    return list(range(-1, length - 1))


def is_chain(parents: Sequence[int] | None) -> bool:
    return parents is None or all(p == i - 1 for i, p in enumerate(parents))


def check_parents(parents: Sequence[int]) -> None:
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"tree node {i} has parent {p}; parents must precede their children")


def tree_depths(parents: Sequence[int]) -> list[int]:
    depths: list[int] = []
    for p in parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return depths


def ancestor_mask(parents: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, n)`` bool mask, True where column j is node i itself or one of its ancestors."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask.to(device)


def children_lists(parents: Sequence[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            children[p].append(i)
    return children
