"""Every family of engine/architectures.py runs exactly in the engine's own layer loop (fp32).

One tiny random config per family (2 layers, hidden 64, large init so a wrong piece shows), seeded;
the same checks tests/test_engine.py makes for Llama: prefill logits vs the HF model's own forward,
cached steps, a tree block vs each branch as a chain, crop and compact; sliding windows short
enough that the probes cross them; plus the residual halves that sublayer skipping runs, and the
load-time self-check catching a broken layer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decodebench.engine.architectures import (
    FAMILIES,
    UnsupportedArchitectureError,
    attention_implementation_for,
    family_of,
    supported_families,
)
from decodebench.engine.backbone import Backbone, BlockLayout, ForwardPlan, MlpGate
from decodebench.engine.self_check import SelfCheckError, self_check
from decodebench.engine.tree import ancestor_mask

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
WINDOW = 8  # sliding window of the tiny configs that have one: the 30-token probes cross it
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]
# model_type -> overrides of TINY (the family's own knobs set so that they matter)
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=WINDOW),
    "mixtral": dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        layer_types=SLIDING_THEN_FULL,
    ),
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1),
    "gemma": dict(head_dim=16),
    "gemma2": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=SLIDING_THEN_FULL,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
    ),
    "gemma3_text": dict(
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=SLIDING_THEN_FULL,
        final_logit_softcapping=3.0,
        rope_local_base_freq=100.0,
    ),
    "phi3": dict(sliding_window=WINDOW, partial_rotary_factor=0.5, pad_token_id=0),
    "phi": dict(partial_rotary_factor=0.5),
    "glm": dict(head_dim=16, partial_rotary_factor=0.5, pad_token_id=0),
    "smollm3": dict(pad_token_id=0, no_rope_layers=[1, 0]),
    "olmo": dict(clip_qkv=2.0, pad_token_id=0),
    "olmo2": dict(pad_token_id=0),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=2.5, attention_multiplier=0.3),
    "starcoder2": dict(sliding_window=WINDOW, use_bias=True),
    "stablelm": dict(partial_rotary_factor=0.5, use_qkv_bias=True),
    "exaone4": dict(sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL),
    "gpt_oss": dict(
        head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL, num_local_experts=4, num_experts_per_tok=2
    ),
    "gpt_neox": dict(rotary_pct=0.5),
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, alibi=False),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=24,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        rope_interleave=False,
    ),
    "cohere": dict(logit_scale=0.25, use_qk_norm=False),
}
ATOL = 1e-4


def tiny_family_model(model_type: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**TINY, **FAMILY_CONFIGS[model_type], **overrides}
    if "layer_types" in kwargs:  # the sliding / full pattern repeated over the layers
        pattern = kwargs["layer_types"]
        kwargs["layer_types"] = [pattern[i % len(pattern)] for i in range(kwargs["num_hidden_layers"])]
    if model_type == "smollm3":  # RoPE on every other layer
        kwargs["no_rope_layers"] = [(i + 1) % 2 for i in range(kwargs["num_hidden_layers"])]
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = attention_implementation_for(model_type, "sdpa")
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_every_family_is_tested():
    assert set(FAMILY_CONFIGS) == set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def family_model(request):
    return tiny_family_model(request.param)


def test_prefill_and_cached_steps_equal_hf(family_model):
    ids = random_ids(30, 2)
    reference = hf_logits(family_model, ids)
    backbone = Backbone(family_model)
    cache = backbone.new_cache(8)  # too small on purpose: the cache must grow
    out = backbone.forward(ids[:10], cache)
    torch.testing.assert_close(out.logits, reference[:10], atol=ATOL, rtol=0)
    for i in range(10, 13):  # single steps, a chain, then the rest (past the sliding window)
        out = backbone.forward([ids[i]], cache)
        torch.testing.assert_close(out.logits[0], reference[i], atol=ATOL, rtol=0)
    out = backbone.forward(ids[13:18], cache)
    torch.testing.assert_close(out.logits, reference[13:18], atol=ATOL, rtol=0)
    out = backbone.forward(ids[18:], cache, logits_rows=slice(-1, None))
    torch.testing.assert_close(out.logits[0], reference[-1], atol=ATOL, rtol=0)


def test_tree_block_equals_each_branch_as_a_chain(family_model):
    prefix = random_ids(12, 3)
    tokens = [5, 17, 23, 42, 8, 61, 33]
    parents = [-1, 0, 0, 1, 1, 2, 5]
    backbone = Backbone(family_model)
    cache = backbone.new_cache(64)
    backbone.forward(prefix, cache)
    tree = backbone.forward(tokens, cache, layout=BlockLayout(parents=parents))
    mask = ancestor_mask(parents)
    for node in range(len(tokens)):
        path = [tokens[j] for j in range(node + 1) if mask[node, j]]
        torch.testing.assert_close(tree.logits[node], hf_logits(family_model, prefix + path)[-1], atol=ATOL, rtol=0)


def test_crop_and_compact_then_continue(family_model):
    prefix = random_ids(6, 4)
    tokens = [5, 17, 23, 42, 8, 61, 33]
    backbone = Backbone(family_model)
    cache = backbone.new_cache(64)
    backbone.forward(prefix, cache)
    base = cache.length
    backbone.forward(tokens, cache, layout=BlockLayout(parents=[-1, 0, 0, 1, 1, 2, 5]))
    cache.compact(base, [0, 2, 5])  # path 5 -> 23 -> 61
    out = backbone.forward([77], cache)
    torch.testing.assert_close(out.logits[0], hf_logits(family_model, prefix + [5, 23, 61, 77])[-1], atol=ATOL, rtol=0)
    cache.crop(base + 1)
    out = backbone.forward([50, 51], cache)
    torch.testing.assert_close(out.logits, hf_logits(family_model, prefix + [5, 50, 51])[-2:], atol=ATOL, rtol=0)


def test_batch_rows_at_their_own_lengths_equal_each_sequence(family_model):
    """Batched decoding (batched speculation, SkipDecode, batched AR): a right-padded prefill with each
    row at its own length, then cached steps past the sliding window, equal each sequence run alone
    through the HF model."""
    backbone = Backbone(family_model)
    batch = [random_ids(14, 7), random_ids(9, 8)]
    steps = [random_ids(6, 9), random_ids(6, 10)]
    width = max(map(len, batch))
    cache = backbone.new_cache(8, batch_size=len(batch))
    sizes = [len(p) for p in batch]
    out = backbone.forward_batch(
        torch.tensor([p + [0] * (width - len(p)) for p in batch]), cache, sizes=sizes, last_logits_only=True
    )
    cache.commit_rows([0, 0], [range(n) for n in sizes])
    logits = [out.logits[:, -1]]
    for step in range(6):
        logits.append(backbone.forward_batch(torch.tensor([[s[step]] for s in steps]), cache).logits[:, -1])
    for row, prompt in enumerate(batch):
        reference = hf_logits(family_model, prompt + steps[row])[len(prompt) - 1 :]
        torch.testing.assert_close(torch.stack([step[row] for step in logits]), reference, atol=ATOL, rtol=0)


def test_residual_halves_or_clear_refusal(family_model):
    """Where a family has residual halves, running both equals the layer (what SWIFT and FFN-SkipLLM
    rely on); where it has none, sublayer skipping is refused by name."""
    backbone = Backbone(family_model)
    ids = random_ids(9, 5)
    if backbone.halves is None:
        with pytest.raises(UnsupportedArchitectureError, match="parallel"):
            backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(skip_mlp={1}))
        return
    whole = backbone.forward(ids, backbone.new_cache(16))
    # a gate that always runs the MLP sends every layer through its two halves
    halves = backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(mlp_gate=MlpGate()))
    torch.testing.assert_close(halves.logits, whole.logits, atol=ATOL, rtol=0)
    # and skipping a sublayer changes the result (the halves are really the layer's)
    skipped = backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(skip_mlp={1}))
    assert (skipped.logits - whole.logits).abs().max() > 1e-3


def test_early_exit_continuation_equals_full_forward(family_model):
    """Layers 0..E-1 then E.. from their hidden state (early-exit verification) = the full forward."""
    backbone = Backbone(family_model)
    ids = random_ids(11, 6)
    cache = backbone.new_cache(32)
    early = backbone.forward(ids, cache, plan=ForwardPlan(layers=[0]), output_hidden_states=True)
    late = backbone.forward(
        ids, cache, plan=ForwardPlan(layers=[1]), input_hidden=early.hidden_states[-1], layout=BlockLayout(start=0)
    )
    torch.testing.assert_close(late.logits, hf_logits(family_model, ids), atol=ATOL, rtol=0)


def test_self_check_passes(family_model):
    result = self_check(Backbone(family_model))
    assert result.max_abs_diff <= result.tolerance


def test_needs_eager_families_load_eager():
    assert attention_implementation_for("gemma2", "sdpa") == "eager"
    assert attention_implementation_for("gpt_oss", "sdpa") == "eager"
    assert attention_implementation_for("llama", "sdpa") == "sdpa"


def test_unsupported_family_is_refused_with_the_list():
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported.*Supported: .*llama"):
        Backbone(model)


def test_multimodal_gemma3_is_refused_by_name():
    with pytest.raises(UnsupportedArchitectureError, match="multimodal Gemma 3.*gemma3_text"):
        family_of(AutoConfig.for_model("gemma3"))


def test_falcon_with_alibi_is_refused():
    model = tiny_family_model("falcon", alibi=True)
    with pytest.raises(UnsupportedArchitectureError, match="ALiBi"):
        Backbone(model)


def test_self_check_catches_a_broken_layer(monkeypatch):
    """A layer that computes something else than the HF model's layer stops the run, naming the
    architecture and the difference."""
    backbone = Backbone(tiny_family_model("llama"))
    _break_layer_one(monkeypatch)
    with pytest.raises(SelfCheckError, match=r"'llama'.*max \|logit diff\|"):
        self_check(backbone)
    assert SelfCheckError.exit_code == 2


def test_supported_families_listed():
    assert {"llama", "qwen3_moe", "gemma3_text", "deepseek_v3", "cohere"} <= set(supported_families())


class PastKeyValuesLayer(torch.nn.Module):
    """A decoder layer as transformers < 5.25 declares it: the cache argument is ``past_key_values``."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        return self.layer(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )


def test_cache_argument_follows_the_layer_signature():
    """transformers 5.25 renamed the layers' ``past_key_values`` to ``cache`` (the old name is removed
    in 5.40): the engine passes whichever the layer declares, and never the deprecated one."""
    model = tiny_family_model("llama")
    ids = random_ids(12, 11)
    reference = hf_logits(model, ids)
    backbone = Backbone(model)
    assert backbone.parts.cache_keyword == "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = backbone.forward(ids, backbone.new_cache(16))
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    torch.testing.assert_close(out.logits, reference, atol=ATOL, rtol=0)

    model.model.layers = torch.nn.ModuleList(PastKeyValuesLayer(layer) for layer in model.model.layers)
    old = Backbone(model)
    assert old.parts.cache_keyword == "past_key_values"
    cache = old.new_cache(16)
    torch.testing.assert_close(old.forward(ids[:8], cache).logits, reference[:8], atol=ATOL, rtol=0)
    torch.testing.assert_close(old.forward(ids[8:], cache).logits, reference[8:], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family, method", [("cohere", "swift"), ("phi", "ffn_skip"), ("gpt_neox", "swift"), ("olmo2", "kangaroo")]
)
def test_layer_skipping_methods_refuse_what_an_architecture_cannot_skip(family, method, tmp_path):
    from decodebench.methods import build_method, method_config

    backbone = Backbone(tiny_family_model(family, num_hidden_layers=4))
    drafter = build_method(method_config(method))
    with pytest.raises(UnsupportedArchitectureError, match=f"'{method}'.*'{family}'"):
        drafter.setup(backbone, str(tmp_path))


@pytest.mark.parametrize(
    "family, method, params",
    [
        ("deepseek_v3", "early_exit_spec", {"exit_layer": 2}),
        ("gpt_oss", "del", {}),
        ("gemma3_text", "swift", {}),
        ("granite", "swift", {}),
    ],
)
def test_layer_skipping_on_other_architectures_drafts_and_stays_lossless(family, method, params, tmp_path):
    """Whole-layer skipping (early exits reusing the first layers' K/V) works on every family, MLA's
    latent cache and sliding windows included; sublayer skipping (SWIFT) where the family has
    residual halves, per-layer RoPE and residual multipliers included. Greedy output = AR's."""
    from decodebench.methods import build_method, method_config

    from helpers import decode

    backbone = Backbone(tiny_family_model(family, num_hidden_layers=4))
    prompt = random_ids(6, 12) * 3
    reference = decode(backbone, build_method(method_config("ar")), prompt, max_new_tokens=24, setup=True)
    config = method_config(method)
    config.params.update(params)
    config.pinned = list(params)
    drafter = build_method(config)
    drafter.setup(backbone, str(tmp_path))
    out = decode(backbone, drafter, prompt, max_new_tokens=24)
    assert sum(step.drafted for step in out.steps) > 0
    assert out.new_ids == reference.new_ids


def _break_layer_one(monkeypatch) -> None:
    run_layer = Backbone._layer

    def broken(self, layer_index, hidden, *args, **kwargs):
        out = run_layer(self, layer_index, hidden, *args, **kwargs)
        return out + 0.01 * out.roll(1, dims=-1) if layer_index == 1 else out

    monkeypatch.setattr(Backbone, "_layer", broken)


@pytest.mark.embedded
def test_run_records_the_self_check_and_a_failing_one_exits_2(tmp_path, data_dir, monkeypatch, capfd):
    """The CLI: a passing self-check is in the manifest; a failing one stops the run with exit
    code 2 before anything is timed or written."""
    import json

    from decodebench.cli import main

    args = [
        "model=tiny-llama",
        "method=ar",
        "baseline=none",
        "task.per_category=1",
        "task.categories=[qa]",
        "gen.max_new_tokens=4",
        "warmup=0",
        f"data_dir={data_dir}",
        "progress=false",
        "threads=1",
    ]
    main([*args, f"hydra.run.dir={tmp_path / 'good'}"])
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    checked = manifest["engine"]["tiny-llama"]["self_check"]
    assert checked["architecture"] == "llama" and checked["max_abs_diff"] <= checked["tolerance"]
    assert checked["seconds"] > 0

    _break_layer_one(monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        main([*args, f"hydra.run.dir={tmp_path / 'broken'}"])
    assert stopped.value.code == 2
    printed = capfd.readouterr()
    assert "engine self-check failed for architecture 'llama'" in printed.out + printed.err
    assert not (tmp_path / "broken" / "records.jsonl").exists()


@pytest.mark.embedded
def test_local_directory_loads_eager_when_the_family_needs_it(tmp_path):
    """A Gemma 2 checkpoint (sdpa refused by transformers) loads with eager attention although the
    model config asks for sdpa, and passes the self-check."""
    from decodebench.config import ModelConfig
    from decodebench.models.loading import load_model

    tiny_family_model("gemma2", vocab_size=49152).save_pretrained(tmp_path / "gemma2")
    loaded = load_model(
        ModelConfig(
            name="mine",
            source="path",
            path=str(tmp_path / "gemma2"),
            tokenizer="smollm2-135m",
            attn_implementation="sdpa",
        )
    )
    assert loaded.info["attn_implementation"] == "eager" and loaded.model.config._attn_implementation == "eager"
    assert self_check(Backbone(loaded.model)).max_abs_diff <= 1e-3


def test_unsupported_local_directory_is_refused_before_its_weights_load(tmp_path):
    from decodebench.config import ModelConfig
    from decodebench.models.loading import load_model

    AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4).save_pretrained(tmp_path / "gpt2")  # no weights
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2' is not supported"):
        load_model(ModelConfig(name="mine", source="path", path=str(tmp_path / "gpt2")))
