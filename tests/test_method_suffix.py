"""SuffixDecoding: the suffix tree against hand-worked examples (and the reference's own C++ tree
when it is importable), state policies, and greedy output identical to AR."""

from __future__ import annotations

import random

import pytest

from decodebench.config import MethodConfig
from decodebench.methods import build_method
from decodebench.methods.suffix_tree import StdMaxHeap, SuffixTree

from helpers import decode, embedded_method_summary, repeating_prompts, tiny_backbone

SUFFIX = dict(name="suffix", impl="decodebench.methods.suffix:SuffixDecodingDrafter")


def suffix(**params):
    return build_method(MethodConfig(**SUFFIX, params=params))


# -- losslessness -------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"use_tree": False}, {"max_spec_tokens": 3, "min_token_prob": 0.3}])
def test_suffix_greedy_equals_ar(backbone, params):
    ar, drafter = build_method(MethodConfig()), suffix(**params)
    ar.setup(backbone)
    drafter.setup(backbone)
    accepted = 0
    for prompt in repeating_prompts():
        reference = decode(backbone, ar, prompt)
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference.new_ids
        assert all(s.drafted <= params.get("max_spec_tokens", 64) for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


# -- the suffix tree: hand-worked examples ----------------------------------------------------------
def test_counts_are_occurrences_within_depth():
    tree = SuffixTree(max_depth=3)
    tree.extend(0, [1, 2, 3, 1, 2, 4, 1, 2, 3])
    node, offset = tree.match([1, 2])
    assert (node.count, offset) == (3, node.length)  # "1 2" occurs 3 times
    assert tree.match([1, 2, 3])[0].count == 2
    assert tree.match([2, 3, 1])[0].count == 1
    assert tree.match([1, 2, 3, 1]) is None  # deeper than max_depth: never indexed
    assert tree.match([4, 4]) is None
    assert tree.root.count == 9  # one suffix per token


def test_path_draft_probabilities_threshold_and_budget():
    # "1 2" is followed by 3 (twice) and 4 (once): p(3) = 2/3; "1 2 3" then 1 (once of twice): 1/3
    tree = SuffixTree(max_depth=64)
    tree.extend(0, [1, 2, 3, 1, 2, 4, 1, 2, 3])
    draft = tree.speculate([5, 1, 2], 10, 1.0, 0.0, 0.1, use_tree=False)
    assert draft.tokens == [3, 1] and draft.parents == [-1, 0] and draft.match_len == 2
    assert draft.probs == pytest.approx([2 / 3, 1 / 3])
    assert float(draft.score) == pytest.approx(1.0)
    # probability threshold 0.5 drops the second token; factor 0.5 allows 1 token for a 2-match
    assert tree.speculate([5, 1, 2], 10, 1.0, 0.0, 0.5, use_tree=False).tokens == [3]
    assert tree.speculate([5, 1, 2], 10, 0.5, 0.0, 0.1, use_tree=False).tokens == [3]
    assert tree.speculate([5, 1, 2], 1, 1.0, 0.0, 0.1, use_tree=False).tokens == [3]  # max tokens
    assert tree.speculate([7, 8], 10, 1.0, 0.0, 0.1, use_tree=False).tokens == []  # no match


def test_tree_draft_branches_best_first():
    tree = SuffixTree(max_depth=64)
    tree.extend(0, [1, 2, 3, 1, 2, 4, 1, 2, 3])
    draft = tree.speculate([5, 1, 2], 10, 1.0, 0.0, 0.1, use_tree=True)
    # both children of "1 2" (3: 2/3, 4: 1/3) are siblings of the root (parent -1)
    assert draft.tokens == [3, 4] and draft.parents == [-1, -1]
    assert draft.probs == pytest.approx([2 / 3, 1 / 3])
    wide = tree.speculate([5, 1, 2], 10, 2.0, 0.0, 0.0, use_tree=True)
    assert wide.tokens[:2] == [3, 4] and 1 in wide.tokens  # "3 -> 1" joins once the budget allows


def test_best_score_wins_and_ties_go_to_the_longer_match():
    tree = SuffixTree(max_depth=64)
    tree.extend(0, [9, 1, 2, 3, 8, 1, 2, 3])
    # "2" -> [3] (1 token for a 1-match) scores 1; "1 2" -> [3 (p 1), 8 (p 1/2)] scores 1.5
    draft = tree.speculate([7, 1, 2], 10, 1.0, 0.0, 0.1, use_tree=False)
    assert draft.match_len == 2 and draft.tokens == [3, 8] and float(draft.score) == pytest.approx(1.5)
    tied = SuffixTree(max_depth=64)
    tied.extend(0, [1, 2, 3, 9, 2, 3])
    # with one token allowed, "2" and "1 2" both draft [3] with probability 1: the longer match wins
    assert tied.speculate([7, 1, 2], 1, 1.0, 0.0, 0.1, use_tree=False).match_len == 2


def test_tails_split_and_sibling_order_follows_the_reference_rule():
    tree = SuffixTree(max_depth=8)
    tree.extend(0, [5, 6, 7])  # one suffix per start: 3 tails under the root
    assert [tree.token_at(c, 0) for c in tree.root.ordered_children()] == [5, 6, 7]  # creation order
    tree.extend(1, [6])  # count(6) 1 -> 2: the only count-2 child, ahead of the count-1 ones
    assert [tree.token_at(c, 0) for c in tree.root.ordered_children()] == [6, 5, 7]
    tree.extend(2, [7])  # count(7) 1 -> 2, and 5 was first among count 1: 7 is the LAST count-2 child
    assert [(tree.token_at(c, 0), c.count) for c in tree.root.ordered_children()] == [(6, 2), (7, 2), (5, 1)]
    tree.extend(3, [5])  # count(5) 1 -> 2, 5 was first among count 1: it is the FIRST count-2 child
    assert [(tree.token_at(c, 0), c.count) for c in tree.root.ordered_children()] == [(5, 2), (6, 2), (7, 2)]
    six = tree.match([6])[0]
    assert six.length == 1 and tree.match([6, 7])[0].count == 1  # tail "6 7" was split after 6


def test_known_suffix_ends_give_the_same_drafts_as_matching():
    """The shortcut through the request's own active suffixes changes no draft."""
    rng = random.Random(4)
    for _ in range(30):
        tree, depth = SuffixTree(max_depth=8), 8
        for _ in range(rng.randint(1, 60)):
            tree.append(0, rng.randrange(4))
            tree.append(1, rng.randrange(4))
            pattern = tree.seqs[0][-depth:]
            for use_tree in (False, True):
                args = (5, 1.0, 1.0, 0.1, use_tree)
                plain = tree.speculate(pattern, *args)
                fast = tree.speculate(pattern, *args, known_ends=tree.suffix_ends(0))
                assert (fast.tokens, fast.parents, fast.match_len) == (plain.tokens, plain.parents, plain.match_len)


def test_a_grown_tree_copies_without_recursion_drafts_the_same_and_grows_on_its_own():
    """A batch's row copies deep-copy the learned tree: thousands of root children (one sibling
    list) overflowed copy.deepcopy's recursion; the copy is whole, drafts the same, and is independent."""
    import copy

    rng = random.Random(0)
    tree = SuffixTree(max_depth=64)
    for seq in range(3):
        tree.extend(seq, [rng.randrange(4000) for _ in range(3000)] + [1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert len(tree.root.children) > 2000
    twin = copy.deepcopy(tree)
    assert twin.node_count() == tree.node_count() and twin.root is not tree.root
    for context in ([5, 1, 2], [1, 2, 3], [rng.randrange(4000) for _ in range(4)]):
        for use_tree in (False, True):
            ours, theirs = (t.speculate(context, 8, 1.0, 0.0, 0.1, use_tree=use_tree) for t in (tree, twin))
            assert (ours.tokens, ours.parents) == (theirs.tokens, theirs.parents)
    twin.extend(1, [1, 2, 3, 1, 2, 3])
    assert twin.root.count == tree.root.count + 6 and twin.match([1, 2, 3])[0].count > tree.match([1, 2, 3])[0].count
    assert twin.speculate([9, 1, 2], 8, 1.0, 0.0, 0.1, use_tree=False).tokens[0] == 3


def test_std_max_heap_pops_like_libstdcxx():
    # equal keys: libstdc++'s heap does not pop in insertion order (hand-traced push/pop_heap)
    heap = StdMaxHeap()
    for item in [(1.0, "a"), (0.5, "b"), (0.5, "c"), (0.5, "d")]:
        heap.push(item)
    assert [heap.pop()[1] for _ in range(4)] == ["a", "c", "b", "d"]  # checked against g++ 12


def test_matches_reference_extension_when_importable():
    """Random sequences and patterns: identical drafts to ArcticInference's C++ suffix tree."""
    reference = pytest.importorskip("arctic_inference.suffix_decoding._C")
    rng = random.Random(0)
    for _ in range(100):
        depth, vocab = rng.choice([2, 4, 64]), rng.choice([2, 4, 30])
        theirs, ours = reference.SuffixTree(depth), SuffixTree(depth)
        for step in range(rng.randint(1, 200)):
            seq, token = rng.randrange(3), rng.randrange(vocab)
            theirs.extend(seq, [token])
            ours.append(seq, token)
            if step % 5 == 0:
                pattern = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
                for use_tree in (False, True):
                    args = (
                        rng.choice([1, 5, 64]),
                        rng.choice([1.0, 3.0]),
                        rng.choice([0.0, 1.0]),
                        rng.choice([0.0, 0.1, 0.5]),
                        use_tree,
                    )
                    a, b = theirs.speculate(pattern, *args), ours.speculate(pattern, *args)
                    assert (list(a.token_ids), list(a.parents), a.match_len) == (b.tokens, b.parents, b.match_len)
                    assert list(a.probs) == pytest.approx(b.probs, abs=1e-6)


# -- the drafter: two trees, state policies ---------------------------------------------------------
def run_turn(drafter, prompt: list[int], output: list[int], budget: int = 8):
    """Feed ``prompt`` then ``output`` token by token (as the loop would); return the proposals."""
    drafter.begin(prompt)
    proposals = []
    for end in range(len(output) + 1):
        proposals.append(drafter.propose(prompt + output[:end], budget))
    return proposals


def test_global_tree_learns_outputs_across_prompts_per_task():
    drafter = suffix(state="per_task", use_tree=False)
    drafter.setup(tiny_backbone("llama"))
    run_turn(drafter, [1, 2], [10, 11, 12, 13, 14])
    proposal = run_turn(drafter, [3, 4], [10, 11])[-1]  # a new prompt starts like the last output
    assert proposal.tokens == [12, 13]  # match "10 11" (2 tokens) in the global tree -> 2 drafts
    drafter.reset_state()  # back to the state at setup: the previous output is forgotten
    assert run_turn(drafter, [3, 4], [10, 11])[-1].tokens == []


def test_per_prompt_forgets_previous_outputs_but_uses_the_prompt():
    drafter = suffix(state="per_prompt", use_tree=False)
    drafter.setup(tiny_backbone("llama"))
    run_turn(drafter, [1, 2], [10, 11, 12, 13, 14])
    assert run_turn(drafter, [3, 4], [10, 11])[-1].tokens == []
    assert run_turn(drafter, [20, 21, 22, 23, 9], [20, 21])[-1].tokens == [22, 23]  # from the prompt


def test_persistent_state_is_saved_and_loaded(tmp_path):
    backbone = tiny_backbone("llama")
    first = suffix(state="persistent", use_tree=False)
    first.setup(backbone, str(tmp_path))
    run_turn(first, [1, 2], [10, 11, 12, 13, 14])
    first.finish()
    assert list((tmp_path / "state").glob("suffix-*.pt"))
    second = suffix(state="persistent", use_tree=False)
    second.setup(backbone, str(tmp_path))
    assert run_turn(second, [3, 4], [10, 11])[-1].tokens == [12, 13]


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_suffix_is_lossless(tmp_path, data_dir):
    summary = embedded_method_summary("suffix", tmp_path, data_dir)
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["alpha"] > 0
