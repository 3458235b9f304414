"""LayerSkip-style self-speculation (early_exit_spec): greedy = AR token for token, the first E
layers' K/V are reused and leave the cache exactly as AR's, sampling keeps the target
distribution, and the embedded model stays lossless."""

from __future__ import annotations

import functools

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, compose_run_config
from decodebench.engine.backbone import BlockLayout, ForwardPlan
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.early_exit_spec import EarlyExitSpecDrafter

from helpers import (
    chi_square_p_value,
    damped_tiny,
    embedded_lossless,
    exact_second_and_third,
    random_prompts,
    sample_second_and_third,
)
from helpers import decode as helpers_decode

IMPL = "decodebench.methods.early_exit_spec:EarlyExitSpecDrafter"


prompts = random_prompts  # tests/helpers.py


# helpers.decode with the 40 new tokens this file's expectations were written for
decode = functools.partial(helpers_decode, max_new_tokens=40)


def drafter_for(backbone, **params) -> EarlyExitSpecDrafter:
    drafter = build_method(MethodConfig(name="early_exit_spec", impl=IMPL, params=params))
    drafter.setup(backbone)
    return drafter


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request):
    return damped_tiny(request.param)


@pytest.mark.parametrize(
    "params",
    [
        dict(exit_layer=2, num_draft_tokens=4),
        dict(exit_layer=1, num_draft_tokens=6),
        dict(exit_layer=4, num_draft_tokens=3, stop_below=0.3),
    ],
    ids=["E2", "E1", "E4-stop"],
)
def test_early_exit_greedy_equals_ar(backbone, params):
    ar = build_method(MethodConfig())
    drafter = drafter_for(backbone, **params)
    reused = 0
    original = drafter.verify_forward

    def counting(*args):
        nonlocal reused
        out = original(*args)
        reused += out is not None
        return out

    drafter.verify_forward = counting
    accepted = drafted = steps = 0
    for prompt in prompts(4):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == decode(backbone, ar, prompt).new_ids
        accepted += sum(s.accepted for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
        steps += len(ours.steps)
        assert all(s.drafted <= params["num_draft_tokens"] for s in ours.steps)
        if any(s.drafted for s in ours.steps):  # a static E: every round exits at the configured layer
            assert ours.method_stats == {
                "exit_layer": params["exit_layer"],
                "exit_layer_min": params["exit_layer"],
                "exit_layer_max": params["exit_layer"],
            }
    assert 10 < accepted < drafted, "drafts must be both accepted and rejected for the check to mean much"
    assert reused >= steps - 4, "verification must reuse the draft's first-E-layer K/V"


def test_reused_cache_equals_ar_cache(backbone):
    """After a generation every layer's cached K/V equal those AR leaves (the reused first-E-layer
    entries are exact, nothing stale survives a rejection)."""
    prompt = prompts(1)[0]
    ar_cache, ee_cache = backbone.new_cache(16), backbone.new_cache(16)
    reference = decode(backbone, build_method(MethodConfig()), prompt, cache=ar_cache)
    ours = decode(backbone, drafter_for(backbone, exit_layer=3, num_draft_tokens=5), prompt, cache=ee_cache)
    assert ours.new_ids == reference.new_ids
    assert sum(s.accepted for s in ours.steps) < sum(s.drafted for s in ours.steps)  # rejections happened
    # AR's cache holds prompt + all new tokens but the last; ours may hold more or fewer tokens
    # (the last step emits several), so compare the common prefix of every layer
    common = min(ar_cache.length, ee_cache.length)
    assert common >= len(prompt) + len(reference.new_ids) - 6
    for layer in range(backbone.num_layers):
        assert ee_cache.lengths[layer] == ee_cache.length
        torch.testing.assert_close(
            ee_cache.keys[layer][:, :, :common], ar_cache.keys[layer][:, :, :common], rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            ee_cache.values[layer][:, :, :common], ar_cache.values[layer][:, :, :common], rtol=1e-4, atol=1e-5
        )


def test_continuing_from_an_intermediate_layer_equals_the_full_forward(backbone):
    """Backbone.forward(input_hidden=...) over layers E.. reproduces the full forward's logits."""
    ids = prompts(1)[0]
    full = backbone.forward(ids, backbone.new_cache(16))
    cache = backbone.new_cache(16)
    early = backbone.forward(ids, cache, plan=ForwardPlan(layers=range(2)), output_hidden_states=True)
    late = backbone.forward(
        ids,
        cache,
        plan=ForwardPlan(layers=range(2, backbone.num_layers)),
        input_hidden=early.hidden_states[-1],
        layout=BlockLayout(start=0),
    )
    torch.testing.assert_close(late.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [len(ids)] * backbone.num_layers


def test_exit_layer_must_be_inside_the_model():
    with pytest.raises(ConfigValueError, match="exit_layer"):
        drafter_for(damped_tiny(layers=4), exit_layer=4)


def test_config_composes_with_presets():
    cfg = compose_run_config(["method=early_exit_spec", "model=tiny-llama"])
    assert build_method(cfg.method, "cpu").params.exit_layer == 15
    assert method_config("early_exit_spec").resolved_params("cuda") == dict(
        exit_layer=8, num_draft_tokens=6, stop_below=0.0
    )


# -- sampling: the target distribution is preserved -------------------------------------------


def test_early_exit_sampling_preserves_target_distribution():
    backbone = damped_tiny(layers=3, vocab=5, damped=slice(1, None), factor=0.5)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    drafter = drafter_for(backbone, exit_layer=1, num_draft_tokens=3)
    counts, accepted = sample_second_and_third(backbone, drafter, prompt, params, 400)
    assert 100 < accepted < 800  # both branches of the acceptance rule run
    assert chi_square_p_value(counts, exact_second_and_third(backbone, prompt, params)) > 1e-3


# -- the embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_early_exit_is_lossless():
    accepted, drafted = embedded_lossless("early_exit_spec")
    assert drafted > 0
