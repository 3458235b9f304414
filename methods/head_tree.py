"""Draft trees of the head-based drafters: static templates (Medusa, EAGLE-1) and the mask a drafter
network attends with while it drafts a tree on its own KV cache.

A template is a list of paths of top-k ranks, e.g. ``[0, 1]`` = "the 2nd likeliest child of the
likeliest first token"; its nodes become the proposal in template order (parents first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from decodebench.engine.tree import ancestor_mask

# EAGLE-1's static tree (SafeAILab/EAGLE eagle/model/choices.py ``mc_sim_7b_63``): 25 nodes, depth 5.
EAGLE_TREE: list[list[int]] = [
    [0],
    [1],
    [2],
    [3],
    [0, 0],
    [0, 1],
    [0, 2],
    [1, 0],
    [1, 1],
    [2, 0],
    [2, 1],
    [3, 0],
    [0, 0, 0],
    [0, 0, 1],
    [0, 0, 2],
    [0, 1, 0],
    [0, 1, 1],
    [0, 2, 0],
    [0, 2, 1],
    [1, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 0, 1],
    [0, 0, 0, 2],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 1],
]

# Medusa-1's sparse tree (FasterDecoding/Medusa medusa/model/medusa_choices.py ``mc_sim_7b_63``):
# 63 nodes, depth 4, ordered by how often each path was accepted (so every prefix is a good tree).
MEDUSA_TREE: list[list[int]] = [
    [0],
    [0, 0],
    [1],
    [0, 1],
    [2],
    [0, 0, 0],
    [1, 0],
    [0, 2],
    [3],
    [0, 3],
    [4],
    [0, 4],
    [2, 0],
    [0, 5],
    [0, 0, 1],
    [5],
    [0, 6],
    [6],
    [0, 7],
    [0, 1, 0],
    [1, 1],
    [7],
    [0, 8],
    [0, 0, 2],
    [3, 0],
    [0, 9],
    [8],
    [9],
    [1, 0, 0],
    [0, 2, 0],
    [1, 2],
    [0, 0, 3],
    [4, 0],
    [2, 1],
    [0, 0, 4],
    [0, 0, 5],
    [0, 0, 0, 0],
    [0, 1, 1],
    [0, 0, 6],
    [0, 3, 0],
    [5, 0],
    [1, 3],
    [0, 0, 7],
    [0, 0, 8],
    [0, 0, 9],
    [6, 0],
    [0, 4, 0],
    [1, 4],
    [7, 0],
    [0, 1, 2],
    [2, 0, 0],
    [3, 1],
    [2, 2],
    [8, 0],
    [0, 5, 0],
    [1, 5],
    [1, 0, 1],
    [0, 2, 1],
    [9, 0],
    [0, 6, 0],
    [0, 0, 0, 1],
    [1, 6],
    [0, 7, 0],
]

TREES = {"eagle": EAGLE_TREE, "medusa": MEDUSA_TREE}


def truncate_tree(paths: Sequence[Sequence[int]], nodes: int) -> list[tuple[int, ...]]:
    """The first ``nodes`` paths of a template, keeping only those whose parent path is kept (a
    prefix of a likelihood-ordered template is a good smaller tree), sorted parents first."""
    kept: list[tuple[int, ...]] = []
    for path in paths:
        if len(kept) == nodes:
            break
        path = tuple(path)
        if len(path) == 1 or path[:-1] in kept:
            kept.append(path)
    return sorted(kept, key=lambda p: (len(p), p))


def template_parents(paths: Sequence[tuple[int, ...]]) -> list[int]:
    """Parent index of each path among ``paths`` (-1: child of the root); parents come first."""
    index = {path: i for i, path in enumerate(paths)}
    return [-1 if len(path) == 1 else index[path[:-1]] for path in paths]


def draft_attention_mask(
    prefix: int, parents: Sequence[int], new: range, attn_implementation: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(1, 1, q, prefix + new.stop)`` mask for drafting tree nodes ``new`` (indices into ``parents``)
    on a drafter cache that holds ``prefix`` committed entries followed by nodes ``0 .. new.start-1``:
    each node sees the prefix, its ancestors and itself."""
    nodes = ancestor_mask(parents[: new.stop])[new.start : new.stop]  # (q, new.stop)
    mask = torch.cat([torch.ones(len(new), prefix, dtype=torch.bool), nodes], dim=1).to(device)[None, None]
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask
