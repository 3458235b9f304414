"""LADE (Jacobi lookahead + n-gram pool): the window, its mask and positions, the pool, state
policies, and greedy output identical to AR."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.methods import build_method
from decodebench.methods.lade import JacobiWindow, NGramPool, merge_into_tree

from helpers import decode, embedded_method_summary, repeating_prompts

LADE = dict(name="lade", impl="decodebench.methods.lade:LookaheadJacobiDrafter")


def lade(**params):
    return build_method(MethodConfig(**LADE, params=params))


# -- losslessness -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params",
    [{}, {"ngram_size": 3, "window_size": 3, "guess_set_size": 2, "pool_from_prompt": True, "state": "per_task"}],
)
def test_lade_greedy_equals_ar(backbone, params):
    ar, drafter = build_method(MethodConfig()), lade(**params)
    ar.setup(backbone)
    drafter.setup(backbone)
    accepted = 0
    for prompt in repeating_prompts(4):
        reference = decode(backbone, ar, prompt, max_new_tokens=40)
        ours = decode(backbone, drafter, prompt, max_new_tokens=40)
        assert ours.new_ids == reference.new_ids
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


# -- the window -------------------------------------------------------------------------------------
class FixedChoice:
    """Stands in for random.Random: ``choice`` returns the sequence's items in turn."""

    def __init__(self):
        self.calls = 0

    def choice(self, seq):
        self.calls += 1
        return seq[(self.calls - 1) % len(seq)]


def test_window_fills_one_level_per_step_then_emits_ngrams():
    window = JacobiWindow(ngram_size=4, window_size=3, seed_tokens=[10, 11, 12, 13], rng=FixedChoice())
    assert window.levels == [[10, 11, 12, 13]]  # W + N - 3 tokens drawn from the prompt
    assert window.advance(root=1, new_tokens=[20, 21, 22, 23]) == []
    assert window.levels == [[11, 12, 13], [20, 21, 22, 23]]
    assert window.advance(root=2, new_tokens=[30, 31, 32, 33]) == []
    assert window.levels == [[12, 13], [21, 22, 23], [31, 32, 33]]
    assert window.filled
    # filled: one n-gram per column: (level 0 / root, level 1, level 2, new token)
    ngrams = window.advance(root=3, new_tokens=[40, 41, 42])
    assert ngrams == [(3, [21, 31, 40]), (12, [22, 32, 41]), (13, [23, 33, 42])]
    assert window.levels == [[22, 23], [31, 32, 33], [40, 41, 42]]  # slides by one level


def test_lookahead_mask_and_positions_follow_lade():
    """N = 4, W = 3, filled: level 0 = [a, b] after the root r, levels 1 and 2 of 3 tokens.

    Column i is a chain at consecutive positions: r, level-0 tokens before column i, then the
    column's tokens on levels 1 .. k (LADE's ``j_make_causal_mask_multilevel``)."""
    window = JacobiWindow(ngram_size=4, window_size=3, seed_tokens=[0], rng=FixedChoice())
    window.levels = [[1, 2], [3, 4, 5], [6, 7, 8]]
    branch = window.branch()
    assert branch.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    assert branch.offsets == [1, 2, 1, 2, 3, 2, 3, 4]
    expected = [  # columns: r, 1, 2, 3, 4, 5, 6, 7, 8
        [1, 1, 0, 0, 0, 0, 0, 0, 0],  # 1: r 1
        [1, 1, 1, 0, 0, 0, 0, 0, 0],  # 2: r 1 2
        [1, 0, 0, 1, 0, 0, 0, 0, 0],  # 3 (level 1, column 0): r 3
        [1, 1, 0, 0, 1, 0, 0, 0, 0],  # 4 (column 1): r 1 4
        [1, 1, 1, 0, 0, 1, 0, 0, 0],  # 5 (column 2): r 1 2 5
        [1, 0, 0, 1, 0, 0, 1, 0, 0],  # 6 (level 2, column 0): r 3 6
        [1, 1, 0, 0, 1, 0, 0, 1, 0],  # 7: r 1 4 7
        [1, 1, 1, 0, 0, 1, 0, 0, 1],  # 8: r 1 2 5 8
    ]
    assert branch.mask.int().tolist() == expected
    assert branch.tokens[branch.top_rows] == [6, 7, 8]


def test_lookahead_logits_equal_a_plain_forward_of_each_column(backbone):
    """The top level's logits inside the shared forward equal the model run on the column's chain."""
    seen = []

    class Spy(type(lade())):
        def feedback(self, outcome):
            if self.window.filled:
                aux_logits = outcome.target.logits[len(outcome.block_tokens) :].clone()
                seen.append((list(self.context), self.branch, aux_logits))
            super().feedback(outcome)

        def propose(self, context, max_tokens):
            self.context = list(context)
            return super().propose(context, max_tokens)

    spy = Spy(type(lade()).Params(ngram_size=4, window_size=3))
    spy.setup(backbone)
    decode(backbone, spy, repeating_prompts()[0], max_new_tokens=12)
    context, branch, aux_logits = seen[1]
    tokens, mask = branch.tokens, branch.mask
    for row in range(branch.top_rows.start, branch.top_rows.stop):
        chain = [tokens[j - 1] for j in range(1, len(tokens) + 1) if mask[row, j]]
        with torch.inference_mode():
            expected = backbone.model(torch.tensor([context + chain])).logits[0, -1]
        torch.testing.assert_close(aux_logits[row], expected, atol=1e-4, rtol=0)


# -- the pool ---------------------------------------------------------------------------------------
def test_pool_keeps_the_most_recent_g_ngrams_per_first_token():
    pool = NGramPool(capacity=2)
    pool.add(1, [2, 3])
    pool.add(1, [4, 5])
    pool.add(1, [2, 3])  # re-added: most recent again
    pool.add(1, [6, 7])  # evicts the least recent, (4, 5)
    assert pool.guesses(1) == [(2, 3), (6, 7)]
    assert pool.guesses(9) == []
    pool.add_all([5, 6, 7, 8], n=3)
    assert pool.guesses(5) == [(6, 7)] and pool.guesses(6) == [(7, 8)] and len(pool) == 4


def test_guesses_merge_into_a_prefix_tree():
    tokens, parents = merge_into_tree([(2, 3, 4), (2, 3, 5), (6, 7, 8)], max_depth=3)
    assert tokens == [2, 3, 4, 5, 6, 7, 8] and parents == [-1, 0, 1, 1, -1, 4, 5]
    assert merge_into_tree([(2, 3, 4), (6, 7, 8)], max_depth=1) == ([2, 6], [-1, -1])


def test_pool_from_prompt_seeds_ngrams_and_guesses_start_with_the_last_token(backbone):
    drafter = lade(ngram_size=3, window_size=2, guess_set_size=3, pool_from_prompt=True)
    drafter.setup(backbone)
    prompt = [5, 6, 7, 5, 6, 8, 9]
    drafter.begin(prompt)
    assert drafter.pool.guesses(5) == [(6, 7), (6, 8)]
    drafter.window.levels = [[1], [2, 3]]  # pretend the window is filled
    proposal = drafter.propose(prompt + [5], max_tokens=10)
    assert proposal.tokens == [6, 7, 8] and proposal.parents == [-1, 0, 0]
    assert proposal.aux_tokens == [1, 2, 3] and proposal.aux_offsets == [1, 1, 2]
    assert proposal.aux_mask.shape == (3, 1 + 3 + 3) and not proposal.aux_mask[:, 1:4].any()


# -- state policies --------------------------------------------------------------------------------
def test_state_policies(backbone, tmp_path):
    prompt = repeating_prompts()[0]
    per_prompt = lade(ngram_size=3, window_size=3, state="per_prompt")
    per_prompt.setup(backbone)
    decode(backbone, per_prompt, prompt, max_new_tokens=12)
    assert len(per_prompt.pool) > 0
    per_prompt.begin([1, 2, 3])
    assert len(per_prompt.pool) == 0  # cleared at every prompt

    per_task = lade(ngram_size=3, window_size=3, state="per_task")
    per_task.setup(backbone)
    decode(backbone, per_task, prompt, max_new_tokens=12)
    learned = len(per_task.pool)
    per_task.begin([1, 2, 3])
    assert len(per_task.pool) == learned > 0  # kept across prompts
    per_task.reset_state()
    assert len(per_task.pool) == 0  # back to the state at setup

    saved = lade(ngram_size=3, window_size=3, state="persistent")
    saved.setup(backbone, str(tmp_path))
    decode(backbone, saved, prompt, max_new_tokens=12)
    saved.finish()
    loaded = lade(ngram_size=3, window_size=3, state="persistent")
    loaded.setup(backbone, str(tmp_path))
    assert loaded.pool.entries == saved.pool.entries


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_lade_is_lossless(tmp_path, data_dir):
    summary = embedded_method_summary("lade", tmp_path, data_dir)
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["alpha"] > 0
