"""DySpec: greedy = AR token for token on tiny draft/target pairs, the greedy tree is the optimal
top-budget set of paths, and under sampling the output keeps the target distribution (chi-square
on the 2nd and 3rd tokens) — while a tree whose siblings are kept by their own sampled value
(the classic mistake) is detected by the same test."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from decodebench.config import MethodConfig, ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.engine.sampling import SamplingParams, logits_to_probs
from decodebench.methods import build_method, method_config
from decodebench.methods.dyspec import DySpecDrafter
from decodebench.models.tiny import build_tiny

DYSPEC = "decodebench.methods.dyspec:DySpecDrafter"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are dispatch-bound: one thread is fastest (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pair(arch: str = "llama", vocab: int = 101, noise: float = 0.05, layers: int = 3) -> tuple[Backbone, Backbone]:
    """A tiny random target and a draft = the target with relative weight noise ``noise``."""
    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
    target = build_tiny(ModelConfig(name="target", source="tiny", architecture=arch, tiny=sizes), 0)
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in draft.parameters():
            if weight.numel() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * noise * weight.std())
    return Backbone(target), Backbone(draft)


def drafter_for(draft, target, cls=None, **params) -> DySpecDrafter:
    drafter = (cls or DySpecDrafter)(DySpecDrafter.Params(**params)) if cls else \
        build_method(MethodConfig(name="dyspec", impl=DYSPEC, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


def decode(target, drafter, prompt, max_new_tokens=40, sampling=SamplingParams(), seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    settings = DecodeSettings(max_new_tokens=max_new_tokens, sampling=sampling)
    return generate(target, drafter, prompt, settings, target.new_cache(16), generator)


def prompts(count: int, vocab: int = 101) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (12,), generator=generator).tolist() for _ in range(count)]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    return tiny_pair(request.param)


@pytest.mark.parametrize("params", [dict(token_budget=6, max_depth=4), dict(token_budget=16), dict(token_budget=1)],
                         ids=["cpu", "b16", "b1"])
def test_dyspec_greedy_equals_ar(pair, params):
    target, draft = pair
    ar = build_method(MethodConfig())
    accepted = 0
    for prompt in prompts(2):
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
    context = prompts(1)[0]
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
def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit (Wilson–Hilferty approximation of the p-value)."""
    keep = probs > 0
    expected = probs[keep] * counts.sum()
    statistic = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    z = ((statistic / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


@torch.inference_mode()
def exact_second_and_third(target: Backbone, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """Exact P(t2, t3) = Σ_t1 p(t1 | prompt) p(t2 | prompt, t1) p(t3 | prompt, t1, t2), flattened."""
    vocab = target.config.vocab_size
    first = logits_to_probs(target.model(torch.tensor([prompt])).logits[0, -1], params)
    logits = target.model(torch.tensor([prompt + [a, b] for a in range(vocab) for b in range(vocab)])).logits
    second = logits_to_probs(logits[:, -2], params).view(vocab, vocab, vocab)[:, 0]
    third = logits_to_probs(logits[:, -1], params).view(vocab, vocab, vocab)
    return (first[:, None, None] * second[:, :, None] * third).sum(0).reshape(-1)


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


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_p=0.9)],
                         ids=["t1", "t0.8-top_p0.9"])
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
