"""A suffix array over token sequences (REST's datastore; FasterDecoding/REST ``DraftRetriever``).

The sequences are concatenated with a separator (``SEPARATOR``, below every token id) after each,
and the start positions of all suffixes are sorted lexicographically (prefix doubling with numpy,
O(n log² n)). Every occurrence of a pattern is then one contiguous range of the array, found by two
binary searches; a continuation never crosses a separator.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

SEPARATOR = -1


def build_suffix_array(data: np.ndarray) -> np.ndarray:
    """Start positions of the suffixes of ``data`` in lexicographic order (a suffix that is a
    prefix of another sorts first)."""
    n = len(data)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rank = np.unique(data, return_inverse=True)[1].astype(np.int64)
    order = np.argsort(rank, kind="stable")
    step = 1
    while True:
        second = np.full(n, -1, dtype=np.int64)  # past the end sorts before every rank
        second[: n - step] = rank[step:]
        order = np.lexsort((second, rank))
        first_key, second_key = rank[order], second[order]
        changed = (first_key[1:] != first_key[:-1]) | (second_key[1:] != second_key[:-1])
        new_rank = np.empty(n, dtype=np.int64)
        new_rank[order] = np.concatenate([[0], np.cumsum(changed)])
        rank = new_rank
        if rank[order[-1]] == n - 1 or step >= n:
            return order
        step *= 2


class SuffixArray:
    """All suffixes of the separated concatenation of ``sequences``, sorted."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        flat: list[int] = []
        for sequence in sequences:
            flat.extend(int(t) for t in sequence)
            flat.append(SEPARATOR)
        self.data = np.asarray(flat, dtype=np.int64)
        self.order = build_suffix_array(self.data)
        self._tokens = self.data.tolist()  # list slices compare faster than numpy in the searches

    def __len__(self) -> int:
        return len(self.data)

    def find(self, pattern: Sequence[int]) -> np.ndarray:
        """Start positions of every occurrence of ``pattern``, in suffix-array order."""
        pattern = list(pattern)
        m, tokens = len(pattern), self._tokens

        def head(i: int) -> list[int]:
            return tokens[i : i + m]

        lo = bisect.bisect_left(self.order, pattern, key=head)
        hi = bisect.bisect_right(self.order, pattern, lo=lo, key=head)
        return self.order[lo:hi]

    def continuation(self, start: int, length: int) -> list[int]:
        """Up to ``length`` tokens from ``start``, stopping at the end of its sequence."""
        out = self._tokens[start : start + length]
        return out[: out.index(SEPARATOR)] if SEPARATOR in out else out
