"""Engine equivalence: our own layer loop + KV cache + tree masks reproduce the HF model (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from decodebench.engine.backbone import Backbone, BlockLayout, ForwardPlan
from decodebench.engine.tree import ancestor_mask, tree_depths

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)
CONFIGS = {
    "llama": lambda attn: LlamaConfig(**TINY, attn_implementation=attn),
    "qwen2": lambda attn: Qwen2Config(**TINY, attention_bias=True, attn_implementation=attn),
    "mistral": lambda attn: MistralConfig(**TINY, sliding_window=None, attn_implementation=attn),
}
ATOL = 1e-4


def tiny_model(arch: str, attn: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = CONFIGS[arch](attn)
    for key, value in overrides.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(
    params=[("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("mistral", "sdpa")], ids=lambda p: "-".join(p)
)
def model(request):
    arch, attn = request.param
    return tiny_model(arch, attn)


def test_prefill_equals_hf(model):
    ids = torch.randint(0, 97, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    backbone = Backbone(model)
    cache = backbone.new_cache(8)  # too small on purpose: the cache must grow
    out = backbone.forward(ids, cache)
    torch.testing.assert_close(out.logits, hf_logits(model, ids), atol=ATOL, rtol=0)
    assert cache.lengths == [23] * backbone.num_layers


def test_cached_chain_steps_equal_hf(model):
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2)).tolist()
    reference = hf_logits(model, ids)
    backbone = Backbone(model)
    cache = backbone.new_cache(64)
    backbone.forward(ids[:10], cache)
    # one token at a time, then a 5-token chain, then the rest
    for i in range(10, 15):
        out = backbone.forward([ids[i]], cache)
        torch.testing.assert_close(out.logits[0], reference[i], atol=ATOL, rtol=0)
    out = backbone.forward(ids[15:20], cache)
    torch.testing.assert_close(out.logits, reference[15:20], atol=ATOL, rtol=0)
    out = backbone.forward(ids[20:], cache, logits_rows=slice(-1, None))
    torch.testing.assert_close(out.logits[0], reference[-1], atol=ATOL, rtol=0)


def test_tree_step_equals_each_branch_as_a_chain(model):
    """A tree block gives every node the logits of its root-to-node path run as a chain."""
    prefix = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    #        node: 0   1   2   3   4   5   6
    tokens = [5, 17, 23, 42, 8, 61, 33]
    parents = [-1, 0, 0, 1, 1, 2, 5]
    backbone = Backbone(model)
    cache = backbone.new_cache(64)
    backbone.forward(prefix, cache)
    tree = backbone.forward(tokens, cache, layout=BlockLayout(parents=parents))
    mask = ancestor_mask(parents)
    for node in range(len(tokens)):
        path = [tokens[j] for j in range(node + 1) if mask[node, j]]
        torch.testing.assert_close(tree.logits[node], hf_logits(model, prefix + path)[-1], atol=ATOL, rtol=0)


def test_compact_keeps_accepted_path(model):
    """After compacting a tree to one path, continuing equals running that path as a chain."""
    prefix = [3, 14, 15, 92, 65, 35]
    tokens = [5, 17, 23, 42, 8, 61, 33]
    parents = [-1, 0, 0, 1, 1, 2, 5]
    backbone = Backbone(model)
    cache = backbone.new_cache(64)
    backbone.forward(prefix, cache)
    base = cache.length
    backbone.forward(tokens, cache, layout=BlockLayout(parents=parents))
    cache.compact(base, [0, 2, 5])  # path 5 -> 23 -> 61
    out = backbone.forward([77], cache)
    expected = hf_logits(model, prefix + [5, 23, 61, 77])[-1]
    torch.testing.assert_close(out.logits[0], expected, atol=ATOL, rtol=0)


def test_crop_then_continue(model):
    ids = [7, 1, 4, 9, 33, 2, 8, 11, 40]
    backbone = Backbone(model)
    cache = backbone.new_cache(32)
    backbone.forward(ids, cache)
    cache.crop(5)
    out = backbone.forward([50, 51], cache)
    torch.testing.assert_close(out.logits, hf_logits(model, ids[:5] + [50, 51])[-2:], atol=ATOL, rtol=0)


def test_layer_subset_leaves_per_layer_lengths():
    model = tiny_model("llama")
    backbone = Backbone(model)
    cache = backbone.new_cache(32)
    backbone.forward([1, 2, 3], cache)
    backbone.forward([4], cache, plan=ForwardPlan(layers=[0, 2]))
    assert cache.lengths == [4, 3, 4]
    hidden = backbone.forward([5], cache, output_hidden_states=True, layout=BlockLayout(start=4)).hidden_states
    assert len(hidden) == backbone.num_layers + 1


def test_sliding_window_matches_hf():
    model = tiny_model("mistral", sliding_window=8)
    ids = torch.randint(0, 97, (20,), generator=torch.Generator().manual_seed(4)).tolist()
    reference = hf_logits(model, ids)
    backbone = Backbone(model)
    cache = backbone.new_cache(64)
    out = backbone.forward(ids[:14], cache)
    torch.testing.assert_close(out.logits, reference[:14], atol=ATOL, rtol=0)
    out = backbone.forward(ids[14:], cache)
    torch.testing.assert_close(out.logits, reference[14:], atol=ATOL, rtol=0)


def test_tree_helpers():
    parents = [-1, 0, 0, 1, 3]
    assert tree_depths(parents) == [0, 1, 1, 2, 3]
    mask = ancestor_mask(parents)
    assert mask[4].tolist() == [True, True, False, True, True]
    with pytest.raises(ValueError):
        Backbone(tiny_model("llama")).forward(
            [1, 2], Backbone(tiny_model("llama")).new_cache(4), layout=BlockLayout(parents=[-1, 1])
        )
