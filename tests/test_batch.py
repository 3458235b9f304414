"""Batched decoding (rows at their own cache lengths, right padding, per-row masks): batched AR equals
unbatched AR token for token on tiny models; batched logits equal unbatched ones. Batched
speculation (drafting methods) is tested in tests/test_batched_speculation.py."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig, ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.methods import build_method

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(arch: str, attn: str = "sdpa") -> Backbone:
    from decodebench.models.tiny import build_tiny

    return Backbone(
        build_tiny(
            ModelConfig(name=f"tiny-{arch}", source="tiny", architecture=arch, tiny=TINY, attn_implementation=attn),
            seed=0,
        )
    )


def prompts(lengths=(9, 4, 13, 7)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 101, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(
    scope="module",
    params=[("llama", "sdpa", None), ("qwen2", "sdpa", None), ("llama", "eager", None), ("qwen2", "sdpa", "tuned")],
    ids=["llama", "qwen2", "llama-eager", "qwen2-fused"],
)
def backbone(request):
    arch, attn, backend = request.param
    built = tiny(arch, attn)
    if backend is not None:  # the tuned backend's fused layers (engine/fused_layers.py) on per-row masks
        from decodebench.engine.backends import apply_backend

        info = apply_backend(built, backend, buckets=(1, 4, 8), model_name=None)
        assert info.layers == "fused"
    return built


def test_batched_prefill_logits_equal_unbatched(backbone):
    batch = prompts()
    width = max(map(len, batch))
    cache = backbone.new_cache(8, batch_size=len(batch))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in batch])
    batched = backbone.forward_batch(ids, cache, sizes=[len(p) for p in batch])
    assert batched.logits.shape == (len(batch), width, 101)
    for row, prompt in enumerate(batch):
        single = backbone.forward(prompt, backbone.new_cache(8))
        torch.testing.assert_close(batched.logits[row, : len(prompt)], single.logits, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(batched.logits[row]).all()


def test_batched_ar_equals_unbatched_ar(backbone):
    """Different prompt lengths (rows at their own lengths) and an EOS that stops rows at different steps."""
    ar = build_method(MethodConfig())
    batch = prompts()
    for eos in [(), (7, 11, 42)]:
        settings = DecodeSettings(max_new_tokens=30, eos_token_ids=eos)
        out = generate_batch(backbone, ar, batch, settings, backbone.new_cache(8, batch_size=len(batch)))
        for prompt, result in zip(batch, out.outputs):
            reference = generate(backbone, ar, prompt, settings, backbone.new_cache(8))
            assert result.new_ids == reference.new_ids
            assert result.stop_reason == reference.stop_reason
            assert len(result.steps) == len(result.new_ids) - 1
    assert out.wall_s >= out.prefill_s > 0


def test_batch_of_one_and_cache_reuse(backbone):
    ar = build_method(MethodConfig())
    settings = DecodeSettings(max_new_tokens=12)
    cache = backbone.new_cache(4, batch_size=2)
    first = generate_batch(backbone, ar, prompts((5, 9)), settings, cache)
    stop_row_0 = DecodeSettings(max_new_tokens=12, eos_token_ids=first.outputs[0].new_ids[2:3])
    generate_batch(backbone, ar, prompts((5, 9)), stop_row_0, cache)  # a row leaves the batch early
    second = generate_batch(backbone, ar, prompts((5, 9)), settings, cache)  # reset (both rows back), same cache
    assert [o.new_ids for o in first.outputs] == [o.new_ids for o in second.outputs]
    single = generate_batch(backbone, ar, prompts((6,)), settings, backbone.new_cache(4, batch_size=1))
    assert (
        single.outputs[0].new_ids == generate(backbone, ar, prompts((6,))[0], settings, backbone.new_cache(4)).new_ids
    )


def test_cache_rows_must_match(backbone):
    settings = DecodeSettings(max_new_tokens=4)
    with pytest.raises(ValueError, match="rows"):
        generate_batch(
            backbone, build_method(MethodConfig()), prompts((4, 5)), settings, backbone.new_cache(4, batch_size=3)
        )


@pytest.mark.embedded  # tiny-llama borrows the embedded model's tokenizer
def test_runner_batches_and_writes_one_record_per_sample(tmp_path, data_dir):
    """gen.batch_size=2 with a lossy method: one record per (sample, role), batch wall time shared,
    agreement with the batched AR baseline recorded; batched AR equals unbatched AR."""
    from decodebench.config import compose_run_config
    from decodebench.runners import local

    def run(name: str, *overrides: str):
        cfg = compose_run_config(
            [
                "model=tiny-llama",
                "warmup=1",
                "threads=1",
                "progress=false",
                "task.limit=3",
                "gen.max_new_tokens=8",
                f"data_dir={data_dir}",
                *overrides,
            ]
        )
        cfg.run_dir = str(tmp_path / name)
        return local.run(cfg)

    lossy = run("skip", "method=skipdecode", "method.preset=heavy", "gen.batch_size=2")
    methods = [r for r in lossy.records if r.role == "method"]
    baselines = [r for r in lossy.records if r.role == "baseline"]
    # 3 two-turn MT-Bench samples: chunk [81, 82] turn 0, then turn 1 (answers of turn 0), then [83]
    assert len(methods) == len(baselines) == 6 and not any(r.error for r in lossy.records)
    assert [(r.sample_id, r.turn, r.batch_size) for r in methods] == [
        ("81", 0, 2),
        ("82", 0, 2),
        ("81", 1, 2),
        ("82", 1, 2),
        ("83", 0, None),
        ("83", 1, None),
    ]
    assert all(r.token_match_rate is not None and 0.0 <= r.token_match_rate <= 1.0 for r in methods)
    assert all(r.lossless is None and r.method_stats["layer_fraction"] < 1.0 for r in methods)
    # the batch's shared step time is shared like its wall time: a row's verify time fits in its decode share
    assert all(r.verify_s <= r.wall_s - r.prefill_s + 1e-9 for r in methods if r.batch_size)
    assert 0.0 < lossy.summary["verify_share"] <= 1.0
    assert lossy.summary["token_match_rate"] is not None and lossy.summary["speedup"] > 0

    from decodebench.analysis.report import load_records, report_table

    table = report_table(load_records([lossy.run_dir]))
    overall = table[(table["method"] == "skipdecode[heavy]") & (table["group"] == "overall")]
    assert 0.0 <= overall["token_match_rate"].item() <= 1.0 and 0.0 <= overall["first_divergence"].item() <= 8

    batched_ar = run("ar2", "method=ar", "gen.batch_size=2")
    single_ar = run("ar1", "method=ar")
    by_key = lambda result: {(r.sample_id, r.turn): r.output_ids for r in result.records}  # noqa: E731
    assert by_key(batched_ar) == by_key(single_ar) and len(by_key(single_ar)) == 6
