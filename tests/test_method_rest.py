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


def token_corpus(tmp_path, sequences) -> str:
    """A JSONL corpus of token-id rows (the tiny models have no tokenizer)."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"token_ids": s}) + "\n" for s in sequences))
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
        rest(corpus_prompts=0)
    with pytest.raises(ConfigValueError, match="method.params.corpus=training .* no tokenizer"):
        from helpers import tiny_backbone

        rest().setup(tiny_backbone("llama"))  # the training corpus needs a chat template
    with pytest.raises(ConfigValueError, match="method.params.max_token_span"):
        rest(max_token_span=1, min_token_span=2)


# -- losslessness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"num_draft": 4, "max_token_span": 4}])
def test_rest_greedy_equals_ar(backbone, ar_outputs, tmp_path, params):
    prompts = repeating_prompts()
    # the corpus: the target's own answers to half the prompts (prompt + AR answer per row)
    corpus = [p + a for p, a in zip(prompts[::2], ar_outputs[::2])]
    drafter = rest(corpus="jsonl", corpus_path=token_corpus(tmp_path, corpus), **params)
    drafter.setup(backbone, str(tmp_path))
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
    # the training pipeline's default corpus (96 self-written prompts; cached, shared with decodebench-train)
    accepted, drafted = embedded_lossless("rest")
    assert accepted > 0


def test_default_corpus_is_the_training_pipelines(monkeypatch, tmp_path):
    """corpus=training reads the one corpus builder (training/corpus.py build_corpus) with the
    method's prompt count and answer length, and records its size and build time."""
    from types import SimpleNamespace

    import torch

    from decodebench.methods.eagle_net import FeatureSequence
    from decodebench.training import corpus as training_corpus

    from helpers import tiny_backbone

    asked = {}

    def fake_build_corpus(
        backbone, tokenizer, model_name, chat_template, cfg, eos_ids, seed, data_dir, cache_dir, **kw
    ):
        asked.update(model=model_name, prompts=cfg.prompts, answer_tokens=cfg.answer_tokens, cache_dir=cache_dir)
        ids = torch.tensor([5, 6, 7, 8, 40, 41, 42])
        sequence = FeatureSequence(ids=ids, features=torch.zeros(7, 1), target_next=ids, answer_start=4)
        info = {"key": "k", "generation_s": 12.5}
        return training_corpus.Corpus(prompts=["p"], sequences=[sequence], token_counts=torch.ones(3), info=info)

    monkeypatch.setattr(training_corpus, "build_corpus", fake_build_corpus)
    drafter = rest(corpus_prompts=8, corpus_max_new_tokens=32)
    drafter.tokenizer = SimpleNamespace(chat_template="{{ messages }}", eos_token_id=2)
    backbone = tiny_backbone("llama")
    backbone.model_name = "tiny-x"
    drafter.setup(backbone, str(tmp_path))
    assert asked == {"model": "tiny-x", "prompts": 8, "answer_tokens": 32, "cache_dir": str(tmp_path)}
    assert drafter.propose([1, 7, 8, 40], 4).tokens == [41, 42]  # prompt + answer, as stored
    stats = drafter.request_stats()
    assert stats["datastore_tokens"] == 7 and stats["corpus_build_s"] == 12.5
