"""ADED: the tri-gram matrix (top-12, reinforcement), the MCTS and tree building, the cached corpus
step, state policies, and greedy output identical to AR."""

from __future__ import annotations

import json
import random

import pytest

from decodebench.config import MethodConfig
from decodebench.methods import aded as aded_module
from decodebench.methods import build_method
from decodebench.methods.aded_search import MctsConfig, TrigramMatrix, cut_to_choices, mcts_paths, paths_to_tree

from helpers import decode, embedded_method_summary, repeating_prompts, tiny_backbone

ADED = dict(name="aded", impl="decodebench.methods.aded:AdedDrafter")


def aded(**params):
    return build_method(MethodConfig(**ADED, params={"corpus_files": [], **params}))


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


# -- the corpus (a cached step) ---------------------------------------------------------------------
class CharTokenizer:
    """A stand-in tokenizer: one id per character (no chat template)."""

    eos_token_id = None
    chat_template = None

    def encode(self, text):
        return [3 + ord(c) % 90 for c in text]


def test_corpus_excludes_benchmark_rows_and_is_cached(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "corpus").mkdir(parents=True)
    (data / "bench").mkdir()
    (data / "corpus" / "q.jsonl").write_text(
        "".join(json.dumps({"question": q}) + "\n" for q in ["in the benchmark", "keep me", "keep me too", "x"])
    )
    (data / "bench" / "question.jsonl").write_text(json.dumps({"turns": ["Q: in the benchmark"]}) + "\n")
    monkeypatch.setenv("DECODEBENCH_DATA", str(data))
    params = dict(
        corpus_files=["corpus/q.jsonl:question"],
        corpus_per_file=2,
        corpus_exclude=["bench/question.jsonl"],
        corpus_max_new_tokens=6,
    )
    backbone = tiny_backbone("llama")
    drafter = build_method(MethodConfig(**ADED, params=params))
    monkeypatch.setattr(type(drafter), "_tokenizer", lambda self, backbone: CharTokenizer())
    real = aded_module.generate_answers

    def interrupted(bb, tok, texts, n):  # the build dies after its first answer ...
        if texts == ["keep me too"]:
            raise KeyboardInterrupt
        return real(bb, tok, texts, n)

    monkeypatch.setattr(aded_module, "generate_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        drafter.setup(backbone, str(tmp_path / "cache"))
    seen_texts = []  # ... and the next setup generates only the missing answer
    monkeypatch.setattr(
        aded_module, "generate_answers", lambda bb, tok, texts, n: seen_texts.extend(texts) or real(bb, tok, texts, n)
    )
    drafter.setup(backbone, str(tmp_path / "cache"))
    assert seen_texts == ["keep me too"]
    assert len(list((tmp_path / "cache" / "state").glob("aded-corpus-*.pt"))) == 1
    assert len(drafter.corpus_matrix) > 0

    def fail(*args):
        raise AssertionError("the cached corpus was regenerated")

    monkeypatch.setattr(aded_module, "generate_answers", fail)
    again = build_method(MethodConfig(**ADED, params=params))
    again.setup(backbone, str(tmp_path / "cache"))
    assert again.corpus_matrix.rows == drafter.corpus_matrix.rows


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
        "aded", tmp_path, data_dir, "method.params.corpus_per_file=8", "method.params.corpus_max_new_tokens=32"
    )
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["alpha"] > 0
