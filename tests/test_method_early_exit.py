"""LayerSkip-style self-speculation (early_exit_spec): greedy = AR token for token, the first E
layers' K/V are reused and leave the cache exactly as AR's, sampling keeps the target
distribution, and the embedded model stays lossless."""

from __future__ import annotations


import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, ModelConfig, compose_run_config
from decodebench.engine.backbone import Backbone, BlockLayout, ForwardPlan
from decodebench.engine.decode_loop import DecodeSettings, generate
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.early_exit_spec import EarlyExitSpecDrafter
from decodebench.models.tiny import build_tiny
from helpers import chi_square_p_value, exact_second_and_third

IMPL = "decodebench.methods.early_exit_spec:EarlyExitSpecDrafter"


def damped_tiny(arch: str = "llama", layers: int = 6, vocab: int = 101, keep: int = 2, factor: float = 0.1,
                seed: int = 0) -> Backbone:
    """A tiny random model whose layers from ``keep`` on barely change the residual stream, so an
    early exit often agrees with the full model (drafts are both accepted and rejected)."""
    sizes = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1)
    model = build_tiny(ModelConfig(name="tiny", source="tiny", architecture=arch, tiny=sizes), seed)
    with torch.no_grad():
        for layer in model.model.layers[keep:]:
            layer.self_attn.o_proj.weight.mul_(factor)
            layer.mlp.down_proj.weight.mul_(factor)
    return Backbone(model)


def prompts(count: int, vocab: int = 101, length: int = 12) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(3, vocab, (length,), generator=generator).tolist() for _ in range(count)]


def decode(backbone, drafter, prompt, max_new_tokens=40, sampling=SamplingParams(), seed=None, cache=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    settings = DecodeSettings(max_new_tokens=max_new_tokens, sampling=sampling)
    return generate(backbone, drafter, prompt, settings, cache or backbone.new_cache(16), generator)


def drafter_for(backbone, **params) -> EarlyExitSpecDrafter:
    drafter = build_method(MethodConfig(name="early_exit_spec", impl=IMPL, params=params))
    drafter.setup(backbone)
    return drafter


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request):
    return damped_tiny(request.param)


@pytest.mark.parametrize("params", [dict(exit_layer=2, num_draft_tokens=4), dict(exit_layer=1, num_draft_tokens=6),
                                    dict(exit_layer=4, num_draft_tokens=3, stop_below=0.3)],
                         ids=["E2", "E1", "E4-stop"])
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
            assert ours.method_stats == {"exit_layer": params["exit_layer"], "exit_layer_min": params["exit_layer"],
                                         "exit_layer_max": params["exit_layer"]}
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
        torch.testing.assert_close(ee_cache.keys[layer][:, :, :common], ar_cache.keys[layer][:, :, :common],
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ee_cache.values[layer][:, :, :common], ar_cache.values[layer][:, :, :common],
                                   rtol=1e-4, atol=1e-5)


def test_continuing_from_an_intermediate_layer_equals_the_full_forward(backbone):
    """Backbone.forward(input_hidden=...) over layers E.. reproduces the full forward's logits."""
    ids = prompts(1)[0]
    full = backbone.forward(ids, backbone.new_cache(16))
    cache = backbone.new_cache(16)
    early = backbone.forward(ids, cache, plan=ForwardPlan(layers=range(2)), output_hidden_states=True)
    late = backbone.forward(ids, cache, plan=ForwardPlan(layers=range(2, backbone.num_layers)),
                            input_hidden=early.hidden_states[-1], layout=BlockLayout(start=0))
    torch.testing.assert_close(late.logits, full.logits, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [len(ids)] * backbone.num_layers


def test_exit_layer_must_be_inside_the_model():
    with pytest.raises(ConfigValueError, match="exit_layer"):
        drafter_for(damped_tiny(layers=4), exit_layer=4)


def test_config_composes_with_presets():
    cfg = compose_run_config(["method=early_exit_spec", "model=tiny-llama"])
    assert build_method(cfg.method, "cpu").params.exit_layer == 15
    assert method_config("early_exit_spec").resolved_params("cuda") == dict(exit_layer=8, num_draft_tokens=6,
                                                                             stop_below=0.0)


# -- sampling: the target distribution is preserved -------------------------------------------




def test_early_exit_sampling_preserves_target_distribution():
    backbone = damped_tiny(layers=3, vocab=5, keep=1, factor=0.5)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    drafter = drafter_for(backbone, exit_layer=1, num_draft_tokens=3)
    counts, accepted = torch.zeros(25), 0
    for seed in range(400):
        out = decode(backbone, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * 5 + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
    assert 100 < accepted < 800  # both branches of the acceptance rule run
    assert chi_square_p_value(counts, exact_second_and_third(backbone, prompt, params)) > 1e-3


# -- the embedded model ---------------------------------------------------------------------------
EMBEDDED_PROMPTS = ["Explain in two sentences why the sky is blue.",
                    "Write a Python function that returns the n-th Fibonacci number."]


def embedded_lossless(method: str, **params) -> tuple[int, int]:
    """SmolLM2-135M (fp32, greedy), ``method`` with its cpu preset (+ ``params``) vs AR on two chat
    prompts, 48 new tokens each; returns (accepted, drafted)."""
    from decodebench.config import default_cache_dir
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip("smollm2-135m is not prepared (make setup)")
    loaded = load_model(cfg)
    backbone = Backbone(loaded.model)
    method_cfg = method_config(method)
    method_cfg.params.update(method_cfg.presets["cpu"], **params)
    method_cfg.preset = None
    drafter = build_method(method_cfg)
    drafter.setup(backbone)
    settings = DecodeSettings(max_new_tokens=48, eos_token_ids=[loaded.tokenizer.eos_token_id])
    accepted = drafted = 0
    for text in EMBEDDED_PROMPTS:
        prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], cfg.chat_template)
        reference = generate(backbone, build_method(MethodConfig()), prompt, settings, backbone.new_cache(256))
        ours = generate(backbone, drafter, prompt, settings, backbone.new_cache(256))
        assert ours.new_ids == reference.new_ids, text
        accepted += sum(s.accepted for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
    return accepted, drafted


@pytest.mark.embedded
def test_embedded_model_early_exit_is_lossless():
    accepted, drafted = embedded_lossless("early_exit_spec")
    assert drafted > 0
