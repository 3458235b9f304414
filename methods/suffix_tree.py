"""A depth-limited suffix tree with occurrence counts, for SuffixDecoding.

Semantics (those of ArcticInference's ``SuffixTree``, snowflakedb/ArcticInference
``csrc/suffix_decoding``): the tree indexes every suffix of every stored sequence, truncated to
``max_depth`` tokens. The node reached by a string ``s`` counts the start positions whose suffix
passes through ``s`` (its occurrences of length <= ``max_depth``), so ``count(s + t) / count(s)`` is
the empirical probability that ``t`` follows ``s``. Sequences grow one token at a time: each
sequence keeps the nodes where its last ``max_depth`` suffixes end ("active" nodes) and extends
them all when a token is appended.

Representation (DecodeBench's own): nodes that two or more suffixes pass through hold one token;
a node only one suffix passes through (count 1) is a leaf "tail" holding a whole run of tokens as
``(sequence, start, length)``, so a unique suffix costs one node, not one per token. A second
suffix entering a tail splits its first token off into a one-token node; the tail object keeps
the remainder, so active pointers to it stay valid. Every suffix therefore always ends exactly
at the end of a node.

Sibling order decides which child a path draft follows and the order a tree draft tries
children; it reproduces the reference's rule exactly: children are kept by decreasing count; a
new child goes last; a child whose count rises from ``c`` to ``c + 1`` becomes the first of the
``c + 1`` siblings if it was the first of the ``c`` siblings, otherwise the last of them.

Drafts are computed exactly as the reference computes them, so equal scores and probabilities
resolve the same way: probabilities and scores in float32 (the reference's ``float``), and the
tree draft's best-first queue pops equal probabilities in the order of libstdc++'s
``std::priority_queue`` (:class:`StdMaxHeap`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from numpy import float32

NO_CHILDREN: dict = {}  # never written: a node replaces it with its own maps (see Node.own_maps)


class Node:
    """A tree node: ``length`` tokens ``seqs[seq][start : start + length]`` (the root has none).

    Children form a doubly linked list in sibling order (``first_child`` ... ``next``); ``group_head``
    maps a count to the first child with that count. Most nodes are leaves: their two maps stay the
    shared read-only :data:`NO_CHILDREN` until a first child arrives (fewer objects to allocate and
    for the garbage collector to scan).
    """

    __slots__ = (
        "count",
        "seq",
        "start",
        "length",
        "parent",
        "children",
        "first_child",
        "last_child",
        "prev",
        "next",
        "group_head",
    )

    def __init__(self, count: int, seq: int, start: int, length: int, parent: Node | None):
        self.count = count
        self.seq, self.start, self.length = seq, start, length
        self.parent = parent
        self.children: dict[int, Node] = NO_CHILDREN
        self.first_child: Node | None = None
        self.last_child: Node | None = None
        self.prev: Node | None = None
        self.next: Node | None = None
        self.group_head: dict[int, Node] = NO_CHILDREN

    def own_maps(self) -> None:
        """Give the node its own children / group maps before the first child is added."""
        if self.children is NO_CHILDREN:
            self.children, self.group_head = {}, {}

    def ordered_children(self):
        """Children in sibling order (decreasing count)."""
        child = self.first_child
        while child is not None:
            yield child
            child = child.next


# -- sibling list maintenance --------------------------------------------------------------------
def _unlink(node: Node) -> None:
    parent = node.parent
    if node.prev is None:
        parent.first_child = node.next
    else:
        node.prev.next = node.next
    if node.next is None:
        parent.last_child = node.prev
    else:
        node.next.prev = node.prev
    node.prev = node.next = None


def _link_before(node: Node, anchor: Node) -> None:
    parent = anchor.parent
    node.prev, node.next = anchor.prev, anchor
    if anchor.prev is None:
        parent.first_child = node
    else:
        anchor.prev.next = node
    anchor.prev = node


def _link_last(node: Node) -> None:
    parent = node.parent
    node.prev, node.next = parent.last_child, None
    if parent.last_child is None:
        parent.first_child = node
    else:
        parent.last_child.next = node
    parent.last_child = node


def _add_child(parent: Node, token: int, child: Node) -> None:
    """Attach a new count-``child.count`` child at the end of the sibling list."""
    parent.own_maps()
    parent.children[token] = child
    _link_last(child)
    parent.group_head.setdefault(child.count, child)


def _replace(old: Node, new: Node, token: int) -> None:
    """Put ``new`` where ``old`` stood among its siblings (same count, same place)."""
    parent = old.parent
    new.parent = parent
    new.prev, new.next = old.prev, old.next
    if old.prev is None:
        parent.first_child = new
    else:
        old.prev.next = new
    if old.next is None:
        parent.last_child = new
    else:
        old.next.prev = new
    old.prev = old.next = None
    if parent.group_head.get(old.count) is old:
        parent.group_head[old.count] = new
    parent.children[token] = new


def _increment(node: Node) -> None:
    """``node.count += 1`` keeping siblings ordered (see the module docstring for the tie rule)."""
    parent, count = node.parent, node.count
    if parent is None:
        node.count += 1
        return
    heads = parent.group_head
    was_first = heads[count] is node
    if was_first:
        if node.next is not None and node.next.count == count:
            heads[count] = node.next
        else:
            del heads[count]
    higher = heads.get(count + 1)
    if was_first:
        if higher is not None:  # first of the count + 1 siblings
            _unlink(node)
            _link_before(node, higher)
        heads[count + 1] = node
    else:  # last of the count + 1 siblings: just before the first count-c sibling
        _unlink(node)
        _link_before(node, heads[count])
        if higher is None:
            heads[count + 1] = node
    node.count += 1


class StdMaxHeap:
    """A max-heap on ``item[0]`` that pushes and pops in exactly the order of libstdc++'s
    ``std::priority_queue`` (``std::push_heap`` / ``std::pop_heap``), so ties break as in the
    reference."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def __len__(self) -> int:
        return len(self.items)

    def push(self, item: tuple) -> None:
        self.items.append(item)
        self._sift_up(len(self.items) - 1, 0, item)

    def pop(self) -> tuple:
        items = self.items
        top, last = items[0], items.pop()
        if items:  # the old last element fills the hole left by the top
            self._adjust(len(items), last)
        return top

    def _sift_up(self, hole: int, top: int, item: tuple) -> None:
        items = self.items
        while hole > top:
            parent = (hole - 1) // 2
            if not items[parent][0] < item[0]:
                break
            items[hole] = items[parent]
            hole = parent
        items[hole] = item

    def _adjust(self, length: int, item: tuple) -> None:
        """Move the hole at the root down along larger children, then sift ``item`` up into it."""
        items, hole, child = self.items, 0, 0
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if items[child][0] < items[child - 1][0]:
                child -= 1
            items[hole] = items[child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            items[hole] = items[child - 1]
            hole = child - 1
        self._sift_up(hole, 0, item)


@dataclass
class Draft:
    """A speculation: tokens with parent pointers (``-1`` = the context's last token).

    ``probs[i]`` is the estimated probability of reaching token ``i``; ``score`` their sum (the
    expected number of accepted tokens); ``match_len`` the length of the context suffix matched.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    score: Any = float32(0.0)  # float32, as in the reference
    match_len: int = 0


class SuffixTree:
    """Suffix tree over growing sequences, truncated at ``max_depth`` tokens per suffix."""

    def __init__(self, max_depth: int):
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        self.max_depth = max_depth
        self.root = Node(0, -1, 0, 0, None)
        self.root.own_maps()
        self.seqs: dict[int, list[int]] = {}
        self.active: dict[int, deque[Node]] = {}  # per sequence: where its last suffixes end

    def __deepcopy__(self, memo: dict) -> SuffixTree:
        """A copy without recursion: ``copy.deepcopy`` would follow the sibling lists (``next``)
        one frame per sibling and overflow Python's stack on a grown tree (a batch's row copies,
        ``engine.drafting.row_copy``, copy the learned global tree)."""
        nodes: dict[int, Node] = {}
        pending = [self.root, *(node for active in self.active.values() for node in active)]
        while pending:
            node = pending.pop()
            if node is None or id(node) in nodes:
                continue
            nodes[id(node)] = node
            pending += [node.parent, node.first_child, node.last_child, node.prev, node.next]
            pending += [*node.children.values(), *node.group_head.values()]
        copies = {key: Node(n.count, n.seq, n.start, n.length, None) for key, n in nodes.items()}

        def twin(node: Node | None) -> Node | None:
            return None if node is None else copies[id(node)]

        for key, node in nodes.items():
            twin_node = copies[key]
            twin_node.parent, twin_node.prev, twin_node.next = twin(node.parent), twin(node.prev), twin(node.next)
            twin_node.first_child, twin_node.last_child = twin(node.first_child), twin(node.last_child)
            if node.children is not NO_CHILDREN:
                twin_node.children = {token: twin(child) for token, child in node.children.items()}
                twin_node.group_head = {count: twin(child) for count, child in node.group_head.items()}
            memo[key] = twin_node
        clone = SuffixTree.__new__(SuffixTree)
        memo[id(self)] = clone
        clone.max_depth, clone.root = self.max_depth, twin(self.root)
        clone.seqs = {seq_id: list(tokens) for seq_id, tokens in self.seqs.items()}
        clone.active = {
            seq_id: deque(map(twin, active), maxlen=active.maxlen) for seq_id, active in self.active.items()
        }
        return clone

    # -- building --------------------------------------------------------------------------------
    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to sequence ``seq_id`` (created on first use)."""
        for token in tokens:
            self.append(seq_id, int(token))

    def append(self, seq_id: int, token: int) -> None:
        """Append one token: every active suffix of the sequence grows by it, and a new suffix
        starts at it."""
        seq = self.seqs.setdefault(seq_id, [])
        active = self.active.setdefault(seq_id, deque(maxlen=self.max_depth))
        seq.append(token)
        position = len(seq) - 1
        root = self.root
        active.append(root)  # the suffix starting at the new token (drops the oldest)
        root.count += 1
        for index, node in enumerate(active):
            if node.count == 1 and node is not root:  # our own tail (the common case): lengthen it
                node.length += 1
            else:
                active[index] = self._grow(node, seq_id, position, token)

    def _grow(self, node: Node, seq_id: int, position: int, token: int) -> Node:
        """The node where a suffix ending at the end of ``node`` (shared, or the root) ends after
        appending ``token``."""
        child = node.children.get(token)
        if child is None:
            child = Node(1, seq_id, position, 1, node)
            _add_child(node, token, child)
            return child
        if child.length > 1:  # another suffix's tail: split off its first token
            head = Node(child.count, child.seq, child.start, 1, node)
            _replace(child, head, token)
            child.start += 1
            child.length -= 1
            child.parent, child.prev, child.next = head, None, None
            head.own_maps()
            head.children[self.seqs[child.seq][child.start]] = child
            head.first_child = head.last_child = child
            head.group_head[child.count] = child
            child = head
        _increment(child)
        return child

    # -- lookup ----------------------------------------------------------------------------------
    def token_at(self, node: Node, offset: int) -> int:
        return self.seqs[node.seq][node.start + offset]

    def match(self, pattern: Sequence[int]) -> tuple[Node, int] | None:
        """Walk ``pattern`` from the root; returns (node, tokens of it consumed) or None."""
        node, offset, seqs = self.root, 0, self.seqs
        for token in pattern:
            if offset == node.length:
                node = node.children.get(token)
                if node is None:
                    return None
                offset = 0
            if seqs[node.seq][node.start + offset] != token:
                return None
            offset += 1
        return node, offset

    def suffix_ends(self, seq_id: int) -> list[Node]:
        """Where the sequence's last suffixes end: item ``m - 1`` is the node matched by its last ``m``
        tokens (``m`` up to ``max_depth``), at the node's end — a free ``match`` for those patterns."""
        active = self.active.get(seq_id, ())
        return [active[-m] for m in range(1, len(active) + 1)]

    def speculate(
        self,
        context: Sequence[int],
        max_tokens: int,
        max_spec_factor: float,
        max_spec_offset: float,
        min_token_prob: float,
        use_tree: bool,
        known_ends: Sequence[Node] = (),
    ) -> Draft:
        """Best draft over every suffix of ``context`` that occurs in the tree.

        For each match length ``m = 1 .. len(context) - 1`` (stopping at the first suffix that does
        not occur), draft at most ``min(max_tokens, int(m * max_spec_factor + max_spec_offset))``
        tokens whose estimated probability is >= ``min_token_prob``; keep the highest score (ties go
        to the longer match). ``known_ends[m - 1]``, when given, is the node the last ``m`` tokens of
        ``context`` end at (see :meth:`suffix_ends`).
        """
        best = Draft()
        walk = self._draft_tree if use_tree else self._draft_path
        for match_len in range(1, len(context)):
            if match_len <= len(known_ends):
                node = known_ends[match_len - 1]
                if node.count == 1:
                    # only the context's own occurrence, with nothing after it: this and every
                    # longer match draft nothing (the reference keeps the last of those empty drafts)
                    if best.score == 0:
                        best = Draft(match_len=min(len(known_ends), len(context) - 1))
                    break
                found = (node, node.length)
            else:
                found = self.match(context[len(context) - match_len :])
                if found is None:
                    break
            budget = max(0, min(max_tokens, int(match_len * max_spec_factor + max_spec_offset + 1e-6)))
            draft = walk(found[0], found[1], budget, min_token_prob)
            if draft.score >= best.score:
                best = draft
                best.match_len = match_len
        return best

    def _draft_path(self, node: Node, offset: int, budget: int, min_token_prob: float) -> Draft:
        """Follow the most frequent child from the match, while the path probability holds."""
        draft, prob, threshold = Draft(), float32(1.0), float32(min_token_prob)
        while len(draft.tokens) < budget and prob >= threshold:
            if offset < node.length:
                draft.parents.append(len(draft.tokens) - 1)
                draft.tokens.append(self.token_at(node, offset))
                draft.probs.append(float(prob))
                draft.score += prob
                offset += 1
                continue
            child = node.first_child
            if child is None:
                break
            prob *= float32(child.count) / float32(node.count)
            node, offset = child, 0
        return draft

    def _draft_tree(self, node: Node, offset: int, budget: int, min_token_prob: float) -> Draft:
        """Best-first expansion by path probability (a max-heap), up to ``budget`` tokens.

        Children are queued in sibling order and only while their probability reaches
        ``min_token_prob`` (sibling order is by decreasing count, so the first miss ends the scan).
        """
        draft, threshold, heap = Draft(), float32(min_token_prob), StdMaxHeap()
        heap.push((float32(1.0), *self._skip_chain(node, offset), -1))
        while heap and len(draft.tokens) < budget:
            prob, node, offset, parent = heap.pop()
            if offset < node.length:
                draft.tokens.append(self.token_at(node, offset))
                draft.parents.append(parent)
                draft.probs.append(float(prob))
                draft.score += prob
                heap.push((prob, *self._skip_chain(node, offset + 1), len(draft.tokens) - 1))
                continue
            for child in node.ordered_children():
                child_prob = prob * float32(child.count) / float32(node.count)
                if child_prob < threshold:
                    break
                heap.push((child_prob, child, 0, parent))
        return draft

    def _skip_chain(self, node: Node, offset: int) -> tuple[Node, int]:
        """Step from the end of ``node`` into its only child when nothing branches or ends there.

        The reference stores such a chain as one node, which the best-first queue walks one token
        per push; stepping over our one-token links keeps the queue's pushes (and ties) the same.
        """
        while offset == node.length and node is not self.root:
            child = node.first_child
            if child is None or child is not node.last_child or child.count != node.count:
                break
            node, offset = child, 0
        return node, offset

    # -- checks ----------------------------------------------------------------------------------
    def node_count(self) -> int:
        """Number of nodes below the root (for tests and memory estimates)."""
        stack, total = [self.root], 0
        while stack:
            node = stack.pop()
            total += len(node.children)
            stack.extend(node.children.values())
        return total
