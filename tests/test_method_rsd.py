"""RSD: greedy = AR token for token on tiny draft/target pairs, siblings drawn without replacement
with the right recorded distributions, Gumbel-top-k draws distributed as sequential draws without
replacement, and under sampling the output keeps the target distribution (chi-square on the 2nd and
3rd tokens)."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.rsd import gumbel_top_k

from helpers import chi_square_p_value, decode, exact_second_and_third, random_prompts, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")


def rsd(draft, target, **params):
    drafter = build_method(MethodConfig(name="rsd", impl="decodebench.methods.rsd:RsdDrafter", params=params))
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


@pytest.mark.parametrize("branching", [[3, 2, 2, 1], [2, 1, 1], [1]])
def test_rsd_greedy_equals_ar(pair, branching):
    target, draft = pair
    ar = build_method(MethodConfig())
    accepted = 0
    for prompt in random_prompts(2):
        reference = decode(target, ar, prompt, max_new_tokens=32)
        drafter = rsd(draft, target, branching=branching)
        out = decode(target, drafter, prompt, max_new_tokens=32)
        assert out.new_ids == reference.new_ids
        assert all(s.drafted <= drafter.tree_size for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    assert accepted > 0


def test_siblings_are_distinct_with_without_replacement_distributions():
    target, draft = tiny_pair(vocab=8, noise=0.5, layers=1)
    drafter = rsd(draft, target, branching=[3, 2])
    drafter.start_request([1, 2, 3], SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    proposal = drafter.propose([1, 2, 3], 5)
    assert proposal.parents == [-1, -1, -1, 0, 0, 1, 1, 2, 2]  # constant branching: 3, then 2 each
    siblings: dict[int, list[int]] = {}
    for node, (token, parent) in enumerate(zip(proposal.tokens, proposal.parents)):
        earlier = siblings.setdefault(parent, [])
        assert token not in earlier
        assert float(proposal.probs[node, token]) > 0 and all(float(proposal.probs[node, t]) == 0 for t in earlier)
        earlier.append(token)
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(len(proposal.tokens)))


def test_gumbel_top_k_draws_like_sequential_sampling_without_replacement():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(4000):
        first, second = gumbel_top_k(probs, 2, generator)
        counts[first, second] += 1
    # P(a, b) = p_a * p_b / (1 - p_a)
    exact = torch.tensor(
        [[0.0 if a == b else float(probs[a] * probs[b] / (1 - probs[a])) for b in range(4)] for a in range(4)]
    )
    assert chi_square_p_value(counts.reshape(-1), exact.reshape(-1)) > 1e-3
    assert gumbel_top_k(torch.tensor([0.0, 1.0, 0.0]), 3, generator) == [1]  # never a zero-probability token


def test_cpu_preset():
    assert method_config("rsd").resolved_params("cpu")["branching"] == [2, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)], ids=["t1", "t0.8-top_p0.9"]
)
def test_rsd_sampling_preserves_target_distribution(params):
    target, draft = tiny_pair(vocab=5, noise=0.5, layers=1)
    drafter = rsd(draft, target, branching=[2, 2])
    vocab, prompt, runs = 5, [1, 4, 2, 3], 400
    counts, drafted, accepted = torch.zeros(vocab * vocab), 0, 0
    for seed in range(runs):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * vocab + out.new_ids[2]] += 1
        drafted += sum(s.drafted for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    assert drafted > 3 * runs and accepted > 150  # multi-draft trees, accepted and rejected nodes
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3
