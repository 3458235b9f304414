"""FFN-SkipLLM: the first/last layers always run their FFN, attention always runs (every layer's
K/V written), a saturated FFN makes the next ones skipped, the warm-up tokens use the full model,
and a threshold that is never reached equals AR."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig, ModelConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.methods import build_method, method_config
from decodebench.methods.ffn_skip import FFNSkip, SaturationGate
from decodebench.models.tiny import build_tiny

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request):
    return Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture=request.param, tiny=TINY), 0))


def ffn_skip(backbone, **params):
    cfg = method_config("ffn_skip")
    method = build_method(MethodConfig(**{**cfg.__dict__, "params": {**cfg.params, **params}}))
    method.setup(backbone)
    return method


def prompt() -> list[int]:
    return torch.randint(3, 101, (10,), generator=torch.Generator().manual_seed(2)).tolist()


def test_gate_skips_after_saturation_and_keeps_cold_layers():
    gate = SaturationGate(8, FFNSkip.Params(threshold=0.9, skip_span=2, keep_first=2, keep_last=2))
    gate.start()
    x = torch.ones(1, 1, 4)
    decisions = []
    for layer in range(8):
        run = gate.run_mlp(layer, x)
        decisions.append(run)
        if run:
            gate.observe(layer, x, x * 1.01)  # cos = 1: saturated everywhere
    # layers 0,1 cold; layer 2 runs and saturates -> 3,4 skipped; 5 runs, saturates -> 6 would be
    # skipped but 6,7 are cold
    assert decisions == [True, True, True, False, False, True, True, True]
    assert gate.skipped == 2


def test_unreachable_threshold_equals_ar(backbone):
    method = ffn_skip(backbone, threshold=1.0, skip_span=1)
    ar = build_method(MethodConfig())
    settings = DecodeSettings(max_new_tokens=24)
    # cos similarity of a real FFN update is < 1, so nothing is skipped
    out = generate(backbone, method, prompt(), settings, backbone.new_cache(8))
    assert out.method_stats["ffn_skipped"] == 0.0
    assert out.new_ids == generate(backbone, ar, prompt(), settings, backbone.new_cache(8)).new_ids


def test_skipping_writes_every_layers_kv_and_respects_warmup(backbone):
    method = ffn_skip(backbone, threshold=-1.0, skip_span=100, keep_first=1, keep_last=1, warmup_tokens=3)
    cache = backbone.new_cache(8)
    out = generate(backbone, method, prompt(), DecodeSettings(max_new_tokens=16), cache)
    assert len(out.new_ids) == 16
    assert len(set(cache.lengths)) == 1  # attention ran in every layer: no K/V holes
    steps = len(out.steps)
    # after warm-up every step runs FFNs at layers 0, 1 (saturates) and 7: 5 of 8 skipped
    expected = (steps - 2) * 5 / (steps * 8)
    assert out.method_stats["ffn_skipped"] == pytest.approx(expected)


def test_batched_ffn_skip_runs(backbone):
    method = ffn_skip(backbone)
    batch = [prompt(), prompt()[:6]]
    out = generate_batch(backbone, method, batch, DecodeSettings(max_new_tokens=10),
                         backbone.new_cache(8, batch_size=2))
    assert [len(o.new_ids) for o in out.outputs] == [10, 10]


def test_config_is_lossy():
    cfg = compose_run_config(["method=ffn_skip"])
    assert cfg.method.lossless is False and cfg.method.resolved_params("cpu")["keep_first"] >= 1
