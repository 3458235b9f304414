"""ADED: the tri-gram matrix (top-12, reinforcement), the MCTS and tree building, the cached corpus
step, state policies, and greedy output identical to AR."""

from __future__ import annotations

import random

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.methods import build_method, method_config
from decodebench.methods.aded_search import MctsConfig, TrigramMatrix, cut_to_choices, mcts_paths, paths_to_tree

from helpers import decode, embedded_method_summary, repeating_prompts, tiny_backbone

ADED = dict(name="aded", impl="decodebench.methods.aded:AdedDrafter")


def aded(**params):
    return build_method(MethodConfig(**ADED, params={"corpus_prompts": 0, **params}))


# -- losslessness -------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"mcts_iterations": 20, "top_paths": 4, "max_draft_tokens": 6}])
def test_aded_greedy_equals_ar(backbone, params):
    ar, drafter = build_method(MethodConfig()), aded(**params)
    ar.setup(backbone)
    drafter.setup(backbone)
    accepted = 0
    for prompt in repeating_prompts(4):
        reference = decode(backbone, ar, prompt, max_new_tokens=40)
        ours = decode(backbone, drafter, prompt, max_new_tokens=40)
        assert ours.new_ids == reference.new_ids
        assert all(s.drafted <= params.get("max_draft_tokens", 64) for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


# -- the tri-gram matrix ----------------------------------------------------------------------------
def test_matrix_keeps_top_12_normalised_over_all_successors():
    # pair (1, 2) is followed by 15 different tokens; token 100 + i occurs i + 1 times
    sequence = [token for i in range(15) for token in [1, 2, 100 + i] * (i + 1)]
    matrix = TrigramMatrix.from_sequences([sequence], top_k=12)
    row = matrix.successors((1, 2))
    assert list(row) == [114 - i for i in range(12)]  # the 12 most frequent, most frequent first
    total = sum(range(1, 16))
    assert row[114] == pytest.approx(15 / total) and row[103] == pytest.approx(4 / total)
    assert 100 not in row and sum(row.values()) < 1.0


def test_reinforcement_touches_only_the_last_window_and_is_capped():
    matrix = TrigramMatrix({(1, 2): {3: 0.5}})
    tokens = [1, 2, 3] + [9] * 20 + [4, 5, 6]
    matrix.reinforce(tokens, window=16, step=0.04, cap=3.0)
    assert matrix.successors((1, 2)) == {3: 0.5}  # outside the last 16 tokens
    assert matrix.successors((4, 5)) == {6: pytest.approx(0.04)}
    for _ in range(100):
        matrix.reinforce(tokens, window=16, step=0.04, cap=3.0)
    assert matrix.successors((4, 5))[6] == 3.0


# -- MCTS and the draft tree -----------------------------------------------------------------------
def chain_matrix() -> TrigramMatrix:
    """1 2 -> 3 (0.9) | 7 (0.1); 2 3 -> 4; 3 4 -> 5; 4 5 -> 6; 2 7 -> 8."""
    return TrigramMatrix(
        {(1, 2): {3: 0.9, 7: 0.1}, (2, 3): {4: 1.0}, (3, 4): {5: 1.0}, (4, 5): {6: 1.0}, (2, 7): {8: 1.0}}
    )


def test_mcts_finds_the_likely_chain_and_extends_it():
    paths = mcts_paths(chain_matrix(), (1, 2), MctsConfig(iterations=50), random.Random(0))
    assert paths[0][:2] == [3, 4]  # the most visited child of the root, extended by its successor
    assert [3, 4, 5, 6] in paths  # depth 3 + the most likely next token
    assert any(path[0] == 7 for path in paths)  # the unlikely branch is explored too
    assert mcts_paths(chain_matrix(), (8, 9), MctsConfig(iterations=10), random.Random(0)) == []


def test_mcts_is_deterministic_for_a_seed():
    first = mcts_paths(chain_matrix(), (1, 2), MctsConfig(iterations=30), random.Random(3))
    assert first == mcts_paths(chain_matrix(), (1, 2), MctsConfig(iterations=30), random.Random(3))


def test_cut_to_choices_drops_the_most_diverse_paths_first():
    paths = [[1, 2, 3, 4], [1, 1, 1], [5, 6]]  # 4, 1 and 2 distinct tokens
    assert cut_to_choices(paths, choices=3) == [[1, 1, 1], [5, 6]]
    assert cut_to_choices(paths, choices=7) == paths


def test_paths_merge_into_a_breadth_first_tree():
    tokens, parents = paths_to_tree([[3, 4, 5], [3, 4, 6], [7]], max_nodes=64, max_depth=8)
    assert tokens == [3, 7, 4, 5, 6] and parents == [-1, -1, 0, 2, 2]
    assert paths_to_tree([[3, 4, 5], [7]], max_nodes=3, max_depth=8) == ([3, 7, 4], [-1, -1, 0])
    assert paths_to_tree([[3, 4, 5]], max_nodes=64, max_depth=1) == ([3], [-1])


# -- the corpus (the training pipeline's) -----------------------------------------------------------
def test_corpus_comes_from_the_training_pipeline(tmp_path, monkeypatch):
    """ADED's matrix is built from the answers of the decodebench-train corpus (self-written prompts,
    never a benchmark question), asked for with ADED's corpus settings."""
    from decodebench.methods.eagle_net import FeatureSequence

    asked = {}

    def fake_build_corpus(
        backbone, tokenizer, model_name, chat_template, cfg, eos, seed, data_dir, cache_dir, progress
    ):
        asked.update(source=cfg.source, prompts=cfg.prompts, answer_tokens=cfg.answer_tokens, cache=cache_dir)
        ids = torch.tensor([1, 2, 3, 7, 8, 9, 7, 8, 10])
        return type("Corpus", (), {"sequences": [FeatureSequence(ids, torch.zeros(9, 4), ids, answer_start=3)]})

    import decodebench.training.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "build_corpus", fake_build_corpus)
    drafter = build_method(MethodConfig(**ADED, params=dict(corpus_prompts=5, corpus_max_new_tokens=6)))
    monkeypatch.setattr(type(drafter), "_tokenizer", lambda self, backbone: type("T", (), {"eos_token_id": 0})())
    drafter.setup(tiny_backbone("llama"), str(tmp_path))
    assert asked == dict(source="self", prompts=5, answer_tokens=6, cache=str(tmp_path))
    assert set(drafter.corpus_matrix.rows) == {(7, 8), (8, 9), (9, 7)}  # the answer only, not the prompt
    assert "corpus_files" not in method_config("aded").params  # no GSM8K test answers any more


# -- state policies --------------------------------------------------------------------------------
def test_state_policies(backbone, tmp_path):
    prompt = repeating_prompts()[0]
    per_prompt = aded(state="per_prompt", mcts_iterations=10)
    per_prompt.setup(backbone)
    decode(backbone, per_prompt, prompt, max_new_tokens=8)
    assert len(per_prompt.matrix) > 0
    per_prompt.begin([1, 2, 3])
    assert len(per_prompt.matrix) == 0  # back to the corpus matrix (empty here) at every prompt

    per_task = aded(state="per_task", mcts_iterations=10)
    per_task.setup(backbone)
    decode(backbone, per_task, prompt, max_new_tokens=8)
    learned = per_task.matrix.copy().rows
    per_task.begin([1, 2, 3])
    assert per_task.matrix.rows == learned and learned  # kept across prompts
    per_task.reset_state()
    assert len(per_task.matrix) == 0

    saved = aded(state="persistent", mcts_iterations=10)
    saved.setup(backbone, str(tmp_path))
    decode(backbone, saved, prompt, max_new_tokens=8)
    saved.finish()
    loaded = aded(state="persistent", mcts_iterations=10)
    loaded.setup(backbone, str(tmp_path))
    assert loaded.matrix.rows == saved.matrix.rows


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_aded_is_lossless(tmp_path, data_dir):
    summary = embedded_method_summary(
        "aded", tmp_path, data_dir, "method.params.corpus_prompts=8", "method.params.corpus_max_new_tokens=32"
    )
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["alpha"] > 0
