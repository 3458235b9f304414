"""The trie cache of PIA Lookahead (Zhao et al. 2024; alipay/PainlessInferenceAcceleration,
``lookahead/common/lookahead_cache.py``), written for DecodeBench's tree proposals.

Layout (as in the reference): one trie per *anchor* token. Every position ``i`` of a token stream
inserts the ``insert_length`` tokens that follow it into the trie of token ``i``. Each node counts
how often its path was inserted, separately for the current prompt ("input" counts, dropped when
the generation ends) and for generated outputs ("output" counts, kept across prompts and halved or
pruned when a trie grows too large).

Retrieval for a query (the last two context tokens ``[a, b]``): match ``b`` inside ``a``'s trie; if
that yields fewer than ``branch_length`` tokens, use ``b``'s own trie instead. Below the match, the
live nodes are ranked by a mixed weight ``(1 - w) * input + w * output`` (``w = 1e-4``: prompt
evidence first, outputs break ties); when there are more than ``decoding_length`` of them, a node
is kept if it is among the ``decoding_length // 2`` most frequent output nodes or among the top by
mixed weight that fill ``decoding_length``. A depth-first walk (children by weight, ``branch_length``
deep, ``decoding_length - 1`` nodes at most) gives the draft tree ("hier" mode); "par" mode turns
that tree into independent root-to-leaf chains within the same token budget.

Differs from the reference, and why:

* Nodes with no count left (paths only the finished prompt had) are removed when the input counts
  are dropped; the reference zeroes them and can still draft them until a squeeze, which only
  happens for big tries (retrieval skips zero-count nodes here either way).
* The mixed-weight threshold follows the earlier reference revision (node indices kept); the later
  revision lost the indices (``[None, fi, fo, fm]``), which silently disabled that threshold.
* One request at a time (DecodeBench decodes batch 1): the input counts are a number, not a
  dict keyed by request index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

TRIE_MODES = ("mix", "input", "output")


class TrieNode:
    """A trie node: child tokens plus how often this path was inserted from prompt / outputs."""

    __slots__ = ("children", "input_count", "output_count")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.input_count = 0.0
        self.output_count = 0.0

    def live(self, mode: str) -> bool:
        """Whether the node has support for retrieval ``mode`` (mix | input | output)."""
        if mode == "input":
            return self.input_count > 0
        if mode == "output":
            return self.output_count > 0
        return self.input_count > 0 or self.output_count > 0


@dataclass
class DraftTree:
    """Draft tokens in topological order; ``parents[i]`` indexes an earlier draft or is -1 (root)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class RetrievalSettings:
    """How a draft is read out of a trie.

    Attributes:
        max_drafts: draft nodes at most (the reference's ``decoding_length - 1``: the root counts).
        branch_length: deepest path, in draft tokens.
        mode: which counts rank and admit nodes: ``mix`` (prompt first), ``input`` or ``output``.
        output_weight: ``w`` in the mixed weight ``(1 - w) * input + w * output``.
        min_output_size: in ``mix``/``output`` mode, the most frequent output nodes always kept.
    """

    max_drafts: int
    branch_length: int
    mode: str = "mix"
    output_weight: float = 1e-4
    min_output_size: int = 32

    def weight(self, node: TrieNode) -> float:
        if self.mode == "input":
            return node.input_count
        if self.mode == "output":
            return node.output_count
        return (1.0 - self.output_weight) * node.input_count + self.output_weight * node.output_count


class AnchorTrie:
    """All branches that followed one anchor token (the reference's ``Tree``)."""

    __slots__ = ("children", "node_count", "output_node_count")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.node_count = 0  # nodes created (recounted after a squeeze), drives pruning
        self.output_node_count = 0  # of which created by outputs

    # -- updates ---------------------------------------------------------------------------------
    def insert(self, branch: Iterable[int], output: bool, count: float = 1.0) -> None:
        """Add ``count`` to every node on ``branch``'s path, creating the missing ones."""
        children = self.children
        for token in branch:
            node = children.get(token)
            if node is None:
                node = children[token] = TrieNode()
                self.node_count += 1
                self.output_node_count += int(output)
            if output:
                node.output_count += count
            else:
                node.input_count += count
            children = node.children

    def clear_input(self) -> None:
        """Drop the prompt's counts; remove nodes that had no other support."""
        _clear_input(self.children)
        self.node_count = self.output_node_count = _count(self.children)

    def squeeze(self, max_nodes: int, max_output_nodes: int) -> None:
        """If too large, halve output counts above 1 and prune nodes seen at most once."""
        if self.node_count > max_nodes or self.output_node_count > max_output_nodes:
            _halve_or_prune(self.children)
            self.node_count = self.output_node_count = _count(self.children)

    # -- retrieval -------------------------------------------------------------------------------
    def match(self, query: list[int], mode: str) -> dict[int, TrieNode]:
        """Children below the path ``query`` (the top level when empty); {} if it is not live."""
        children = self.children
        for token in query:
            node = children.get(token)
            if node is None or not node.live(mode):
                return {}
            children = node.children
        return children

    def draft(self, query: list[int], settings: RetrievalSettings) -> DraftTree:
        """The reference's ``Tree.get``: ranked, thresholded depth-first read-out below ``query``."""
        children = self.match(query, settings.mode)
        tree = DraftTree()
        if not children or settings.max_drafts <= 0 or settings.branch_length <= 0:
            return tree
        admit = _admission(_live_nodes(children, settings.mode), settings)
        _ravel(children, -1, settings.branch_length, settings, admit, tree)
        return tree


def _clear_input(children: dict[int, TrieNode]) -> None:
    for token, node in list(children.items()):
        if node.input_count == 0:
            continue  # nothing below it came from the prompt either
        node.input_count = 0.0
        if node.output_count == 0:
            del children[token]  # input-only path (counts never grow towards the leaves)
        else:
            _clear_input(node.children)


def _halve_or_prune(children: dict[int, TrieNode]) -> None:
    for token, node in list(children.items()):
        if node.output_count > 1.0:
            node.output_count *= 0.5
            _halve_or_prune(node.children)
        else:
            del children[token]


def _count(children: dict[int, TrieNode]) -> int:
    return sum(1 + _count(node.children) for node in children.values())


def _live_nodes(children: dict[int, TrieNode], mode: str) -> list[TrieNode]:
    """Every live node below ``children`` (a dead node's subtree is dead too)."""
    found: list[TrieNode] = []
    stack = list(children.values())
    while stack:
        node = stack.pop()
        if node.live(mode):
            found.append(node)
            stack.extend(node.children.values())
    return found


def _admission(nodes: list[TrieNode], settings: RetrievalSettings) -> Callable[[TrieNode], bool] | None:
    """Which nodes of a large subtree may be drafted (None = all: the subtree is small).

    The reference's thresholds: a node passes if its output count reaches that of the
    ``min_output_size``-th most frequent output node, or (mix) its mixed weight reaches that of
    the node with which the best-weighted ones fill ``decoding_length``; input mode admits every
    node (its minimum input size is 0). Ties pass, as the reference compares with ``>=``.
    """
    limit = settings.max_drafts + 1  # the reference's max_size = decoding_length (root included)
    if len(nodes) <= limit or settings.mode == "input":
        return None
    outputs = sorted((node.output_count for node in nodes), reverse=True)
    size = min(settings.min_output_size, len(outputs))
    output_floor = outputs[size - 1] if size > 0 else math.inf
    if settings.mode == "output":
        return lambda node: node.output_count >= output_floor
    admitted = sum(1 for node in nodes if node.output_count >= output_floor)
    weight_floor = math.inf
    for node in sorted(nodes, key=settings.weight, reverse=True):
        if admitted >= limit:
            break
        if node.output_count < output_floor:
            admitted += 1
            weight_floor = settings.weight(node)
    return lambda node: node.output_count >= output_floor or settings.weight(node) >= weight_floor


def _ravel(
    children: dict[int, TrieNode],
    parent: int,
    depth_left: int,
    settings: RetrievalSettings,
    admit: Callable[[TrieNode], bool] | None,
    tree: DraftTree,
) -> None:
    """Depth-first read-out, children by descending weight (ties keep insertion order)."""
    if depth_left <= 0:
        return
    for token, node in sorted(children.items(), key=lambda item: settings.weight(item[1]), reverse=True):
        if len(tree) >= settings.max_drafts:
            return
        if not node.live(settings.mode) or (admit is not None and not admit(node)):
            continue
        tree.tokens.append(token)
        tree.parents.append(parent)
        if node.children:
            _ravel(node.children, len(tree) - 1, depth_left - 1, settings, admit, tree)


def parallel_branches(tree: DraftTree) -> DraftTree:
    """ "par" mode: each root-to-leaf path of ``tree`` as its own chain, within the same budget.

    Leaves are taken in the tree's (priority) order; shared prefixes are repeated in every chain,
    and the last chain is cut where the budget (the tree's node count) runs out.
    """
    has_child = [False] * len(tree)
    for parent in tree.parents:
        if parent >= 0:
            has_child[parent] = True
    chains = DraftTree()
    for leaf in (i for i in range(len(tree)) if not has_child[i]):
        path = [leaf]
        while tree.parents[path[-1]] >= 0:
            path.append(tree.parents[path[-1]])
        for depth, node in enumerate(reversed(path)):
            if len(chains) >= len(tree):
                return chains
            chains.parents.append(-1 if depth == 0 else len(chains) - 1)
            chains.tokens.append(tree.tokens[node])
    return chains


class TrieCache:
    """The reference's ``LookaheadCache`` for one request at a time.

    Args:
        insert_length: tokens stored after each anchor (the reference passes branch_length + 1).
        eos_ids: streams are cut at the first of these.
        max_nodes / max_output_nodes: a trie above either size is squeezed.
        squeeze_after: squeeze once this many tries were updated since the last squeeze.
    """

    def __init__(
        self,
        insert_length: int,
        eos_ids: Iterable[int] = (),
        max_nodes: int = 65536,
        max_output_nodes: int = 512,
        squeeze_after: int = 1024,
    ):
        self.insert_length = insert_length
        self.eos_ids = set(eos_ids)
        self.max_nodes = max_nodes
        self.max_output_nodes = max_output_nodes
        self.squeeze_after = squeeze_after
        self.tries: dict[int, AnchorTrie] = {}
        self.pending: list[int] = []  # output tokens whose branches are not complete yet
        self.updated: set[int] = set()  # anchors updated since the last squeeze
        self.prompt_anchors: set[int] = set()  # anchors holding input counts

    # -- updates ---------------------------------------------------------------------------------
    def _cut_at_eos(self, tokens: list[int]) -> list[int]:
        for i, token in enumerate(tokens):
            if token in self.eos_ids:
                return tokens[:i]
        return tokens

    def _insert_anchor(self, anchor: int, branch: list[int], output: bool) -> None:
        trie = self.tries.get(anchor)
        if trie is None:
            trie = self.tries[anchor] = AnchorTrie()
        trie.insert(branch, output)
        self.updated.add(anchor)
        if not output:
            self.prompt_anchors.add(anchor)

    def put_prompt(self, tokens: list[int]) -> None:
        """Insert a prompt with input counts (every position anchors the tokens after it)."""
        tokens = self._cut_at_eos(list(tokens))
        for i in range(len(tokens) - 1):
            self._insert_anchor(tokens[i], tokens[i + 1 : i + 1 + self.insert_length], output=False)

    def stream_output(self, tokens: list[int], final: bool = False) -> None:
        """Append generated tokens; insert every anchor whose full branch is known (all on ``final``)."""
        self.pending.extend(self._cut_at_eos(list(tokens)))
        needed = 1 if final else self.insert_length
        ready = len(self.pending) - needed
        for i in range(max(ready, 0)):
            self._insert_anchor(self.pending[i], self.pending[i + 1 : i + 1 + self.insert_length], output=True)
        if final:
            self.pending = []
        elif ready > 0:
            self.pending = self.pending[-self.insert_length :]

    def end_generation(self) -> None:
        """Flush the output stream, drop the prompt's counts and squeeze large tries."""
        self.stream_output([], final=True)
        for anchor in self.prompt_anchors:
            trie = self.tries.get(anchor)
            if trie is not None:
                trie.clear_input()
                if not trie.children:
                    del self.tries[anchor]
        self.prompt_anchors.clear()
        if len(self.updated) >= self.squeeze_after:
            for anchor in self.updated:
                if anchor in self.tries:
                    self.tries[anchor].squeeze(self.max_nodes, self.max_output_nodes)
            self.updated.clear()

    # -- retrieval -------------------------------------------------------------------------------
    def retrieve(self, query: list[int], settings: RetrievalSettings) -> DraftTree:
        """The reference's ``hier_get``: longest query suffix first, shorter one if too few tokens."""
        best = DraftTree()
        for start, anchor in enumerate(query):
            trie = self.tries.get(anchor)
            if trie is None:
                continue
            best = trie.draft(query[start + 1 :], settings)
            if len(best) + 1 >= settings.branch_length:  # root included, as in the reference
                break
        return best

    # -- snapshot --------------------------------------------------------------------------------
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat pre-order snapshot: anchor, parent row (-1 = top level), token and both counts."""
        anchors, parents, tokens, inputs, outputs = [], [], [], [], []
        for anchor, trie in self.tries.items():
            stack = [(-1, token, node) for token, node in reversed(list(trie.children.items()))]
            while stack:
                parent, token, node = stack.pop()
                row = len(tokens)
                anchors.append(anchor), parents.append(parent), tokens.append(token)
                inputs.append(node.input_count), outputs.append(node.output_count)
                stack.extend((row, child, sub) for child, sub in reversed(list(node.children.items())))
        return {
            "anchor": torch.tensor(anchors, dtype=torch.long),
            "parent": torch.tensor(parents, dtype=torch.long),
            "token": torch.tensor(tokens, dtype=torch.long),
            "input_count": torch.tensor(inputs, dtype=torch.float64),
            "output_count": torch.tensor(outputs, dtype=torch.float64),
        }

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the tries from :meth:`to_tensors` (replaces the current content)."""
        self.tries, self.pending, self.updated, self.prompt_anchors = {}, [], set(), set()
        nodes: list[TrieNode] = []
        columns = [state[key].tolist() for key in ("anchor", "parent", "token", "input_count", "output_count")]
        for anchor, parent, token, input_count, output_count in zip(*columns):
            trie = self.tries.get(anchor)
            if trie is None:
                trie = self.tries[anchor] = AnchorTrie()
            node = TrieNode()
            node.input_count, node.output_count = float(input_count), float(output_count)
            (trie.children if parent < 0 else nodes[parent].children)[token] = node
            nodes.append(node)
            trie.node_count += 1
            trie.output_node_count += 1
            if input_count > 0:
                self.prompt_anchors.add(anchor)
