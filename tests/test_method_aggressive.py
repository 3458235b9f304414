"""Input-guided Aggressive Decoding: alignment, copying and re-alignment on hand-worked steps, the
hand-made grammar task, and greedy output identical to AR."""

from __future__ import annotations

import pytest

from decodebench.config import MethodConfig
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.engine.verify import VerifyResult
from decodebench.methods import build_method

from helpers import decode, embedded_lossless, repeating_prompts

pytestmark = pytest.mark.usefixtures("one_thread")

AGGRESSIVE = dict(name="aggressive", impl="decodebench.methods.aggressive:AggressiveDrafter")


def aggressive(**params):
    return build_method(MethodConfig(**AGGRESSIVE, params=params))


def step(drafter, proposal: Proposal, accepted: int, bonus: int) -> None:
    """Tell the drafter its first ``accepted`` drafts and ``bonus`` were emitted."""
    result = VerifyResult(list(range(1, accepted + 1)), proposal.tokens[:accepted], bonus, len(proposal.tokens))
    drafter.feedback(StepOutcome(proposal, result, [], [], None, 0))


def test_copies_the_aligned_input_and_realigns_after_a_mismatch():
    prompt = [90, 10, 11, 12, 13, 14, 15, 16, 91]
    drafter = aggressive(align_ngram=2, max_draft_tokens=3)
    drafter.begin(prompt)
    assert drafter.propose(prompt + [10], 8).tokens == []  # one output token: nothing to align on yet
    context = prompt + [10, 11]  # "10 11" occurs in the input: copy what follows it
    proposal = drafter.propose(context, 8)
    assert proposal.tokens == [12, 13, 14]
    step(drafter, proposal, 3, 15)  # all accepted and the bonus copies too: stay aligned
    context += [12, 13, 14, 15]
    proposal = drafter.propose(context, 8)
    assert proposal.tokens == [16, 91]
    step(drafter, proposal, 0, 50)  # bifurcation: the output leaves the input
    context += [50]
    assert drafter.propose(context, 8).tokens == []  # "15 50" is nowhere in the input
    context += [12, 13]
    assert drafter.propose(context, 8).tokens == [14, 15, 16]  # re-aligned on "12 13"
    assert drafter.request_stats()["realignments"] == 2


def test_realignment_prefers_occurrences_after_the_last_alignment():
    prompt = [1, 2, 3, 7, 1, 2, 4]
    drafter = aggressive(align_ngram=2)
    drafter.begin(prompt)
    drafter.previous = 4  # the output last copied around position 4
    assert drafter.realign([1, 2]) == 6  # the later "1 2" (followed by 4), not the first one
    drafter.previous = 0
    assert drafter.realign([1, 2]) == 2


@pytest.fixture(scope="module")
def copying_prompts(backbone, ar_outputs):
    """Each test prompt followed by the model's own continuation of it: the tiny random models fall
    into loops, so what they write next largely repeats what the prompt now holds (outputs that copy
    their input, as in editing tasks)."""
    return [prompt + output for prompt, output in zip(repeating_prompts(), ar_outputs)]


@pytest.mark.parametrize("params", [{"align_ngram": 1}, {"align_ngram": 2, "max_draft_tokens": 4}])
def test_aggressive_greedy_equals_ar(backbone, copying_prompts, params):
    ar, drafter = build_method(MethodConfig()), aggressive(**params)
    drafter.setup(backbone)
    accepted = 0
    for prompt in copying_prompts:
        ours = decode(backbone, drafter, prompt, 32)
        assert ours.new_ids == decode(backbone, ar, prompt, 32).new_ids
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


def test_grammar_task_samples_and_scores():
    from decodebench.config import TaskConfig, group_config
    from decodebench.tasks import build_task

    task = build_task(TaskConfig(**group_config("task", "grammar")), data_dir=None, cache_dir="/tmp")
    samples = task.load_samples()
    assert len(samples) == 16 and samples[0].turns[0].endswith(
        "She go to the market every Saturday morning with her little brother."
    )
    target = samples[0].reference[0]
    assert task.score(samples[0], 0, f'  "{target}" ') == {"exact_match": 1.0, "contains_correction": 1.0}
    assert task.score(samples[0], 0, f"Here it is: {target}") == {"exact_match": 0.0, "contains_correction": 1.0}


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_aggressive_is_lossless():
    accepted, drafted = embedded_lossless("aggressive")
    assert accepted > 0
