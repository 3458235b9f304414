"""The ``tuned`` backend (kernels per block size, measured here), backend memory costs, curve sanity
and the profiler's step breakdown. The decode-loop losslessness tests run against ``tuned`` in
tests/test_backends.py (its ``backbone`` fixture)."""

from __future__ import annotations

import json

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, ModelConfig
from decodebench.engine import backends, kernels, streamed
from decodebench.engine.backbone import Backbone
from decodebench.engine.backends import TunedLinear, apply_backend, memory_refusal, remove_backend
from decodebench.engine.kernels import KernelTable, kernels_path, pick_kernel, row_buckets
from decodebench.methods import build_method
from decodebench.models.tiny import build_tiny

from helpers import TINY, decode, load_benchmark, repeating_prompts  # tests/helpers.py (on sys.path via conftest)


def tiny(arch: str = "llama") -> Backbone:
    return Backbone(build_tiny(ModelConfig(name=f"tiny-{arch}", source="tiny", architecture=arch, tiny=TINY), seed=0))


def assert_pld_equals_ar(backbone: Backbone) -> None:
    """PLD's output equals AR's token for token on ``backbone``, with drafts accepted (so the
    verify blocks ran through the multi-row kernels)."""
    ar = build_method(MethodConfig())
    pld = build_method(
        MethodConfig(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter", params={"num_draft_tokens": 6})
    )
    prompt = repeating_prompts()[0]
    reference = decode(backbone, ar, prompt, max_new_tokens=32)
    ours = decode(backbone, pld, prompt, max_new_tokens=32)
    assert ours.new_ids == reference.new_ids
    assert sum(s.accepted for s in ours.steps) > 0, "PLD never got a draft accepted: the check proves nothing"


def hand_table(choice: dict[int, str]) -> KernelTable:
    return KernelTable(
        buckets=sorted(choice),
        choice={str(b): k for b, k in choice.items()},
        us={},
        rows_bitwise={},
        cpu="test",
        threads=1,
        measure_s=0.0,
    )


def test_row_buckets_and_pick_kernel():
    assert row_buckets((1, 4, 8, 16, 32)) == [1, 2, 3, 4, 8, 16, 32]
    assert row_buckets((2, 6)) == [1, 2, 3, 6]
    # plain mkl unless another kernel is clearly (MIN_GAIN) faster; among the near-best, fewest copies
    assert pick_kernel({"mkl": 100.0, "mkl_packed": 95.0, "onednn": 96.0}) == "mkl"
    assert pick_kernel({"mkl": 200.0, "mkl_packed": 100.0, "onednn": 105.0}) == "onednn"
    assert pick_kernel({"mkl": 200.0, "mkl_packed": 100.0, "onednn": 150.0}) == "mkl_packed"
    # streamed (the kernel of the fused C++ layer) within STREAMED_MARGIN of the fastest, not beyond
    assert pick_kernel({"mkl": 27.2, "mkl_packed": 30.1, "streamed": 30.3}) == "streamed"
    assert pick_kernel({"mkl": 100.0, "mkl_packed": 50.0, "streamed": 66.0}) == "mkl_packed"


@pytest.mark.skipif(not (torch._C.has_mkl and torch.backends.mkldnn.is_available()), reason="needs MKL and oneDNN")
def test_tuned_linear_runs_each_bucket_with_its_kernel():
    backbone = tiny()
    table = hand_table({1: "mkl", 2: "mkl", 3: "mkl", 4: "onednn", 8: "mkl_packed"})
    backends._apply_tuned(backbone, table)
    linears = backends.linears_of(backbone)
    assert all(type(m) is TunedLinear for m in linears)
    layer = linears[0]
    assert layer.kernel_by_rows[1:] == ["mkl"] * 3 + ["onednn"] + ["mkl_packed"] * 4
    assert set(layer.backend_weights) == {"onednn", 8}  # one oneDNN copy, one MKL pack for rows 5..8
    assert backends._tuned_extra_bytes(backbone, table) == 2 * sum(
        m.weight.numel() * m.weight.element_size() for m in linears
    )
    x = torch.randn(12, layer.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for rows in (1, 3, 4, 5, 8, 12):  # 12 > every bucket: plain F.linear
            reference = torch.nn.functional.linear(x[:rows], layer.weight, layer.bias)
            torch.testing.assert_close(layer(x[:rows]), reference, atol=1e-5, rtol=0)
    remove_backend(backbone)
    assert all(type(m) is torch.nn.Linear for m in backends.linears_of(backbone))


@pytest.mark.skipif(not (torch._C.has_mkl and torch.backends.mkldnn.is_available()), reason="needs MKL and oneDNN")
def test_mixed_kernels_keep_pld_equal_to_ar():
    """AR steps run mkl (1 row), PLD's verify blocks onednn / a prepacked MKL weight: the outputs
    stay identical token for token (kernels differ by summation order only)."""
    backbone = tiny()
    backends._apply_tuned(backbone, hand_table({1: "mkl", 2: "mkl", 3: "mkl", 4: "onednn", 8: "mkl_packed"}))
    backbone.backend = "tuned"
    assert_pld_equals_ar(backbone)
    remove_backend(backbone)


def test_tuned_measures_stores_and_reuses_its_kernel_table(tmp_path, monkeypatch):
    backbone = tiny()
    info = apply_backend(backbone, "tuned", buckets=(1, 4, 8), model_name="tiny-llama", cache_dir=str(tmp_path))
    assert info.name == "tuned" and info.argmax_agrees
    stored = json.loads(kernels_path("tiny-llama", "cpu", str(tmp_path)).read_text())
    assert stored["buckets"] == [1, 2, 3, 4, 8] and set(stored["choice"]) == {"1", "2", "3", "4", "8"}
    assert set(stored["us"]["4"]) == set(kernels.kernels_available())
    assert stored["rows_bitwise"]["mkl"] in (True, False) and info.kernels["choice"] == stored["choice"]

    def not_again(*args, **kwargs):
        raise AssertionError("a stored kernel table is reused, not measured again")

    monkeypatch.setattr(kernels, "measure_kernels", not_again)
    again = apply_backend(backbone, "tuned", buckets=(1, 4, 8), model_name="tiny-llama", cache_dir=str(tmp_path))
    assert again.kernels["choice"] == stored["choice"]
    # another bucket set is another table
    with pytest.raises(AssertionError, match="reused"):
        apply_backend(backbone, "tuned", buckets=(1, 16), model_name="tiny-llama", cache_dir=str(tmp_path))
    # so is a table another engine revision measured (its kernels may have changed since)
    path = kernels_path("tiny-llama", "cpu", str(tmp_path))
    path.write_text(json.dumps({**stored, "engine_revision": "0123456789ab"}))
    with pytest.raises(AssertionError, match="reused"):
        apply_backend(backbone, "tuned", buckets=(1, 4, 8), model_name="tiny-llama", cache_dir=str(tmp_path))
    remove_backend(backbone)


def test_a_backend_that_does_not_fit_in_memory_is_refused_or_skipped(monkeypatch):
    assert memory_refusal(10, None) is None and memory_refusal(10, 100) is None
    assert "0.80" not in (memory_refusal(90, 100) or "") and "available" in memory_refusal(90, 100)
    backbone = tiny()
    monkeypatch.setattr(backends, "TINY_MODEL_PARAMETERS", 0)  # let auto consider the tiny model
    monkeypatch.setattr(backends, "available_memory_bytes", lambda: 1000)  # 1 kB free
    table = hand_table({1: "mkl", 2: "mkl", 3: "mkl", 4: "onednn"})
    monkeypatch.setattr(kernels, "measure_kernels", lambda *args, **kwargs: table)
    with pytest.raises(ConfigValueError, match="engine.backend=onednn does not fit in memory"):
        apply_backend(backbone, "onednn", model_name=None)
    info = apply_backend(backbone, "auto", model_name=None)
    assert info.name == "eager"
    assert all("does not fit in memory" in why for why in info.rejected.values())
    assert set(info.rejected) == {"onednn", "packed", "tuned"} & set(backends.backends_for("cpu"))


# -- the profiler: curve sanity, step breakdown ---------------------------------------------------
def test_implausible_curves_are_named():
    from decodebench.engine.profile import curve_problems

    plausible = {1: [0.030, 0.031, 0.029], 2: [0.032] * 3, 4: [0.036] * 3, 8: [0.040] * 3}
    assert curve_problems(plausible) == []
    # the packed Qwen curve: T(4)/T(1) = 0.02
    cheap = {**plausible, 1: [29.1, 29.0, 29.2], 4: [0.6] * 3}
    assert any("T(4)/T(1) = 0.02" in p for p in curve_problems(cheap))
    # one block size far slower than a larger one
    assert any("T(2)" in p and "far slower" in p for p in curve_problems({**plausible, 2: [0.09] * 3}))
    # repeats all over the place
    assert any("spread" in p for p in curve_problems({**plausible, 8: [0.01, 0.04, 0.2]}))


def test_an_implausible_curve_is_refused_and_not_stored(tmp_path, monkeypatch):
    from decodebench.engine import profile

    backbone = tiny()
    backbone.model_name = "tiny-llama"
    calls = []

    def absurd(backbone, context, ks, repeats, warmup=2):
        calls.append(1)
        return {k: [1.0 if k == 1 else 0.01] * 3 for k in ks}, {}

    monkeypatch.setattr(profile, "measure_samples", absurd)
    with pytest.raises(profile.CurveRefusedError, match="refused after 3 attempts.*T\\(2\\)/T\\(1\\) = 0.01"):
        profile.ensure_latency_curve(backbone, str(tmp_path), ks=(1, 2), repeats=3, context=8)
    assert len(calls) == profile.CURVE_ATTEMPTS
    assert not list(tmp_path.rglob("*.json"))


def test_step_breakdown_accounts_for_the_step():
    from decodebench.engine.profile import BREAKDOWN_PARTS, breakdown_table, step_breakdown

    backbone = tiny()
    row = step_breakdown(backbone, context=16, k=4, repeats=2)
    assert set(row.parts_ms) == set(BREAKDOWN_PARTS) and row.wall_ms > 0
    # the labelled parts were seen, and nothing is left patched on the backbone
    assert row.parts_ms["lm_head"] > 0 and row.parts_ms["cache_writes"] > 0 and row.parts_ms["decoder_linears"] > 0
    assert "head" not in vars(backbone) and row.ops_per_step > backbone.num_layers
    assert "| eager | 4 |" in breakdown_table([("eager", row)])


def test_bench_vs_llamacpp_without_llama_cpp_exits_with_the_install_command(tmp_path, capsys):
    bench = load_benchmark("bench_vs_llamacpp")
    with pytest.raises(SystemExit) as exited:
        bench.check_llama_cpp(str(tmp_path / "no-venv" / "bin" / "python"))
    assert exited.value.code == 2
    assert bench.INSTALL in capsys.readouterr().err and "pip install llama-cpp-python==" in bench.INSTALL


def test_an_implausibly_cheap_draft_step_is_named():
    from decodebench.engine.profile import draft_problem

    target, draft = tiny(), tiny()  # same size: the draft step cannot cost 1% of the target's
    assert "draft cost ratio 0.010" in draft_problem(draft, target, 0.01)
    assert draft_problem(draft, target, 0.9) is None


def test_tuned_fuses_plain_layers_without_copying_weights():
    """q/k/v and gate/up run as one linear each; the HF modules' weights become views into the fused
    ones (no weight copied), so sublayer skipping and adapters built from a layer read the same values."""
    backbone = tiny("qwen2")  # q/k/v biases fuse too
    attention = backbone.layers[0].self_attn
    before = [attention.q_proj.weight.clone(), attention.v_proj.bias.clone()]
    info = apply_backend(backbone, "tuned", buckets=(1, 4), model_name=None)
    assert info.layers == "fused" and info.argmax_agrees
    fused = backbone.fused_layers[0]
    assert attention.q_proj.weight.data_ptr() == fused.qkv.weight.data_ptr()
    assert torch.equal(attention.q_proj.weight, before[0]) and torch.equal(attention.v_proj.bias, before[1])
    assert len(backends.linears_of(backbone)) == 4 * backbone.num_layers + 1
    remove_backend(backbone)
    assert backbone.fused_layers is None and len(backends.linears_of(backbone)) == 7 * backbone.num_layers + 1


def test_fused_gqa_attention_over_a_tree_and_a_batch_matches_the_hf_layers():
    """Masked blocks (a tree, padded batch rows) on GQA fold each kv head's query heads into its
    query rows instead of repeating the cached K/V: the logits are the HF layers' (4 heads on 2)."""
    from decodebench.engine.backbone import BlockLayout  # noqa: PLC0415

    backbone = tiny("llama")
    prefix, block, parents = list(range(3, 40)), [7, 8, 9, 10, 11], [-1, 0, 0, 1, 1]
    rows = [[5, 6, 7, 8], [9, 10]]

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        cache = backbone.new_cache(16)
        backbone.forward(prefix, cache)
        tree = backbone.forward(block, cache, layout=BlockLayout(parents=parents)).logits
        batch_cache = backbone.new_cache(16, batch_size=2)
        batched = backbone.forward_batch(torch.tensor([rows[0], [*rows[1], 0, 0]]), batch_cache, sizes=[4, 2]).logits
        return tree, batched

    reference = logits()
    apply_backend(backbone, "tuned", buckets=(1, 4, 8), model_name=None)
    assert backbone.fused_layers is not None
    fused = logits()
    torch.testing.assert_close(fused[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1][0], reference[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused[1][1, :2], reference[1][1, :2], rtol=1e-5, atol=1e-5)


def test_tuned_names_why_layers_are_not_fused():
    config = ModelConfig(name="tiny-llama", source="tiny", architecture="llama", tiny=TINY, attn_implementation="eager")
    backbone = Backbone(build_tiny(config, seed=0))
    info = apply_backend(backbone, "tuned", buckets=(1, 4), model_name=None)
    assert info.name == "tuned" and backbone.fused_layers is None and info.argmax_agrees
    assert info.layers == "attention implementation 'eager' (fused layers run sdpa)"
    remove_backend(backbone)


@pytest.mark.skipif(streamed.unavailable_reason() is not None, reason="no C++ toolchain for the streamed kernel")
def test_streamed_kernel_is_a_linear_whose_rows_do_not_depend_on_the_block():
    gen = torch.Generator().manual_seed(11)
    for out_features, in_features in ((37, 50), (96, 64), (5, 3)):  # K tails and N tails of the kernel's blocks
        weight = torch.randn(out_features, in_features, generator=gen)
        bias = torch.randn(out_features, generator=gen)
        x = torch.randn(40, in_features, generator=gen)  # > 16 rows (> 8 on AVX2): slices of one pass
        full = streamed.streamed_linear(x, weight, bias)
        torch.testing.assert_close(full, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5)
        for rows in range(1, 41):
            assert torch.equal(streamed.streamed_linear(x[:rows], weight, bias), full[:rows]), rows
    assert streamed.streamed_linear(torch.randn(2, 3, 50, generator=gen), torch.randn(7, 50)).shape == (2, 3, 7)


@pytest.mark.skipif(streamed.unavailable_reason() is not None, reason="no C++ toolchain for the streamed kernel")
def test_streamed_kernel_keeps_pld_equal_to_ar_on_fused_layers():
    backbone = tiny()
    backends.install_fused_layers(backbone)
    backends._apply_tuned(backbone, hand_table({1: "streamed", 2: "streamed", 3: "mkl", 4: "streamed", 8: "streamed"}))
    backbone.backend = "tuned"
    assert backends.linears_of(backbone)[0].kernel_by_rows[1:5] == ["streamed", "streamed", "mkl", "streamed"]
    assert_pld_equals_ar(backbone)
    remove_backend(backbone)


@pytest.mark.skipif(streamed.unavailable_reason() is not None, reason="no C++ toolchain for the streamed kernel")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
def test_the_cpp_decoder_layer_matches_the_hf_layers_and_a_row_does_not_depend_on_its_block(arch):
    """Where the table picks the streamed kernel, a fused layer runs as one ``decode_layer`` call:
    a step, a chain and a tree give the HF layers' logits, and a row's logits are bitwise the same
    in a 1-token step and in a verify block (AR and verification agree exactly)."""
    from torch.profiler import profile  # noqa: PLC0415

    from decodebench.engine.backbone import BlockLayout  # noqa: PLC0415

    backbone = tiny(arch)
    # 45 tokens: the 1-token step below sees 47 keys, the chain 48, so keys 32-46 are scored one by one
    # in the step and as a full group of 16 (8 on AVX2) in the chain (decode_layer.cpp scores)
    prefix = list(range(3, 48))
    blocks = [([7], None), ([7, 8, 9], None), ([7, 8, 9, 10, 11], [-1, 0, 0, 1, 1])]

    def run() -> list[torch.Tensor]:
        out = []
        for tokens, parents in blocks:
            cache = backbone.new_cache(16)
            backbone.forward(prefix, cache)
            out.append(backbone.forward(tokens, cache, layout=BlockLayout(parents=parents)).logits)
        return out

    reference = run()
    backends.install_fused_layers(backbone)
    backends._apply_tuned(backbone, hand_table({1: "streamed", 4: "streamed", 8: "streamed", 16: "mkl"}))
    assert backbone.fused_layers[0].native_for(5) and not backbone.fused_layers[0].native_for(16)
    with profile() as traced:
        native = run()
    assert sum(event.name == "decodebench::decode_layer" for event in traced.events()) == 3 * backbone.num_layers
    backbone.backend = "tuned"
    for ours, theirs in zip(native, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # token 8 after [prefix, 7]: as a 1-token step, and as row 1 of the 3-token chain
    cache = backbone.new_cache(16)
    backbone.forward(prefix, cache)
    backbone.forward([7], cache)
    assert torch.equal(backbone.forward([8], cache).logits[0], native[1][1])
    remove_backend(backbone)


@pytest.mark.skipif(streamed.unavailable_reason() is not None, reason="no C++ toolchain for the streamed kernel")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_cpp_decoder_layer_runs_a_batch_of_rows_at_their_own_lengths_bitwise_as_each_alone(arch):
    """A batch whose rows sit at different cache lengths (10 / 17 / 24 tokens) runs each block as one
    ``decode_layer`` call per layer, and each row's logits (a chain, a tree and a single token, padded
    to 4) are bitwise those of the row decoding alone on the same cache contents; the Python layer
    agrees. Only the 8 real rows run: the 12 padded ones would have left the streamed buckets."""
    from torch.profiler import profile  # noqa: PLC0415

    from decodebench.engine.backbone import BlockLayout  # noqa: PLC0415

    backbone = tiny(arch)
    backends.install_fused_layers(backbone)
    backends._apply_tuned(backbone, hand_table({1: "streamed", 4: "streamed", 8: "streamed", 16: "mkl"}))
    assert backbone.fused_layers[0].native_for(8) and not backbone.fused_layers[0].native_for(12)
    prompts = [list(range(3, 13)), list(range(5, 22)), list(range(7, 31))]
    blocks = [([7, 8, 9, 10], None), ([7, 8, 9], [-1, 0, 0]), ([7], None)]  # padded to 4

    def alone(prompt: list[int], tokens: list[int], parents) -> torch.Tensor:
        cache = backbone.new_cache(64)
        backbone.forward(prompt, cache)
        return backbone.forward(tokens, cache, layout=BlockLayout(parents=parents)).logits

    def batched(traced: list | None = None) -> torch.Tensor:
        cache = backbone.new_cache(64, batch_size=3)
        cache.ensure_capacity(40)
        for row, prompt in enumerate(prompts):  # each row's cache = its prompt's own prefill
            one = backbone.new_cache(64)
            backbone.forward(prompt, one)
            for layer in range(backbone.num_layers):
                cache.keys[layer][row, :, : len(prompt)] = one.keys[layer][0, :, : len(prompt)]
                cache.values[layer][row, :, : len(prompt)] = one.values[layer][0, :, : len(prompt)]
        cache.row_lengths = [[len(prompt) for prompt in prompts]] * backbone.num_layers
        ids = torch.tensor([[*tokens, *[0] * (4 - len(tokens))] for tokens, _ in blocks])
        layouts = [BlockLayout(parents=parents) for _, parents in blocks]
        with profile() as profiler:
            logits = backbone.forward_batch(ids, cache, sizes=[len(t) for t, _ in blocks], layouts=layouts).logits
        if traced is not None:
            traced.extend(event.name for event in profiler.events())
        return logits

    traced: list[str] = []
    native = batched(traced)
    assert traced.count("decodebench::decode_layer") == backbone.num_layers
    for row, (prompt, (tokens, parents)) in enumerate(zip(prompts, blocks)):
        assert torch.equal(native[row, : len(tokens)], alone(prompt, tokens, parents)[: len(tokens)])
    for linear in backends.linears_of(backbone):  # the Python fused layer on the same batch
        linear.kernel_by_rows = ["mkl"] * len(linear.kernel_by_rows)
    python = batched()
    for row, (tokens, _) in enumerate(blocks):
        torch.testing.assert_close(native[row, : len(tokens)], python[row, : len(tokens)], rtol=1e-5, atol=1e-5)
    remove_backend(backbone)


@pytest.mark.slow
@pytest.mark.skipif(streamed.unavailable_reason() is not None, reason="no C++ toolchain for the streamed kernel")
def test_compiled_step_calls_the_streamed_kernel_where_the_table_picks_it():
    from torch.profiler import profile

    backbone = tiny()
    eager_ar = decode(backbone, build_method(MethodConfig()), repeating_prompts()[0], max_new_tokens=24)
    backends._install(backbone, "compiled", [1, 8], hand_table({1: "streamed", 8: "mkl_packed"}))
    backbone.backend = "compiled"
    linear = backends.linears_of(backbone)[0]
    assert linear.kernel_by_rows[1] == "streamed" and linear.kernel_by_rows[8] == "mkl"  # inductor's linear at 8
    assert linear.backend_weights == {}  # no copy: freezing packs bucket 8 inside the graph
    assert backbone.fast_forward.prepack == {1: False, 8: True}
    cache = backbone.new_cache(64)
    backbone.forward([1, 2, 3, 4, 5], cache)
    with profile() as one_token:
        backbone.forward([6], cache)
    assert any(event.name == "decodebench::streamed_linear" for event in one_token.events())
    pld = build_method(
        MethodConfig(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter", params={"num_draft_tokens": 6})
    )
    assert decode(backbone, pld, repeating_prompts()[0], max_new_tokens=24).new_ids == eager_ar.new_ids
    remove_backend(backbone)
    assert type(backends.linears_of(backbone)[0]) is torch.nn.Linear
