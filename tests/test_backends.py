"""Engine backends (eager | packed | onednn | compiled), draft budgets from the latency curve, the profiler.

Within one backend every lossless method reproduces AR token for token: the decode-loop tests of
tests/test_decode_loop.py run here again, unchanged, against a Backbone running each backend
(their ``backbone`` fixture is overridden below). Across backends, logits agree within fp32
rounding. Compiled tests compile tiny models (tens of seconds cold, cached under the DecodeBench
cache afterwards) and are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from decodebench.config import ConfigValueError, EngineConfig, MethodConfig, ModelConfig, compose_run_config
from decodebench.engine import backends
from decodebench.engine.backbone import Backbone, BlockLayout
from decodebench.engine.backends import OneDNNLinear, PackedLinear, apply_backend, bucket_for, remove_backend
from decodebench.engine.budget import block_cost, expected_tokens, node_budget, pick_draft_budget
from decodebench.engine.profile import load_latency_curve, profile_backend, profile_path
from decodebench.methods import build_method
from decodebench.models.tiny import build_tiny

from helpers import REVISION, TINY, decode, repeating_prompts  # tests/helpers.py (on sys.path via conftest)

# The decode-loop tests, loaded from their file (pytest runs with --import-mode=importlib).
_spec = importlib.util.spec_from_file_location("_decode_loop_tests", Path(__file__).with_name("test_decode_loop.py"))
decode_loop_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode_loop_tests)
COMPILED_BUCKETS = (1, 4, 8)  # k = 11 (10 drafts) falls back to the eager path on purpose


def tiny_backbone(arch: str, backend: str) -> Backbone:
    model = build_tiny(ModelConfig(name=f"tiny-{arch}", source="tiny", architecture=arch, tiny=TINY), seed=0)
    backbone = Backbone(model)
    apply_backend(backbone, backend, buckets=COMPILED_BUCKETS, model_name=f"tiny-{arch}")
    return backbone


BACKEND_PARAMS = [
    pytest.param(("llama", "packed"), id="llama-packed"),
    pytest.param(("qwen2", "packed"), id="qwen2-packed"),
    pytest.param(("llama", "onednn"), id="llama-onednn"),
    pytest.param(("qwen2", "onednn"), id="qwen2-onednn"),
    pytest.param(("llama", "tuned"), id="llama-tuned"),  # fused layers; qwen2: with q/k/v biases
    pytest.param(("qwen2", "tuned"), id="qwen2-tuned"),
    pytest.param(("llama", "compiled"), id="llama-compiled", marks=pytest.mark.slow),
    pytest.param(("qwen2", "compiled"), id="qwen2-compiled", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module", params=BACKEND_PARAMS)
def backbone(request):
    arch, backend = request.param
    if backend == "packed" and not torch._C.has_mkl:
        pytest.skip("packed needs MKL")
    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("onednn needs oneDNN")
    built = tiny_backbone(arch, backend)
    assert built.backend == backend
    return built


# the same lossless / equivalence tests as tests/test_decode_loop.py, against every backend
test_ar_equals_hf_greedy_generate = decode_loop_tests.test_ar_equals_hf_greedy_generate
test_pld_greedy_equals_ar = decode_loop_tests.test_pld_greedy_equals_ar
test_pld_sampling_is_reproducible_and_uses_target_distribution = (
    decode_loop_tests.test_pld_sampling_is_reproducible_and_uses_target_distribution
)
test_stops_at_eos_and_counts_it = decode_loop_tests.test_stops_at_eos_and_counts_it
test_tree_proposals_are_verified_losslessly = decode_loop_tests.test_tree_proposals_are_verified_losslessly
test_aux_tokens_never_change_the_output_and_get_logits = (
    decode_loop_tests.test_aux_tokens_never_change_the_output_and_get_logits
)


def test_blocks_match_eager_logits(backbone):
    """Chains of every size (bucketed, padded, larger than every bucket) and a tree, on a growing
    cache: the backend's logits equal eager's within fp32 rounding."""
    eager = Backbone(backbone.model)
    swapped = backbone.backend in ("packed", "onednn", "tuned")
    if swapped:  # packing lives in the modules: compare with plain F.linear
        eager = None
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 101, (30,), generator=gen).tolist()
    blocks = [torch.randint(0, 101, (k,), generator=gen).tolist() for k in (1, 2, 3, 4, 5, 8, 9, 12, 1, 7)]
    tree = ([5, 17, 23, 42, 8, 61], [-1, 0, 0, 1, 1, 2])
    ours_backend = backbone.backend
    ours_cache, ref_cache = backbone.new_cache(16), backbone.new_cache(16)
    outputs = []
    for run_cache in (ours_cache, ref_cache):
        reference_run = run_cache is ref_cache
        if reference_run and eager is None:
            remove_backend(backbone)
        target = eager if (reference_run and eager is not None) else backbone
        logits = [target.forward(prefix, run_cache).logits]
        for block in blocks:
            logits.append(target.forward(block, run_cache).logits)
        logits.append(target.forward(tree[0], run_cache, layout=BlockLayout(parents=tree[1])).logits)
        run_cache.crop(run_cache.length - 4)
        logits.append(target.forward(blocks[5], run_cache, logits_rows=slice(-1, None)).logits)
        outputs.append(logits)
        assert run_cache.lengths == [run_cache.length] * backbone.num_layers
    if swapped:
        apply_backend(backbone, ours_backend, buckets=COMPILED_BUCKETS)
    for ours, reference in zip(*outputs):
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
        assert torch.equal(ours.argmax(-1), reference.argmax(-1))


@pytest.mark.slow
def test_compiled_does_not_recompile_as_the_context_grows():
    backbone = tiny_backbone("llama", "compiled")
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]
    ar = build_method(MethodConfig())
    prompt = repeating_prompts()[0]
    # 200 tokens: the cache grows past its capacity and the span crosses several SPAN_STEPs
    out = decode(backbone, ar, prompt, max_new_tokens=200, setup=True)
    assert len(out.new_ids) == 200
    assert counters["stats"]["unique_graphs"] == graphs_before


def test_packed_swaps_every_linear_and_removes_cleanly():
    backbone = tiny_backbone("llama", "packed")
    linears = [m for m in backbone.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is PackedLinear for m in linears)
    assert sorted(linears[0].packed) == [8]  # buckets >= 4 pad to 8 at least
    remove_backend(backbone)
    assert all(type(m) is torch.nn.Linear for m in backbone.model.modules() if isinstance(m, torch.nn.Linear))
    assert backbone.backend == "eager" and backbone.fast_forward is None


def test_onednn_swaps_every_linear_rows_independent_and_trainable():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("onednn needs oneDNN")
    backbone = tiny_backbone("llama", "onednn")
    linears = [m for m in backbone.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is OneDNNLinear for m in linears)
    layer = linears[0]
    x = torch.randn(8, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        block, row = layer(x), layer(x[:1])
    # a row's output does not depend on the rows sharing the call (what keeps verify == AR step)
    assert torch.equal(block[:1], row)
    torch.testing.assert_close(block, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=0)
    # with autograd (adapter / head training) it is a plain differentiable linear
    x.requires_grad_(True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    remove_backend(backbone)
    assert all(type(m) is torch.nn.Linear for m in backbone.model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("backend", ["packed", "onednn"])
def test_deep_copies_of_swapped_layers_are_plain_and_equal(backend):
    """Kangaroo copies a decoder layer for its adapter: the copy must work (oneDNN's weight is an
    opaque tensor) and be a plain nn.Linear, since its weights are trained or loaded afterwards."""
    import copy

    if backend == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("onednn needs oneDNN")
    if backend == "packed" and not torch._C.has_mkl:
        pytest.skip("packed needs MKL")
    backbone = tiny_backbone("llama", backend)
    mlp = backbone.layers[0].mlp
    clone = copy.deepcopy(mlp)
    assert all(type(m) is torch.nn.Linear for m in clone.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randn(5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(clone(x), mlp(x), atol=1e-5, rtol=0)
    assert clone.gate_proj.weight.data_ptr() != mlp.gate_proj.weight.data_ptr()
    assert type(mlp.gate_proj) is not torch.nn.Linear  # the original keeps its backend


def test_auto_keeps_tiny_models_eager():
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture="llama", tiny=TINY), seed=0))
    info = apply_backend(backbone, "auto")
    assert info.requested == "auto" and info.name == "eager" and backbone.backend == "eager"


def test_bad_backend_names_are_config_errors():
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture="llama", tiny=TINY), seed=0))
    with pytest.raises(ConfigValueError, match="engine.backend.*fast.*auto \\| eager"):
        apply_backend(backbone, "fast")
    with pytest.raises(
        ConfigValueError, match="engine.backend.*turbo.*auto \\| eager \\| packed \\| onednn \\| tuned \\| compiled"
    ):
        EngineConfig(backend="turbo")
    with pytest.raises(ConfigValueError, match="engine.buckets"):
        EngineConfig(buckets=[0, 4])
    assert backends.backends_for("cuda") == ["eager", "compiled"]


def test_engine_config_composes():
    with pytest.raises(ConfigValueError, match="engine.backend.*packed, onednn and tuned need device=cpu"):
        compose_run_config(["engine.backend=packed", "device=cuda"])
    cfg = compose_run_config(["engine.backend=compiled", "engine.buckets=[1,8]"])
    assert cfg.engine == EngineConfig(backend="compiled", buckets=[1, 8])
    # the YAML default is auto; tests/conftest.py pins eager through the environment
    assert compose_run_config([]).engine.backend == os.environ.get("DECODEBENCH_ENGINE_BACKEND", "auto")


def test_bucket_for():
    assert [bucket_for(k, (1, 4, 8)) for k in (1, 2, 4, 5, 8, 9)] == [1, 4, 4, 8, 8, None]


# -- budgets from the curve ------------------------------------------------------------------------
FLAT = {"k": [1, 2, 4, 8, 16, 32], "ratio": [1.0, 1.03, 1.04, 1.20, 1.63, 2.19]}  # compiled (issue 9)
STEEP = {"k": [1, 2, 4, 8, 16, 32], "ratio": [1.0, 1.11, 1.86, 2.16, 3.27, 3.81]}  # eager sdpa


def test_block_cost_pads_up_and_extrapolates():
    assert block_cost(FLAT, 3) == 1.04 and block_cost(FLAT, 4) == 1.04
    assert block_cost(FLAT, 64) == pytest.approx(2.19 * 2)
    assert expected_tokens(0, 0.5) == 1 and expected_tokens(2, 0.5) == 1.75


def test_pick_draft_budget():
    flat = pick_draft_budget(FLAT, 0.6)
    assert flat.draft_tokens == 3  # 4-token block costs 1.04: E = 2.18
    assert flat.tokens_per_cost == pytest.approx(expected_tokens(3, 0.6) / 1.04)
    assert pick_draft_budget(STEEP, 0.6).draft_tokens == 1  # k = 2 is the only cheap block
    assert pick_draft_budget(STEEP, 0.0).draft_tokens == 0  # nothing is ever accepted: do not speculate
    assert pick_draft_budget(FLAT, 0.8).draft_tokens == 7  # higher acceptance fills the 8-bucket
    assert pick_draft_budget(FLAT, 0.95).draft_tokens == 31  # ... and near-certain acceptance the largest
    assert pick_draft_budget(FLAT, 0.95, max_draft_tokens=10).draft_tokens == 7
    with pytest.raises(ValueError):
        pick_draft_budget(FLAT, 1.5)


def test_node_budget():
    assert node_budget(FLAT, 1.25, 64) == 8  # T(8)/T(1) 1.20; k = 9..16 cost T(16) (padded up), 1.63
    assert node_budget(FLAT, 1.7, 64) == 16
    assert node_budget(FLAT, 1.25, 6) == 6
    assert node_budget(STEEP, 1.05, 64) == 2  # nothing is that cheap: the smallest draft
    assert node_budget(STEEP, 1.0, 1) == 1
    with pytest.raises(ValueError):
        node_budget(FLAT, 0.9, 8)


def test_by_rank_sum_orders_likelier_nodes_first_and_every_prefix_is_a_tree():
    from decodebench.methods.token_recycling import PAPER_TREE, by_rank_sum, check_tree

    ordered = by_rank_sum([list(p) for p in PAPER_TREE])
    assert ordered[:7] == [[0], [1], [0, 0], [2], [0, 1], [1, 0], [0, 0, 0]]
    assert sorted(map(tuple, ordered)) == sorted(map(tuple, PAPER_TREE))
    for size in range(1, len(ordered) + 1):
        check_tree(ordered[:size], 8)  # raises when a parent is missing


@pytest.mark.parametrize(
    "method, attribute, expected, largest",
    [
        ("lookahead", "decoding_length", 8, 64),
        ("suffix", "max_spec_tokens", 7, 64),
        ("aded", "max_draft_tokens", 7, 64),
        ("token_recycling", "tree", 7, None),
    ],
)
def test_tree_methods_size_their_budget_from_the_curve(tmp_path, method, attribute, expected, largest):
    """cpu presets (max_verify_cost): tokens per verify from the stored curve of the backend in use."""
    from decodebench.methods import method_config

    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture="llama", tiny=TINY), seed=0))
    backbone.model_name = "tiny-x"
    path = profile_path("tiny-x", "eager", "cpu", str(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**FLAT, "model": "tiny-x", "backend": "eager", "device": "cpu", **REVISION}))
    overrides = {"max_verify_cost": 1.25, "corpus_prompts": 0} if method == "aded" else {"max_verify_cost": 1.25}
    cfg = method_config(method)
    cfg.preset, cfg.pinned = "paper", list(overrides)
    cfg.params.update(overrides)
    drafter = build_method(cfg)
    drafter.setup(backbone, str(tmp_path))
    value = getattr(drafter, attribute)
    assert (len(value) if attribute == "tree" else value) == expected  # k = 8 tokens: root + 7
    assert drafter.budget_source == "curve:eager" and drafter.request_stats()["verify_budget"] == 8.0
    drafter = build_method(cfg)
    drafter.setup(backbone, str(tmp_path / "no-curve"))  # no stored curve: the params' cap
    value = getattr(drafter, attribute)
    assert drafter.budget_source == "params" and "verify_budget" not in drafter.request_stats()
    assert (len(value) if attribute == "tree" else value) == (largest or len(cfg.resolved_params("cpu")["tree"]))


def test_profile_stores_curves_and_pld_reads_them(tmp_path):
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture="llama", tiny=TINY), seed=0))
    ks = [1, 2, 4, 8]
    _, reference = profile_backend(
        backbone, "eager", model="tiny-x", context=20, ks=ks, repeats=1, cache_dir=str(tmp_path)
    )
    curve, _ = profile_backend(
        backbone,
        "packed",
        model="tiny-x",
        context=20,
        ks=ks,
        repeats=1,
        cache_dir=str(tmp_path),
        reference_argmax=reference,
    )
    assert {"model", "backend", "device", "threads", "context", "k", "ms", "ratio"} <= set(curve)
    assert curve["backend"] == "packed" and curve["k"] == ks and curve["ratio"][0] == 1.0
    assert curve["argmax_differs_vs_eager"] == 0.0
    assert backbone.backend == "eager"  # the profiler leaves the backbone as it found it

    assert load_latency_curve("tiny-x", "eager", cache_dir=str(tmp_path)) is None
    path = profile_path("tiny-x", "eager", "cpu", str(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text(
        json.dumps(
            {
                **FLAT,
                "model": "tiny-x",
                "backend": "eager",
                "device": "cpu",
                "threads": 2,
                "context": 175,
                "ms": [50.0] * 6,
                **REVISION,
            }
        )
    )
    assert load_latency_curve("tiny-x", "eager", cache_dir=str(tmp_path))["ratio"] == FLAT["ratio"]

    pld_cfg = MethodConfig(
        name="pld",
        impl="decodebench.methods.pld:PromptLookupDrafter",
        params={"num_draft_tokens": 10, "budget_from_curve": True, "expected_acceptance": 0.6},
    )
    backbone.model_name = "tiny-x"
    drafter = build_method(pld_cfg)
    drafter.setup(backbone, str(tmp_path))
    assert (drafter.budget, drafter.budget_source) == (3, "curve:eager")
    drafter = build_method(pld_cfg)
    drafter.setup(backbone, str(tmp_path / "elsewhere"))  # no curve stored: the YAML value
    assert (drafter.budget, drafter.budget_source) == (10, "params")


def test_profile_cli_stores_the_draft_cost_ratio(tmp_path, capsys):
    """decodebench-profile --draft times the draft's 1-token step next to the target's curve."""
    from decodebench.engine.profile import main as profile_main

    profile_main(
        [
            "--model",
            "tiny-llama",
            "--draft",
            "tiny-llama-draft",
            "--backend",
            "eager",
            "--ks",
            "1,2",
            "--repeats",
            "2",
            "--context",
            "16",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    stored = json.loads(profile_path("tiny-llama", "eager", "cpu", str(tmp_path)).read_text())
    draft = stored["draft"]
    assert draft["model"] == "tiny-llama-draft" and draft["ms"] > 0
    assert draft["cost_ratio"] == pytest.approx(draft["ms"] / stored["ms"][0], rel=1e-3)
    assert "cost ratio T_draft(1)/T_target(1)" in capsys.readouterr().out
    profile_main(
        [
            "--model",
            "tiny-llama",
            "--draft",
            "none",
            "--backend",
            "eager",
            "--ks",
            "1,2",
            "--repeats",
            "1",
            "--context",
            "16",
            "--cache-dir",
            str(tmp_path),
        ]
    )
    assert "draft" not in json.loads(profile_path("tiny-llama", "eager", "cpu", str(tmp_path)).read_text())


# -- the embedded model ------------------------------------------------------------------------------
@pytest.mark.embedded
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["packed", "onednn", "compiled"])
def test_embedded_pld_equals_ar_per_backend(backend):
    from decodebench.engine.decode_loop import DecodeSettings, generate
    from decodebench.models.loading import load_model, load_model_config

    loaded = load_model(load_model_config("smollm2-135m"))
    backbone = Backbone(loaded.model)
    info = apply_backend(backbone, backend, buckets=(1, 4, 8), model_name="smollm2-135m")
    assert info.argmax_agrees
    tokenizer = loaded.tokenizer
    text = "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"
    prompt = tokenizer(text)["input_ids"]
    settings = DecodeSettings(max_new_tokens=48)
    outputs = {}
    for name, params in (("ar", {}), ("pld", {"num_draft_tokens": 6})):
        impl = (
            "decodebench.methods.ar:AutoregressiveDrafter"
            if name == "ar"
            else "decodebench.methods.pld:PromptLookupDrafter"
        )
        drafter = build_method(MethodConfig(name=name, impl=impl, params=params))
        drafter.setup(backbone)
        outputs[name] = generate(backbone, drafter, prompt, settings, backbone.new_cache(256))
    assert outputs["pld"].new_ids == outputs["ar"].new_ids
    assert sum(s.accepted for s in outputs["pld"].steps) > 0
