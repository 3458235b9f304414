"""Verifiers: greedy longest path, and distribution-preserving speculative sampling."""

from __future__ import annotations

import pytest
import torch

from decodebench.engine.sampling import SamplingParams, logits_to_probs
from decodebench.engine.verify import verify_greedy, verify_sampling

from helpers import chi_square_p_value


def one_hot_logits(rows: list[int], vocab: int = 10) -> torch.Tensor:
    logits = torch.zeros(len(rows), vocab)
    for i, token in enumerate(rows):
        logits[i, token] = 5.0
    return logits


def test_greedy_chain_accepts_prefix_and_bonus():
    tokens = [0, 3, 4, 9]  # root + drafts 3, 4, 9
    logits = one_hot_logits([3, 4, 5, 1])  # target wants 3, 4, then 5 (draft said 9)
    result = verify_greedy(tokens, [-1, 0, 1, 2], logits)
    assert result.accepted_tokens == [3, 4]
    assert result.accepted_nodes == [1, 2]
    assert result.bonus_token == 5
    assert result.emitted_tokens == [3, 4, 5]
    assert result.drafted == 3


def test_greedy_tree_follows_matching_branch():
    #        node: 0  1  2  3  4
    tokens = [0, 7, 3, 4, 8]
    parents = [-1, 0, 0, 2, 2]
    logits = one_hot_logits([3, 1, 8, 1, 6])  # root wants 3 (node 2), node 2 wants 8 (node 4)
    result = verify_greedy(tokens, parents, logits)
    assert result.accepted_nodes == [2, 4]
    assert result.bonus_token == 6


def test_greedy_empty_proposal_is_ar():
    result = verify_greedy([4], [-1], one_hot_logits([2]))
    assert result.accepted_tokens == [] and result.bonus_token == 2 and result.drafted == 0


def test_top_p_and_top_k_filtering():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=1))
    assert probs.tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["sampled-draft", "deterministic-draft"])
@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_speculative_sampling_preserves_target_distribution(with_draft_probs, shape):
    """The first emitted token (an accepted draft or the bonus) is distributed exactly as the
    target's p(·|root), whatever the draft and its distribution."""
    vocab = 6
    gen = torch.Generator().manual_seed(0)
    target_logits = torch.randn(4, vocab, generator=gen)
    draft_logits = torch.randn(4, vocab, generator=gen)
    params = SamplingParams(temperature=1.0)
    p = logits_to_probs(target_logits, params)
    q = logits_to_probs(draft_logits, params)
    if shape == "chain":
        parents = [-1, 0, 1]  # root -> a -> b
    else:
        parents = [-1, 0, 0, 1]  # root -> {a, c}, a -> b

    trials = 20000
    first_counts = torch.zeros(vocab)
    for _ in range(trials):
        # draw the draft tokens from q (rows: node i's distribution = q[parent row])
        tokens = [0]
        draft_probs = torch.zeros(len(parents), vocab)
        for node in range(1, len(parents)):
            draft_probs[node] = q[parents[node]]
            if with_draft_probs:
                tokens.append(int(torch.multinomial(draft_probs[node], 1, generator=gen)))
            else:
                tokens.append([2, 4, 1][node - 1])  # fixed guesses, as a lookup drafter makes
        # target rows: node i predicts from p[i] (distinct contexts give distinct rows)
        result = verify_sampling(
            tokens,
            parents,
            target_logits[: len(parents)],
            params,
            gen,
            draft_probs if with_draft_probs else None,
        )
        first_counts[result.emitted_tokens[0]] += 1
    assert chi_square_p_value(first_counts, p[0]) > 1e-3


def test_sampling_rejects_everything_when_target_excludes_draft():
    logits = torch.tensor([[0.0, -float("inf"), 0.0], [0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        result = verify_sampling([0, 1], [-1, 0], logits, SamplingParams(temperature=1.0), gen)
        assert result.accepted_tokens == [] and result.bonus_token in (0, 2)
