"""SkipDecode: the layer budget decays linearly and never increases, the skipped layers are the
lower/middle ones (top layers always run), every layer that runs has the K/V of all earlier
positions, a full budget equals AR, and batched SkipDecode equals unbatched SkipDecode."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig, ModelConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.methods import build_method, method_config
from decodebench.methods.skipdecode import layer_budget, skipdecode_layers
from decodebench.models.tiny import build_tiny

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request):
    return Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture=request.param, tiny=TINY), 0))


def skipdecode(backbone, **params):
    cfg = method_config("skipdecode")
    method = build_method(MethodConfig(**{**cfg.__dict__, "params": {**cfg.params, **params}}))
    method.setup(backbone)
    return method


def prompts(lengths=(8, 5, 11)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(9)
    return [torch.randint(3, 101, (n,), generator=generator).tolist() for n in lengths]


def test_budget_is_linear_non_increasing_and_keeps_the_top_layers():
    budgets = [layer_budget(i, 30, 1.0, 0.5, 100, 1) for i in range(1, 150)]
    assert budgets[0] == 30 and budgets[-1] == 15 and budgets[98] == 15
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    previous = set(range(30))
    for budget in budgets:
        layers = skipdecode_layers(budget, 30, keep_bottom=1)
        assert len(layers) == budget and layers[0] == 0 and layers[-1] == 29
        assert set(layers) <= previous  # later tokens run a subset: no K/V is ever missing
        previous = set(layers)
    assert skipdecode_layers(10, 30, keep_bottom=2) == [0, 1, *range(22, 30)]
    assert layer_budget(500, 4, 0.1, 0.1, 10, 1) == 2  # never below keep_bottom + 1


def test_full_budget_equals_ar(backbone):
    full = skipdecode(backbone, max_layer_fraction=1.0, min_layer_fraction=1.0)
    ar = build_method(MethodConfig())
    settings = DecodeSettings(max_new_tokens=24)
    for prompt in prompts():
        assert generate(backbone, full, prompt, settings, backbone.new_cache(8)).new_ids == \
            generate(backbone, ar, prompt, settings, backbone.new_cache(8)).new_ids


def test_reduced_forward_runs_the_planned_layers_with_complete_kv(backbone, monkeypatch):
    method = skipdecode(backbone, max_layer_fraction=1.0, min_layer_fraction=0.5, decay_tokens=10)
    seen: list[tuple[list[int], list[int], int]] = []
    original = Backbone.forward

    def spying_forward(self, input_ids, cache, **kwargs):
        layers = kwargs.get("layers")
        run = list(range(self.num_layers)) if layers is None else list(layers)
        seen.append((run, [cache.lengths[i] for i in run], cache.length))
        return original(self, input_ids, cache, **kwargs)

    monkeypatch.setattr(Backbone, "forward", spying_forward)
    out = generate(backbone, method, prompts()[0], DecodeSettings(max_new_tokens=20), backbone.new_cache(8))
    assert len(out.new_ids) == 20 and all(s.drafted == 0 and s.emitted == 1 for s in out.steps)
    assert len(seen[-1][0]) == 3 and seen[-1][0] == [0, 4, 5]  # 6 layers at 0.5: layer 0 + top 2
    for _run, lengths, length in seen:
        assert all(n == length for n in lengths)  # every run layer holds all earlier positions
    assert 0.5 < out.method_stats["layer_fraction"] < 1.0


def test_batched_skipdecode_equals_unbatched(backbone):
    settings = DecodeSettings(max_new_tokens=20)
    batch = prompts()
    method = skipdecode(backbone, max_layer_fraction=0.9, min_layer_fraction=0.4, decay_tokens=16)
    out = generate_batch(backbone, method, batch, settings, backbone.new_cache(8, batch_size=len(batch)))
    for prompt, result in zip(batch, out.outputs):
        assert result.new_ids == generate(backbone, method, prompt, settings, backbone.new_cache(8)).new_ids


def test_config_is_lossy_with_presets():
    cfg = compose_run_config(["method=skipdecode", "method.preset=heavy", "gen.batch_size=4"])
    assert cfg.method.lossless is False and cfg.gen.batch_size == 4
    assert cfg.method.resolved_params("cpu")["min_layer_fraction"] == 0.4
    assert cfg.method.label("cpu") == "skipdecode[heavy]"
