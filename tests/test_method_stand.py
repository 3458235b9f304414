"""STAND: the n-gram memory of distributions, greedy = AR across several samples of one problem
(later samples draft from the earlier traces), the memory's scope, and a chi-square test that
sampling with memory drafts leaves the target's distribution unchanged."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.stand import NgramMemory

from helpers import chi_square_p_value, decode, exact_second_and_third, random_prompts, tiny_pair

STAND = dict(name="stand", impl="decodebench.methods.stand:StandDrafter")
pytestmark = pytest.mark.usefixtures("one_thread")


def stand(backbone, **params):
    drafter = build_method(MethodConfig(**STAND, params=params))
    drafter.setup(backbone)
    return drafter


def test_memory_stores_top_k_and_reads_the_longest_ngram():
    memory = NgramMemory(max_ngram=2, top_k=2)
    memory.add([7, 1, 2], torch.tensor([0.0, 0.1, 0.2, 0.7]))  # keys (2,) and (1, 2): tokens 3 .7, 2 .2
    memory.add([5, 2], torch.tensor([0.5, 0.0, 0.0, 0.5]))  # keys (2,) and (5, 2): tokens 0 .5, 3 .5
    q = memory.lookup([9, 1, 2], 4)  # (1, 2) matches: only the first distribution, renormalised
    assert torch.allclose(q, torch.tensor([0.0, 0.0, 0.2, 0.7]) / 0.9)
    q = memory.lookup([9, 9, 2], 4)  # only (2,) matches: the two distributions summed, renormalised
    assert torch.allclose(q, torch.tensor([0.5, 0.0, 0.2, 1.2]) / 1.9)
    assert memory.lookup([4], 4) is None


def test_greedy_equals_ar_and_later_samples_draft_from_earlier_traces():
    target, _ = tiny_pair()
    ar = build_method(MethodConfig())
    for params in ({}, {"branching": [2, 1, 1, 1]}):
        drafter = stand(target, **params)
        for prompt in random_prompts(2):
            reference = decode(target, ar, prompt, max_new_tokens=40).new_ids
            accepted = []
            for _ in range(3):  # three samples of the same problem
                out = decode(target, drafter, prompt, max_new_tokens=40)
                assert out.new_ids == reference
                accepted.append(sum(s.accepted for s in out.steps))
            # the first trace drafts only from itself; the next ones find the whole trace in memory
            assert accepted[1] > accepted[0] and accepted[1] >= 20, accepted
            assert out.method_stats["samples_of_problem"] == 3


def test_memory_scope():
    target, _ = tiny_pair()
    first, second = random_prompts(2)
    drafter = stand(target)
    decode(target, drafter, first, max_new_tokens=20)
    assert len(drafter.memory) > 0
    decode(target, drafter, second, max_new_tokens=20)  # another problem: the memory starts over
    assert drafter.request_stats()["samples_of_problem"] == 1
    per_request = stand(target, scope="request")
    decode(target, per_request, first, max_new_tokens=20)
    out = decode(target, per_request, first, max_new_tokens=20)
    assert out.method_stats["samples_of_problem"] == 1


def test_stand_sampling_preserves_target_distribution():
    """(t2, t3) over 400 samples of one problem vs the exact target distribution (25 cells); the
    memory of earlier samples drafts, so drafts are accepted and rejected."""
    target, _ = tiny_pair(vocab=5, noise=0.5, layers=1)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    vocab = target.config.vocab_size
    counts, accepted, drafted = torch.zeros(vocab * vocab), 0, 0
    drafter = stand(target, branching=[2, 1])
    for seed in range(400):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * vocab + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
        drafted += sum(s.drafted for s in out.steps)
    assert 100 < accepted < drafted, (accepted, drafted)
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


def test_config_and_errors():
    assert method_config("stand").resolved_params("cpu")["branching"] == [2, 1, 1]
    with pytest.raises(ConfigValueError, match="method.params.scope"):
        build_method(MethodConfig(**STAND, params=dict(scope="global")))
    with pytest.raises(ConfigValueError, match="method.params.branching"):
        build_method(MethodConfig(**STAND, params=dict(branching=[])))
