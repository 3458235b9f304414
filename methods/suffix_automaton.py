"""A suffix automaton over a token sequence, as SAM-Decoding uses it (hyx1999/SAM-Decoding
``samd/sam/dyn_sam.py`` and ``static_sam.py``).

The automaton of a sequence ``s`` (Blumer et al.) has one state per class of substrings with the same
end positions; ``next`` is the transition on a token, ``link`` the suffix link (the longest suffix
in another class), ``length`` the longest substring of the state, ``min_endpos`` the end (1-based)
of its FIRST occurrence. It is built online, one token at a time (amortised O(1)).

Matching keeps a cursor ``(state, length)``: the longest suffix of the text read so far that occurs
in ``s``. Reading a token follows ``next`` or, when there is none, falls back along the suffix links
(exactly the longest-suffix match, updated in amortised O(1) per token). A draft is what followed
the first occurrence of the matched suffix: ``s[min_endpos : min_endpos + n]``.

``occurrences`` (after :meth:`count_occurrences`) is the number of end positions of a state's
substrings, i.e. how often they occur in ``s`` (the reference's ``cnt_endpos``);
:meth:`likeliest_next` orders a state's transitions by it (the static automaton's draft tree).

States are parallel lists (not objects) for speed in Python.
"""

from __future__ import annotations

from collections.abc import Iterable


class SuffixAutomaton:
    """Suffix automaton of ``tokens`` (extendable with :meth:`extend`) with a matching cursor."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.min_endpos: list[int] = [0]
        self.tokens: list[int] = []  # s; min_endpos e means s[e - 1] ends the first occurrence
        self.last = 0  # the state of the whole of s
        self.cursor = (0, 0)  # (state, match length) of the text read with transfer()
        self.clones: set[int] = set()  # states made by splitting (they own no end position)
        self.occurrences: list[int] = []  # per state, filled by count_occurrences()
        self._likeliest: dict[int, list[tuple[int, int]]] = {}
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def states(self) -> int:
        return len(self.link)

    def _new_state(self, length: int, min_endpos: int, link: int, nxt: dict[int, int]) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.min_endpos.append(min_endpos)
        return len(self.link) - 1

    def add(self, token: int) -> None:
        """Append ``token`` to ``s`` (the standard online construction; clones keep min_endpos)."""
        self.tokens.append(token)
        end = len(self.tokens)
        cur = self._new_state(end, end, -1, {})
        p = self.last
        while p != -1 and token not in self.next[p]:
            self.next[p][token] = cur
            p = self.link[p]
        if p == -1:
            self.link[cur] = 0
        else:
            q = self.next[p][token]
            if self.length[p] + 1 == self.length[q]:
                self.link[cur] = q
            else:
                clone = self._new_state(self.length[p] + 1, self.min_endpos[q], self.link[q], dict(self.next[q]))
                self.clones.add(clone)
                while p != -1 and self.next[p].get(token) == q:
                    self.next[p][token] = clone
                    p = self.link[p]
                self.link[q] = self.link[cur] = clone
        self.last = cur

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.add(int(token))

    # -- matching --------------------------------------------------------------------------------
    def step(self, state: int, length: int, token: int) -> tuple[int, int]:
        """The cursor after reading ``token`` from ``(state, length)``: the longest suffix that occurs."""
        while state != 0 and token not in self.next[state]:
            state = self.link[state]
            length = self.length[state]
        if token in self.next[state]:
            return self.next[state][token], length + 1
        return 0, 0

    def transfer(self, tokens: Iterable[int]) -> None:
        """Move the cursor over ``tokens``."""
        state, length = self.cursor
        for token in tokens:
            state, length = self.step(state, length, int(token))
        self.cursor = (state, length)

    def reset_cursor(self) -> None:
        self.cursor = (0, 0)

    def lookup(self, token: int) -> tuple[int, int]:
        """The cursor after ``token`` without moving it (the reference's ``lookup(start_token)``)."""
        return self.step(*self.cursor, token)

    def shorter_with_room(self, state: int, n: int) -> int:
        """Walk to shorter matches (suffix links) until ``n`` tokens follow the first occurrence, or
        the shortest non-empty match is reached (the reference's ``to_anc``)."""
        if state == 0:
            return state
        while self.link[state] != 0 and len(self.tokens) - self.min_endpos[state] < n:
            state = self.link[state]
        return state

    def count_occurrences(self) -> None:
        """How often each state's substrings occur: 1 per prefix end (the state created for each
        token; clones own none), summed up the suffix-link tree (longest states first). Call after
        the last :meth:`add`; the reference keeps the same counts incrementally (``cnt_endpos``)."""
        counts = [0, *(0 if state in self.clones else 1 for state in range(1, self.states))]
        for state in sorted(range(1, self.states), key=self.length.__getitem__, reverse=True):
            if self.link[state] > 0:
                counts[self.link[state]] += counts[state]
        self.occurrences = counts
        self._likeliest = {}

    def likeliest_next(self, state: int, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` most frequent ``(token, next state, probability)`` after ``state``'s substrings,
        the probability being the next state's share of ``state``'s occurrences (the reference's
        ``states_topk_next``, ranked by ``cnt_endpos``)."""
        if state not in self._likeliest:
            ranked = sorted(self.next[state].items(), key=lambda item: self.occurrences[item[1]], reverse=True)
            self._likeliest[state] = ranked
        total = self.occurrences[state] if state else len(self.tokens)
        return [(token, nxt, self.occurrences[nxt] / total) for token, nxt in self._likeliest[state][:k]]

    def continuation(self, state: int, n: int) -> list[int]:
        """Up to ``n`` tokens after the first occurrence of ``state``'s substrings."""
        end = self.min_endpos[state]
        return self.tokens[end : end + n]
