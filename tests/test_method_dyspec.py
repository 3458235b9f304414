"""DySpec: greedy = AR token for token on tiny draft/target pairs, the greedy tree is the optimal
top-budget set of paths, and under sampling the output keeps the target distribution (chi-square
on the 2nd and 3rd tokens) — while a tree whose siblings are kept by their own sampled value
(the classic mistake) is detected by the same test."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.dyspec import DySpecDrafter

from helpers import chi_square_p_value, decode, exact_second_and_third, random_prompts, tiny_pair

DYSPEC = "decodebench.methods.dyspec:DySpecDrafter"
pytestmark = pytest.mark.usefixtures("one_thread")


def drafter_for(draft, target, cls=None, **params) -> DySpecDrafter:
    drafter = (
        (cls or DySpecDrafter)(DySpecDrafter.Params(**params))
        if cls
        else build_method(MethodConfig(name="dyspec", impl=DYSPEC, params=params))
    )
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


@pytest.mark.parametrize(
    "params", [dict(token_budget=6, max_depth=4), dict(token_budget=16), dict(token_budget=1)], ids=["cpu", "b16", "b1"]
)
def test_dyspec_greedy_equals_ar(pair, params):
    target, draft = pair
    ar = build_method(MethodConfig())
    accepted = 0
    for prompt in random_prompts(2):
        reference = decode(target, ar, prompt, max_new_tokens=32)
        out = decode(target, drafter_for(draft, target, **params), prompt, max_new_tokens=32)
        assert out.new_ids == reference.new_ids
        assert all(s.drafted <= params["token_budget"] for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    assert accepted > 10, "drafts were (almost) never accepted: the greedy check proves little"


@torch.inference_mode()
def test_greedy_tree_is_the_top_budget_set_of_paths():
    """Every drafted node is worth at least as much (product of draft probabilities) as any
    node that could have been added instead: the best child of each node not yet in the tree."""
    target, draft = tiny_pair(noise=0.3)
    context = random_prompts(1)[0]
    drafter = drafter_for(draft, target, token_budget=8)
    drafter.start_request(context, SamplingParams(), None)
    proposal = drafter.propose(context, 100)
    assert len(proposal.tokens) == 8 and len(set(zip(proposal.tokens, proposal.parents))) == 8
    paths, values = {-1: []}, {-1: 1.0}
    for node, (token, parent) in enumerate(zip(proposal.tokens, proposal.parents)):
        paths[node] = paths[parent] + [token]
        probs = torch.softmax(draft.model(torch.tensor([context + paths[parent]])).logits[0, -1], -1)
        values[node] = values[parent] * float(probs[token])
    worst_included = min(v for n, v in values.items() if n >= 0)
    for node in values:  # the best excluded child of every tree node (root included)
        probs = torch.softmax(draft.model(torch.tensor([context + paths[node]])).logits[0, -1], -1)
        taken = {t for t, p in zip(proposal.tokens, proposal.parents) if p == node}
        best_excluded = max(float(p) for t, p in enumerate(probs) if t not in taken)
        assert values[node] * best_excluded <= worst_included + 1e-6


def test_sampling_tree_draws_siblings_without_replacement():
    target, draft = tiny_pair(vocab=8, noise=0.5)
    drafter = drafter_for(draft, target, token_budget=12)
    drafter.start_request([1, 2, 3], SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    proposal = drafter.propose([1, 2, 3], 3)
    assert proposal.probs.shape == (len(proposal.tokens), 8)
    torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(len(proposal.tokens)))
    siblings: dict[int, list[int]] = {}
    for node, (token, parent) in enumerate(zip(proposal.tokens, proposal.parents)):
        earlier = siblings.setdefault(parent, [])
        assert token not in earlier
        assert float(proposal.probs[node, token]) > 0 and all(float(proposal.probs[node, t]) == 0 for t in earlier)
        earlier.append(token)
    assert max(len(s) for s in siblings.values()) >= 2  # a real tree, not a chain


def test_cpu_preset_is_small():
    assert method_config("dyspec").resolved_params("cpu") == {"token_budget": 6, "max_depth": 4}
    assert method_config("dyspec").resolved_params("cuda")["token_budget"] == 64


# --- sampling: the target distribution is preserved -------------------------------------------
def second_and_third_p_value(target, drafter, params: SamplingParams, runs: int) -> tuple[float, int, int]:
    """p-value of (t2, t3) over ``runs`` seeded 4-token generations (t2.. come from speculative
    steps: trees of depth <= 2), with the numbers of drafted and accepted tokens."""
    vocab, prompt = target.config.vocab_size, [1, 4, 2, 3]
    counts, drafted, accepted = torch.zeros(vocab * vocab), 0, 0
    for seed in range(runs):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * vocab + out.new_ids[2]] += 1
        drafted += sum(s.drafted for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    return chi_square_p_value(counts, exact_second_and_third(target, prompt, params)), drafted, accepted


class ProbableSiblingsDySpec(DySpecDrafter):
    """A classic mistake, for the power check: a sampled sibling is kept only if its OWN draft
    probability is at least ``0.2`` (improbable samples are re-drawn), so whether a token joins
    the tree depends on its own value. (Subtler forms of the same mistake, such as keying a
    sibling by its own sampled probability, bias the output too little for a few hundred seeds to see.)"""

    def _draw_child(self, expansion):
        remaining = expansion.probs.clone()
        remaining[expansion.drawn] = 0.0
        if self.sampling.greedy or float(remaining.max()) < 0.2:
            return super()._draw_child(expansion)
        while True:
            saved = (list(expansion.drawn), expansion.drawn_mass, expansion.drawn_square_mass)
            token, probability, row = super()._draw_child(expansion)
            if probability >= 0.2:
                return token, probability, row
            expansion.drawn, expansion.drawn_mass, expansion.drawn_square_mass = saved


@pytest.mark.parametrize(
    "params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)], ids=["t1", "t0.8-top_p0.9"]
)
def test_dyspec_sampling_preserves_target_distribution(params):
    target, draft = tiny_pair(vocab=5, noise=0.5, layers=1)
    drafter = drafter_for(draft, target, token_budget=4)
    p_value, drafted, accepted = second_and_third_p_value(target, drafter, params, runs=400)
    assert drafted > 3 * 400 and accepted > 150  # multi-draft trees, accepted and rejected nodes
    assert p_value > 1e-3


def test_siblings_kept_by_their_own_value_break_the_distribution():
    """The same chi-square test has the power to see a sibling-selection bias."""
    target, draft = tiny_pair(vocab=5, noise=0.5, layers=1)
    drafter = drafter_for(draft, target, cls=ProbableSiblingsDySpec, token_budget=4)
    p_value, _, _ = second_and_third_p_value(target, drafter, SamplingParams(temperature=1.0), runs=300)
    assert p_value < 1e-3
