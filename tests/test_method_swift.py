"""SWIFT: sublayer skipping in the Backbone, the layer-set search (random + Bayesian), the skip set
cached per model x task, the confidence-dependent candidate tree, greedy = AR token for token,
sampling keeps the target distribution, and the embedded model stays lossless."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, compose_run_config
from decodebench.engine.backbone import Backbone, ForwardPlan
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.swift import PrefixView, SwiftDrafter, candidate_count
from decodebench.methods.swift_search import LayerSetSearch, SearchSettings, SkipSet, initial_skip_set, load_skip_set

from helpers import chi_square_p_value, embedded_lossless, exact_second_and_third, random_prompts
from helpers import damped_tiny as helpers_damped_tiny
from helpers import decode as helpers_decode

IMPL = "decodebench.methods.swift:SwiftDrafter"


def damped_tiny(arch: str = "llama", layers: int = 6, vocab: int = 101, factor: float = 0.2, seed: int = 0) -> Backbone:
    """helpers.damped_tiny with the middle layers (1 .. L-2) damped: SWIFT skips middle layers."""
    return helpers_damped_tiny(arch, layers, vocab, damped=slice(1, -1), factor=factor, seed=seed)


prompts = random_prompts  # tests/helpers.py


# helpers.decode with the 40 new tokens this file's expectations were written for
decode = functools.partial(helpers_decode, max_new_tokens=40)


def drafter_for(backbone, cache_dir, **params) -> SwiftDrafter:
    drafter = build_method(MethodConfig(name="swift", impl=IMPL, params=params))
    drafter.setup(backbone, str(cache_dir))
    return drafter


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# -- Backbone sublayer skipping ---------------------------------------------------------------------
def test_backbone_skips_attention_and_mlp_sublayers():
    backbone = damped_tiny()
    ids = prompts(1)[0]
    full = backbone.forward(ids, backbone.new_cache(16))
    same = backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(skip_attention=set(), skip_mlp=set()))
    torch.testing.assert_close(same.logits, full.logits)
    cache = backbone.new_cache(16)
    skipped = backbone.forward(ids, cache, plan=ForwardPlan(skip_attention={2}, skip_mlp={2, 3}))
    assert cache.lengths == [12, 12, 0, 12, 12, 12]  # a skipped attention writes no K/V
    assert not torch.allclose(skipped.logits, full.logits)
    # skipping layer 2 entirely equals running the layer subset without it
    subset = backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(layers=[0, 1, 3, 4, 5]))
    whole = backbone.forward(ids, backbone.new_cache(16), plan=ForwardPlan(skip_attention={2}, skip_mlp={2}))
    torch.testing.assert_close(whole.logits, subset.logits, rtol=1e-5, atol=1e-5)


def test_prefix_view_scores_without_touching_the_cache():
    backbone = damped_tiny()
    ids = prompts(1)[0]
    cache = backbone.new_cache(16)
    backbone.forward(ids, cache)
    keys = [k[:, :, :12].clone() for k in cache.keys]
    out = backbone.forward([5, 6, 7], PrefixView(cache, 8), logits_rows=slice(0, 3))
    reference = backbone.forward([*ids[:8], 5, 6, 7], backbone.new_cache(16)).logits[8:]
    torch.testing.assert_close(out.logits, reference, rtol=1e-4, atol=1e-4)
    assert cache.lengths == [12] * 6 and all(torch.equal(k[:, :, :12], old) for k, old in zip(cache.keys, keys))


# -- skip sets and the search ------------------------------------------------------------------------
def test_skip_set_names_and_coordinates():
    parsed = SkipSet.parse(["a1", "m3", "a4"], num_layers=6)
    assert parsed == SkipSet(frozenset({1, 4}), frozenset({3}))
    assert parsed.names() == ["a1", "a4", "m3"]
    point = parsed.point(6)
    chosen = [int(k[1:]) for k, v in point.items() if v == 1.0]
    assert SkipSet.from_coordinates(chosen, 6) == parsed
    assert initial_skip_set(6) == SkipSet(frozenset({1, 3}), frozenset({1, 3}))
    for bad in (["a0"], ["m5"], ["x2"]):  # first / last layer never skipped
        with pytest.raises(ConfigValueError, match="skip_set"):
            SkipSet.parse(bad, num_layers=6)
    with pytest.raises(ConfigValueError, match="skip_set"):
        build_method(MethodConfig(name="swift", impl=IMPL, params=dict(skip_set="sometimes")))


def test_search_uses_bayes_every_interval_and_stops():
    search = LayerSetSearch(
        8, SearchSettings(skip_ratio=0.45, bayes_interval=5, max_opt_iter=30, max_tolerance_iter=1000, max_score=2.0)
    )
    sizes, bayes_calls = [], 0
    original = search.optimizer.suggest

    def counting_suggest():
        nonlocal bayes_calls
        bayes_calls += 1
        return original()

    search.optimizer.suggest = counting_suggest
    while search.active:
        search.step(lambda s: sizes.append(len(s)) or len(s.mlp) / 6)  # reward skipping MLPs
    assert search.iterations == 31 and bayes_calls == 6
    assert set(sizes) == {int(12 * 0.45)}
    assert search.best_score == max(len(s.mlp) / 6 for s in [search.best])
    # the score threshold stops it at once
    quick = LayerSetSearch(8, SearchSettings(max_score=0.5))
    quick.step(lambda s: 0.9)
    assert not quick.active and quick.best_score == 0.9


def test_candidate_tree_width_follows_confidence():
    thresholds, counts = [0.95, 0.8, 0.5], [3, 5, 8, 10]
    assert [candidate_count(p, thresholds, counts) for p in (0.99, 0.9, 0.6, 0.1)] == [3, 5, 8, 10]


# -- lossless decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "params",
    [
        dict(context_window=8, bayes_interval=5, stop_threshold=0.0, max_draft_steps=4),  # auto: search runs
        dict(skip_set=["a2", "m3", "a4"], stop_threshold=0.0, max_draft_steps=6),  # fixed set, deep trees
        dict(skip_set=["m1"], candidates_greedy=[1, 1, 1, 1], stop_threshold=0.0, max_draft_steps=5),  # chains
        dict(),  # paper defaults (confidence stop at 0.8, trees 3/5/8/10)
    ],
    ids=["auto", "list", "chain", "paper"],
)
def test_swift_greedy_equals_ar(arch, params, tmp_path):
    backbone = damped_tiny(arch)
    ar = build_method(MethodConfig())
    drafter = drafter_for(backbone, tmp_path, **params)
    accepted = 0
    for prompt in prompts(3):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == decode(backbone, ar, prompt).new_ids
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 10
    if params.get("context_window"):
        assert drafter.search.iterations > 0 and drafter.skip == drafter.search.best


def test_optimised_set_is_cached_per_model_and_task(tmp_path):
    backbone = damped_tiny()
    drafter = drafter_for(backbone, tmp_path, context_window=8, task="gsm8k", max_opt_iter=3)
    for prompt in prompts(2):
        decode(backbone, drafter, prompt)
    assert not drafter.search.active  # stopped after max_opt_iter
    path = drafter.cache_file
    assert path.parent == tmp_path / "swift" and "gsm8k" in path.name
    stored = json.loads(path.read_text())
    assert stored["num_layers"] == 6 and stored["iterations"] == 4 and stored["finished"]
    assert load_skip_set(path, 6) == drafter.search.best
    cached = drafter_for(backbone, tmp_path, skip_set="cached", task="gsm8k")
    assert cached.skip == drafter.search.best and cached.search is None
    prompt = prompts(1)[0]
    assert decode(backbone, cached, prompt).new_ids == decode(backbone, build_method(MethodConfig()), prompt).new_ids
    with pytest.raises(ConfigValueError, match="skip_set=auto first"):
        drafter_for(backbone, tmp_path, skip_set="cached", task="humaneval")


def test_reset_state_restarts_the_search(tmp_path):
    backbone = damped_tiny()
    drafter = drafter_for(backbone, tmp_path, context_window=8)
    decode(backbone, drafter, prompts(1)[0])
    assert drafter.search.iterations > 0
    drafter.reset_state()
    assert drafter.search.iterations == 0 and drafter.skip == initial_skip_set(6)


def test_config_interpolates_the_task_name():
    cfg = compose_run_config(["method=swift", "task=gsm8k", "model=tiny-llama"])
    drafter = build_method(cfg.method, "cpu")
    assert drafter.params.task == "gsm8k" and drafter.params.context_window == 16
    assert method_config("swift").resolved_params("cuda")["candidates_greedy"] == [3, 5, 8, 10]
    assert build_method(method_config("swift")).params.task == "default"  # YAML read outside Hydra


# -- sampling: the target distribution is preserved -------------------------------------------


def test_swift_tree_sampling_preserves_target_distribution(tmp_path):
    """Siblings drawn without replacement, each verified against its own residual row."""
    backbone = damped_tiny(layers=4, vocab=5, factor=0.5)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    drafter = drafter_for(
        backbone,
        tmp_path,
        skip_set=["a1", "m2"],
        stop_threshold=0.0,
        max_draft_steps=3,
        candidates_sampling=[2, 2, 2, 3],
    )
    counts, accepted, tree_steps = torch.zeros(25), 0, 0
    for seed in range(400):
        out = decode(backbone, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * 5 + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
        tree_steps += sum(s.drafted > 3 for s in out.steps)
    assert accepted > 100 and tree_steps > 100
    assert chi_square_p_value(counts, exact_second_and_third(backbone, prompt, params)) > 1e-3


# -- the embedded model ---------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_model_swift_is_lossless(tmp_path):
    accepted, drafted = embedded_lossless("swift", tmp_path)
    assert accepted > 0 and drafted > accepted
