"""DEL (dynamic exit layer): the tokens-per-layer choice, shadow-token acceptance estimates, greedy
= AR token for token on tiny models and the embedded model."""

from __future__ import annotations

import functools

import pytest

from decodebench.config import MethodConfig, compose_run_config
from decodebench.methods import build_method, method_config
from decodebench.methods.dynamic_exit import DynamicExitDrafter, best_exit, expected_tokens

from helpers import damped_tiny, embedded_lossless, random_prompts
from helpers import decode as helpers_decode

IMPL = "decodebench.methods.dynamic_exit:DynamicExitDrafter"


prompts = random_prompts  # tests/helpers.py


# helpers.decode with the 40 new tokens this file's expectations were written for
decode = functools.partial(helpers_decode, max_new_tokens=40)


def drafter_for(backbone, **params) -> DynamicExitDrafter:
    drafter = build_method(MethodConfig(name="del", impl=IMPL, params=params))
    drafter.setup(backbone)
    return drafter


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_tokens_per_layer_choice():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4.0
    # early layers that never agree: AR (no drafts) has the best tokens per layer
    assert best_exit({1: 0.0, 2: 0.05}, num_layers=8, max_drafts=5)[:2] == (0, 0)
    # a shallow layer that agrees almost always: draft from it, long chains
    layer, drafts, tpl = best_exit({2: 0.95, 6: 0.99}, num_layers=8, max_drafts=10)
    assert layer == 2 and drafts >= 5 and tpl > 1 / 8
    # deeper layers pay only when the shallow one is poor
    assert best_exit({1: 0.2, 4: 0.9}, num_layers=8, max_drafts=10)[0] == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "params", [dict(), dict(exit_layer_stride=2, max_shadow_rows=2, max_draft_tokens=4)], ids=["paper", "strided"]
)
def test_del_greedy_equals_ar(arch, params):
    backbone = damped_tiny(arch)
    ar = build_method(MethodConfig())
    drafter = drafter_for(backbone, **params)
    accepted = drafted = 0
    exits = []
    for prompt in prompts(4):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == decode(backbone, ar, prompt).new_ids
        accepted += sum(s.accepted for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
        stats = ours.method_stats  # the exit layers this request's drafting rounds chose
        assert 0.0 <= stats["draft_round_share"] <= 1.0 and stats["planned_drafts"] >= 0.0
        if "exit_layer" in stats:
            assert stats["exit_layer_min"] <= stats["exit_layer"] <= stats["exit_layer_max"]
            assert set(drafter.exit_layers) <= set(drafter.candidates)
            exits += drafter.exit_layers
    assert 10 < accepted <= drafted
    assert exits, "drafting rounds must report their exit layers"
    alphas = drafter.alphas()
    assert set(alphas) == set(drafter.candidates) and all(0.0 <= a <= 1.0 for a in alphas.values())
    # the damped model's layers from 2 on agree with the output far more than layer 1
    assert max(alphas[layer] for layer in alphas if layer >= 2) > alphas.get(1, 0.0)


def test_shadow_tokens_learn_without_drafting():
    """With no usable exit (prior says AR), rounds draft nothing; the loop's verify forward still
    yields hidden states, the estimates rise, and drafting starts."""
    backbone = damped_tiny()
    drafter = drafter_for(backbone, prior_tokens=1000.0)  # the prior l/L dominates at first
    drafter.params.prior_tokens = 4.0  # ... then observations take over
    drafter.matches[:] = 0.0
    drafter.counts[:] = 40.0  # as if 40 tokens never matched: α ≈ 0 everywhere, AR wins
    assert best_exit(drafter.alphas(), backbone.num_layers, 10)[1] == 0
    out = decode(backbone, drafter, prompts(1)[0], max_new_tokens=60)
    assert out.steps[0].drafted == 0
    assert sum(s.drafted for s in out.steps) > 0, "shadow tokens never raised the estimates"


def test_reset_state_forgets_estimates():
    backbone = damped_tiny()
    drafter = drafter_for(backbone)
    decode(backbone, drafter, prompts(1)[0])
    assert float(drafter.counts.sum()) > 0
    drafter.reset_state()
    assert float(drafter.counts.sum()) == 0


def test_config_composes_with_presets():
    cfg = compose_run_config(["method=del", "model=tiny-llama"])
    assert isinstance(build_method(cfg.method, "cpu"), DynamicExitDrafter)
    assert method_config("del").resolved_params("cpu")["exit_layer_stride"] == 5
    assert method_config("del").resolved_params("cuda")["exit_layer_stride"] == 1


# -- the embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_del_is_lossless():
    """Plain SmolLM2's early exits rarely agree with its output (DEL then decodes as AR): start from
    optimistic estimates so the first rounds draft from shallow exits and reuse their K/V, until
    the shadow tokens pull the estimates down."""

    def optimistic(drafter):
        drafter.counts[:] = 20.0
        drafter.matches[:] = 19.0

    accepted, drafted = embedded_lossless("del", prepare=optimistic, shadow_interval=1)
    assert drafted > 0
