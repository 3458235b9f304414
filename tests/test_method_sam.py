"""SAM-Decoding: the suffix automaton against brute force, the choice between the request automaton,
the corpus automaton and Token Recycling, and greedy output identical to AR."""

from __future__ import annotations

import json
import random

import pytest

from decodebench.config import MethodConfig
from decodebench.methods import build_method
from decodebench.methods.suffix_automaton import SuffixAutomaton

from helpers import decode, embedded_lossless, repeating_prompts, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

SAM = dict(name="sam", impl="decodebench.methods.sam:SamDecodingDrafter")


def sam(**params):
    return build_method(MethodConfig(**SAM, params=params))


def corpus_file(tmp_path, sequences) -> str:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"token_ids": s}) + "\n" for s in sequences))
    return str(path)


# -- the automaton --------------------------------------------------------------------------------
def longest_suffix_match(text: list[int], s: list[int]) -> int:
    for length in range(len(text), 0, -1):
        suffix = text[-length:]
        if any(s[i : i + length] == suffix for i in range(len(s) - length + 1)):
            return length
    return 0


def test_cursor_is_the_longest_suffix_match_and_min_endpos_the_first_occurrence():
    rng = random.Random(0)
    for _ in range(30):
        s = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
        automaton = SuffixAutomaton(s)
        text = []
        for _ in range(20):
            token = rng.randrange(4)  # 3 never occurs in s: the match restarts
            text.append(token)
            automaton.transfer([token])
            state, length = automaton.cursor
            assert length == longest_suffix_match(text, s)
            if length:
                match = text[-length:]
                first_end = min(i + length for i in range(len(s) - length + 1) if s[i : i + length] == match)
                assert automaton.min_endpos[state] == first_end


def test_shorter_with_room_walks_to_an_earlier_occurrence():
    automaton = SuffixAutomaton([1, 2, 3, 4, 5, 9, 2, 3])  # "2 3" first ends at 3, "9 2 3" only at 8
    state, length = automaton.step(*automaton.step(*automaton.step(0, 0, 9), 2), 3)
    assert length == 3 and automaton.continuation(state, 4) == []  # nothing follows "9 2 3"
    shorter = automaton.shorter_with_room(state, 2)
    assert automaton.continuation(shorter, 2) == [4, 5]


def test_occurrence_counts_and_likeliest_next_match_brute_force():
    rng = random.Random(1)
    for _ in range(20):
        s = [rng.randrange(3) for _ in range(rng.randint(1, 40))]
        automaton = SuffixAutomaton(s)
        automaton.count_occurrences()
        for length in (1, 2, 3):
            for start in range(len(s) - length + 1):
                pattern = s[start : start + length]
                state = 0
                for token in pattern:
                    state = automaton.next[state][token]
                occurs = sum(s[i : i + length] == pattern for i in range(len(s) - length + 1))
                assert automaton.occurrences[state] == occurs
                following = {
                    t: sum(s[i : i + length + 1] == [*pattern, t] for i in range(len(s) - length)) for t in range(3)
                }
                ranked = automaton.likeliest_next(state, 2)
                assert [prob * occurs for _, _, prob in ranked] == pytest.approx(
                    sorted((c for c in following.values() if c), reverse=True)[:2]
                )


# -- the drafter's choice ---------------------------------------------------------------------------
def test_request_corpus_and_auxiliary_drafts(tmp_path):
    corpus = corpus_file(tmp_path, [[30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42]])
    drafter = sam(corpus="jsonl", corpus_path=corpus, n_predicts=4, len_threshold=2, len_bias=1)
    drafter.setup(tiny_backbone("llama"))
    drafter.start_request([5, 6, 7, 8, 9, 5, 6], None, None)
    # request text: "5 6" matches (2 tokens) -> the 3 tokens after its first occurrence
    assert drafter.propose([5, 6, 7, 8, 9, 5, 6], 8).tokens == [7, 8, 9]
    # corpus: "30 31 32" matches 3 tokens (3 - bias 1 = 2 >= threshold) -> what followed in the corpus
    assert drafter.propose([5, 6, 7, 8, 9, 5, 6, 30, 31, 32], 8).tokens == [33, 34, 35]
    # no match long enough: Token Recycling's tree (from its empty matrix: token 0 everywhere)
    proposal = drafter.propose([5, 6, 7, 8, 9, 5, 6, 30, 31, 32, 70, 71], 8)
    assert proposal.parents is not None and set(proposal.tokens) == {0}
    stats = drafter.request_stats()
    assert stats["retrieval_steps"] == 2 and stats["aux_steps"] == 1 and stats["datastore_tokens"] == 13


def test_retrieval_only_sizes_drafts_by_the_match_and_the_corpus_drafts_a_frequency_tree(tmp_path):
    # after "1 2" the corpus continues 3 4 (twice), 5 (once); after "1 2 3": 4 (twice)
    corpus = corpus_file(tmp_path, [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 5]])
    drafter = sam(
        corpus="jsonl",
        corpus_path=corpus,
        auxiliary="none",
        alpha=1.0,
        static_tree=True,
        tree_topk=8,
        len_threshold=1,
        len_bias=0,
        n_predicts=60,
    )
    drafter.setup(tiny_backbone("llama"))
    drafter.start_request([9, 1], None, None)
    # "1 2" matches 2 corpus tokens -> 1 + int(1.0 * 2) = 3 tokens with the start token: 2 drafts, the
    # likeliest first (3: 2/3), then the likelier of 5 (1/3) and 3's child 4 (2/3 x 1)
    proposal = drafter.propose([9, 1, 2], 8)
    assert proposal.tokens == [3, 4] and proposal.parents == [-1, 0]
    drafter.params.alpha = 2.0  # 1 + 4 = 5 tokens: every node of the corpus tree below "1 2"
    proposal = drafter.propose([9, 1, 2], 8)
    assert proposal.tokens == [3, 4, 5] and proposal.parents == [-1, 0, -1]
    assert drafter.propose([9, 1, 2], 2).tokens == [3, 4]  # the loop's limit keeps the first drafts
    # no match: retrieval only drafts nothing (no Token Recycling)
    assert len(drafter.propose([9, 1, 2, 77], 8)) == 0
    assert drafter.request_stats()["aux_steps"] == 0


def test_bad_auxiliary_is_refused_with_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"method.params.auxiliary.*token_recycling \| none"):
        sam(auxiliary="eagle2")


# -- losslessness ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [
        {"use_static": False},
        {"n_predicts": 6, "len_threshold": 2, "len_bias": 1},
        # the reference's retrieval-only variant (preset sam_only): match-sized drafts, corpus tree
        {"auxiliary": "none", "alpha": 4.0, "n_predicts": 12, "len_bias": 0, "len_threshold": 1, "static_tree": True},
    ],
)
def test_sam_greedy_equals_ar(backbone, ar_outputs, tmp_path, params):
    prompts = repeating_prompts()
    # the corpus: the target's own answers to half the prompts (prompt + AR answer per row)
    corpus = corpus_file(tmp_path, [p + a for p, a in zip(prompts[::2], ar_outputs[::2])])
    drafter = sam(corpus="jsonl", corpus_path=corpus, **params)
    drafter.setup(backbone, str(tmp_path))
    drafter.reset_state()
    accepted, used = 0, {"retrieval_steps": 0.0, "aux_steps": 0.0}
    for prompt, reference in zip(prompts, ar_outputs):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference
        accepted += sum(s.accepted for s in ours.steps)
        for key in used:
            used[key] += ours.method_stats[key]
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"
    assert used["retrieval_steps"] > 0  # the automata drafted
    assert (used["aux_steps"] > 0) == (params.get("auxiliary") != "none")  # Token Recycling only as auxiliary


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_sam_is_lossless():
    # the training pipeline's default corpus (96 self-written prompts; cached, shared with decodebench-train)
    accepted, drafted = embedded_lossless("sam")
    assert accepted > 0
