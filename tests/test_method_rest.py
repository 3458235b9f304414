"""REST: the suffix array against brute force, the retrieval trie on hand-worked examples, the
corpus sources, and greedy output identical to AR."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from decodebench.config import ConfigValueError, MethodConfig
from decodebench.methods import build_method
from decodebench.methods.rest import retrieval_tree
from decodebench.methods.suffix_array import SuffixArray, build_suffix_array

from helpers import decode, embedded_lossless, repeating_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

REST = dict(name="rest", impl="decodebench.methods.rest:RestDrafter")


def rest(**params):
    return build_method(MethodConfig(**REST, params=params))


def token_prompts(tmp_path, prompts) -> str:
    """A prompt file of token-id rows (the tiny models have no tokenizer)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"token_ids": p}) + "\n" for p in prompts))
    return str(path)


# -- the suffix array -----------------------------------------------------------------------------
def test_suffix_array_sorts_every_suffix():
    rng = random.Random(0)
    for _ in range(20):
        data = np.array([rng.randrange(4) for _ in range(rng.randint(1, 80))])
        order = build_suffix_array(data)
        assert [data[i:].tolist() for i in order] == sorted(data[i:].tolist() for i in range(len(data)))


def test_find_returns_every_occurrence_and_never_crosses_a_sequence():
    rng = random.Random(1)
    sequences = [[rng.randrange(5) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    array = SuffixArray(sequences)
    for _ in range(50):
        pattern = [rng.randrange(5) for _ in range(rng.randint(1, 3))]
        expected = {
            (s, i) for s, seq in enumerate(sequences) for i in range(len(seq)) if seq[i : i + len(pattern)] == pattern
        }
        assert len(array.find(pattern)) == len(expected)
    array = SuffixArray([[1, 2, 3], [1, 2, 9, 9]])
    assert sorted(array.continuation(int(s) + 2, 5) for s in array.find([1, 2])) == [[3], [9, 9]]
    assert len(array.find([3, 1])) == 0  # "3" ends the first sequence: no match across the separator


# -- the retrieval trie ---------------------------------------------------------------------------
def test_retrieval_tree_keeps_the_most_frequent_prefixes_as_a_trie():
    continuations = [[5, 6, 7], [5, 6, 8], [5, 9], [4]]
    tokens, parents = retrieval_tree(continuations, 64)
    # prefixes: (5) 3, (5,6) 2, (5,6,7) 1, (5,6,8) 1, (5,9) 1, (4) 1
    assert tokens == [5, 4, 6, 9, 7, 8] and parents == [-1, -1, 0, 0, 2, 2]
    tokens, parents = retrieval_tree(continuations, 3)  # (5) 3, (5,6) 2, then the shortest count-1: (4)
    assert tokens == [5, 4, 6] and parents == [-1, -1, 0]


def test_longest_span_wins(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        json.dumps({"token_ids": [1, 2, 3, 40, 41]}) + "\n" + json.dumps({"token_ids": [9, 2, 3, 50]}) + "\n"
    )
    drafter = rest(corpus="jsonl", corpus_path=str(path))
    from helpers import tiny_backbone

    drafter.setup(tiny_backbone("llama"))
    assert drafter.propose([7, 1, 2, 3], 8).tokens == [40, 41]  # "1 2 3" (3 tokens) beats "2 3"
    assert sorted(drafter.propose([7, 8, 2, 3], 8).tokens) == [40, 41, 50]  # "2 3": both continuations
    assert drafter.propose([7, 8, 3], 8).tokens == []  # a 1-token match is below min_token_span
    assert drafter.request_stats()["datastore_tokens"] == 9


def test_bad_params_are_named():
    with pytest.raises(ConfigValueError, match="method.params.corpus_path"):
        rest(corpus="jsonl")
    with pytest.raises(ConfigValueError, match="method.params.corpus"):
        rest(corpus="sharegpt")
    with pytest.raises(ConfigValueError, match="method.params.corpus_path"):
        rest(corpus="jsonl", corpus_path="/nonexistent/corpus.jsonl")
    with pytest.raises(ConfigValueError, match="method.params.corpus_prompts"):
        rest(corpus_prompts="no_such_set")
    with pytest.raises(ConfigValueError, match="method.params.max_token_span"):
        rest(max_token_span=1, min_token_span=2)


# -- losslessness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"num_draft": 4, "max_token_span": 4}])
def test_rest_greedy_equals_ar(backbone, ar_outputs, tmp_path, params):
    prompts = repeating_prompts()
    # the corpus: the target's own answers to half the prompts (a generated corpus, cached)
    drafter = rest(corpus_prompts=token_prompts(tmp_path, prompts[::2]), corpus_max_new_tokens=48, **params)
    drafter.setup(backbone, str(tmp_path))
    assert list((tmp_path / "corpus").glob("*.pt"))
    accepted = 0
    for prompt, reference in zip(prompts, ar_outputs):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference
        assert all(s.drafted <= params.get("num_draft", 64) for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_rest_is_lossless():
    accepted, drafted = embedded_lossless("rest")
    assert accepted > 0
