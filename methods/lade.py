"""Lookahead decoding with a Jacobi n-gram pool (LADE; Fu et al. 2024, hao-ai-lab/LookaheadDecoding,
Spec-Bench ``model/lade``).

One target forward per step carries two branches after the last emitted token (the root):

* the **lookahead branch** — a 2-D Jacobi window of ``N - 1`` levels: level 0 holds ``W - 1``
  tokens, levels ``1 .. N - 2`` hold ``W`` tokens each. Column ``i`` of the window is a chain at
  consecutive positions: level-0 tokens up to column ``i`` (the root counts as column 0 of level
  0), then the column-``i`` token of every level above. These are the decode loop's auxiliary
  tokens: never verified, their logits come back in ``feedback``;
* the **verification branch** — every cached n-gram (at most ``G``) whose first token is the root,
  verified as a token tree.

After the forward, the argmax of the top level's ``W`` tokens completes one n-gram per column
(``N`` tokens: the column's level-0 token, its tokens on levels ``1 .. N - 2``, the new token),
filed in the pool under its first token; then the window slides by one level (level 0 ← level 1
without its first token, level ``k`` ← level ``k + 1``, the top level ← the new tokens). Before the
window has ``N - 1`` levels it fills one level per step (``N - 2`` steps at the start of every
generation), without verification.

Followed from the reference (``lade/decoding.py``: ``jacobi_greedy_search_multilevel``,
``update_token_map``; ``lade/models/llama.py``: ``j_make_causal_mask_multilevel``): the window is
initialised with tokens drawn at random from the prompt (``W + N - 3`` of them); the attention
mask and positions of the lookahead branch; the fill schedule; the window slides by one whatever
was accepted (``ALWAYS_FWD_ONE``); the pool keeps at most ``G`` n-grams per first token, least
recently (re)inserted evicted first; with ``pool_from_prompt`` the pool is seeded with the prompt's
n-grams and gets every n-gram of the output as it is generated; the pool lives for one generation
(``state: per_prompt``), as in the reference.

Differs, and why:

* The guessed n-grams are merged into a token tree (shared prefixes verified once) instead of
  ``G`` separate branches: greedy verification accepts the same tokens, the forward is smaller.
* Every output n-gram reaches the pool under ``pool_from_prompt`` (the reference appends the last
  n-gram once per accepted token, a known slip).
* The random window initialisation is seeded per prompt (reproducible runs).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from decodebench.config import check
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.methods.state_policy import StatefulDrafter, check_state_policy


class NGramPool:
    """N-grams keyed by their first token, at most ``capacity`` per key (LRU by insertion)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: dict[int, list[tuple[int, ...]]] = {}

    def add(self, first: int, rest: Sequence[int]) -> None:
        """File ``(first, *rest)``; re-adding an n-gram makes it the most recent."""
        rest = tuple(rest)
        bucket = self.entries.setdefault(first, [])
        if rest in bucket:
            bucket.remove(rest)
        elif len(bucket) >= self.capacity:
            bucket.pop(0)
        bucket.append(rest)

    def add_all(self, tokens: Sequence[int], n: int, start: int = 0) -> None:
        """File every n-gram of ``tokens`` that starts at ``start`` or later."""
        for begin in range(start, len(tokens) - n + 1):
            self.add(tokens[begin], tokens[begin + 1 : begin + n])

    def guesses(self, first: int) -> list[tuple[int, ...]]:
        """The continuations filed under ``first``, oldest first."""
        return self.entries.get(first, [])

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self.entries.values())


@dataclass
class LookaheadBranch:
    """The lookahead branch of one step, as auxiliary tokens after the root and the drafts."""

    tokens: list[int]
    offsets: list[int]  # position offsets from the root
    mask: torch.Tensor  # (a, 1 + a) bool over [root, lookahead tokens]
    top_rows: slice  # rows of the top level within the lookahead tokens


class JacobiWindow:
    """The 2-D lookahead window: ``levels[0]`` has ``L`` tokens, every other level ``L + 1``."""

    def __init__(self, ngram_size: int, window_size: int, seed_tokens: Sequence[int], rng: random.Random):
        self.ngram_size = ngram_size
        self.window_size = window_size
        # level 0 starts with W + N - 3 tokens drawn from the prompt; each fill step shortens it
        self.levels: list[list[int]] = [[rng.choice(seed_tokens) for _ in range(window_size + ngram_size - 3)]]

    @property
    def filled(self) -> bool:
        """True once all N - 1 levels exist (n-grams can be read off the window)."""
        return len(self.levels) == self.ngram_size - 1

    def branch(self) -> LookaheadBranch:
        """Tokens, positions and mask of the lookahead branch (LADE's multilevel Jacobi mask)."""
        level0 = self.levels[0]
        width = len(level0) + 1  # columns, the root being column 0 of level 0
        tokens = list(level0)
        offsets = list(range(1, width))
        for level, row in enumerate(self.levels[1:], start=1):
            tokens.extend(row)
            offsets.extend(range(level, level + width))
        mask = torch.zeros(len(tokens), 1 + len(tokens), dtype=torch.bool)
        mask[:, 0] = True  # every lookahead token sees the root
        for j in range(len(level0)):  # level 0: a causal chain after the root
            mask[j, 1 : 2 + j] = True
        for level in range(1, len(self.levels)):
            base = len(level0) + (level - 1) * width
            for column in range(width):
                row = base + column
                mask[row, 1 : 1 + column] = True  # level-0 tokens before this column
                for lower in range(1, level + 1):  # this column on levels 1 .. level (itself included)
                    mask[row, 1 + len(level0) + (lower - 1) * width + column] = True
        top = len(tokens) - len(self.levels[-1])
        return LookaheadBranch(tokens=tokens, offsets=offsets, mask=mask, top_rows=slice(top, len(tokens)))

    def advance(self, root: int, new_tokens: list[int]) -> list[tuple[int, list[int]]]:
        """Take the top level's argmax tokens; return the n-grams completed (filled window only).

        Args:
            root: the step's root token (column 0 of level 0).
            new_tokens: argmax of the target logits at the top level's tokens, one per column.
        """
        if not self.filled:
            self._fill(new_tokens)
            return []
        firsts = [root, *self.levels[0]]
        ngrams = [
            (firsts[i], [*(level[i] for level in self.levels[1:]), new_tokens[i]]) for i in range(len(new_tokens))
        ]
        self.levels = [self.levels[1][1:], *self.levels[2:], list(new_tokens)]
        return ngrams

    def _fill(self, new_tokens: list[int]) -> None:
        """Grow the window by one level (the reference's warm-up schedule)."""
        if len(self.levels) == 1:
            self.levels = [self.levels[0][1:], list(new_tokens)]
        else:
            self.levels = [level[1:] for level in self.levels] + [list(new_tokens[1:])]


def merge_into_tree(ngrams: Sequence[Sequence[int]], max_depth: int) -> tuple[list[int], list[int]]:
    """Merge token sequences into a prefix tree; returns (tokens, parents) in insertion order."""
    tokens: list[int] = []
    parents: list[int] = []
    children: dict[tuple[int, int], int] = {}  # (parent index, token) -> node index
    for ngram in ngrams:
        parent = -1
        for token in ngram[:max_depth]:
            node = children.get((parent, token))
            if node is None:
                node = len(tokens)
                children[(parent, token)] = node
                tokens.append(token)
                parents.append(parent)
            parent = node
    return tokens, parents


class LookaheadJacobiDrafter(StatefulDrafter):
    """LADE: Jacobi lookahead branch + n-gram verification branch in one forward."""

    state_name = "lade"

    @dataclass
    class Params:
        ngram_size: int = 5  # N (the reference's LEVEL)
        window_size: int = 7  # W (WINDOW_SIZE)
        guess_set_size: int = 7  # G (GUESS_SET_SIZE): n-grams kept per first token
        pool_from_prompt: bool = False  # POOL_FROM_PROMPT (reference and Spec-Bench default: off)
        state: str = "per_prompt"  # the n-gram pool: per_prompt | per_task | persistent
        seed: int = 0  # random window initialisation (per prompt: seed and prompt hashed)

        def __post_init__(self) -> None:
            check(self.ngram_size >= 3, "method.params.ngram_size", self.ngram_size, ">= 3")
            check(self.window_size >= 2, "method.params.window_size", self.window_size, ">= 2")
            check(self.guess_set_size >= 1, "method.params.guess_set_size", self.guess_set_size, ">= 1")
            check_state_policy(self.state)

    def __init__(self, params: LookaheadJacobiDrafter.Params):
        super().__init__(params)
        self.pool = NGramPool(params.guess_set_size)
        self.window: JacobiWindow | None = None
        self.branch: LookaheadBranch | None = None
        self.pooled_until = 0  # context n-grams ending before this index are in the pool

    # -- learned state (the pool) ----------------------------------------------------------------
    def _clear_state(self) -> None:
        self.pool = NGramPool(self.params.guess_set_size)

    def _state_dict(self) -> dict[str, Any]:
        rows = [[first, *rest] for first, bucket in self.pool.entries.items() for rest in bucket]
        return {
            "ngram_size": self.params.ngram_size,
            "ngrams": torch.tensor(rows, dtype=torch.long).reshape(-1, self.params.ngram_size),
        }

    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        if int(state["ngram_size"]) != self.params.ngram_size:
            return False
        for first, *rest in state["ngrams"].tolist():
            self.pool.add(first, rest)
        return True

    # -- Drafter API -----------------------------------------------------------------------------
    def begin(self, prompt_ids: list[int]) -> None:
        """New generation: a fresh window from the prompt; seed the pool if configured."""
        super().begin(prompt_ids)
        seed = zlib.crc32(f"{self.params.seed}/{','.join(map(str, prompt_ids))}".encode())
        self.window = JacobiWindow(
            self.params.ngram_size, self.params.window_size, prompt_ids or [0], random.Random(seed)
        )
        self.pooled_until = 0
        if self.params.pool_from_prompt:
            self._pool_context(prompt_ids)

    def propose(self, context: list[int], max_tokens: int) -> Proposal:
        if self.params.pool_from_prompt:
            self._pool_context(context)
        self.branch = self.window.branch()
        tokens: list[int] = []
        parents: list[int] = []
        if self.window.filled and max_tokens > 0:
            tokens, parents = merge_into_tree(self.pool.guesses(context[-1]), max_tokens)
        aux_mask = torch.zeros(len(self.branch.tokens), 1 + len(tokens) + len(self.branch.tokens), dtype=torch.bool)
        aux_mask[:, 0] = True
        aux_mask[:, 1 + len(tokens) :] = self.branch.mask[:, 1:]  # never the drafts
        return Proposal(
            tokens=tokens,
            parents=parents if tokens else None,
            aux_tokens=self.branch.tokens,
            aux_mask=aux_mask,
            aux_offsets=self.branch.offsets,
        )

    def feedback(self, outcome: StepOutcome) -> None:
        """Read the top level's argmax off the auxiliary logits; file the completed n-grams."""
        first_aux = len(outcome.block_tokens)
        rows = outcome.target.logits[first_aux + self.branch.top_rows.start : first_aux + self.branch.top_rows.stop]
        new_tokens = rows.argmax(dim=-1).tolist()
        for first, rest in self.window.advance(outcome.block_tokens[0], new_tokens):
            self.pool.add(first, rest)

    def _pool_context(self, context: list[int]) -> None:
        """File the n-grams of the context not yet in the pool (prompt, then each new output token)."""
        n = self.params.ngram_size
        start = max(0, self.pooled_until - n + 1)
        self.pool.add_all(context, n, start)
        self.pooled_until = len(context)
