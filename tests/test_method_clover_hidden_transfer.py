"""Clover and Hidden Transfer on the training pipeline: a short training run on a tiny model lowers
the held-out loss and raises top-1 agreement; greedy output equals AR token for token (trained and
untrained networks); Hidden Transfer's pseudo states never change the real tokens' logits or K/V;
sampling keeps the target distribution; checkpoints round-trip; bad settings are clear errors."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.backbone import BlockLayout
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method
from decodebench.methods.clover import CloverDrafter
from decodebench.methods.clover_net import CloverNet
from decodebench.methods.draft_heads import (
    DraftVocab,
    MissingCheckpointError,
)
from decodebench.methods.hidden_transfer import HiddenTransferDrafter
from decodebench.methods.hidden_transfer_net import HiddenTransferNet
from decodebench.registry import DecodeBenchError
from decodebench.training.config import DrafterConfig
from decodebench.training.trainer import train_network

from helpers import (
    chi_square_p_value,
    decode,
    embedded_own_answers,
    exact_second_and_third,
    own_answers,
    random_prompts,
    repeating_prompts,
    sample_second_and_third,
    save_network,
    tiny_backbone,
    tiny_pair,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NETWORKS = {"clover": CloverNet, "hidden_transfer": HiddenTransferNet}
DRAFTERS = {"clover": CloverDrafter, "hidden_transfer": HiddenTransferDrafter}
LEARNING_RATES = {"clover": 1e-3, "hidden_transfer": 3e-3}


def corpus(backbone, count: int = 16, answer_tokens: int = 32):
    return own_answers(backbone, random_prompts(count, length=10, seed=3), answer_tokens)


def drafter(name: str, backbone, cache_dir: str, **params):
    cls = DRAFTERS[name]
    instance = cls(cls.Params(**params))
    instance.setup(backbone, cache_dir)
    return instance


def scramble(net) -> None:
    """Random weights for the trainable matrices of the attention decoder / transfer layers. Their
    pass-through initialisation (Clover's part-eye fc, identity transfer maps) already predicts
    "the token repeats", which the tiny random model's greedy answers mostly do (agreement ~0.4
    before any training); from a random start, a rise in held-out agreement shows learning."""
    torch.manual_seed(1)
    for name, parameter in net.named_parameters():
        if ("transfer" in name or "decoder" in name) and parameter.dim() == 2:
            torch.nn.init.normal_(parameter, std=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny llama, Clover (reduced draft vocabulary) and Hidden Transfer trained briefly from a
    random start on its own answers in a temporary cache, and the training results."""
    torch.set_num_threads(1)
    backbone = tiny_backbone("llama", num_hidden_layers=4)
    sequences, counts = corpus(backbone, count=24)
    cache = tmp_path_factory.mktemp("drafters-clover")
    results = {}
    for name, cls in NETWORKS.items():
        vocab = DraftVocab.most_frequent(counts, 60) if name == "clover" else None
        params = cls.Params(draft_vocab_size=60) if name == "clover" else cls.Params()
        torch.manual_seed(0)
        net = cls(backbone, params, vocab)
        scramble(net)
        results[name] = train_network(
            net,
            backbone,
            sequences,
            DrafterConfig(name=name, epochs=4, learning_rate=LEARNING_RATES[name], validation_fraction=0.25),
            seed=0,
            progress=False,
        )
        save_network(net, backbone, cache)
    return backbone, str(cache), results


@pytest.mark.parametrize("name", list(NETWORKS))
def test_short_training_lowers_loss_and_raises_agreement(trained, name):
    result = trained[2][name]
    assert result.after.loss < result.before.loss
    assert result.after.top1_agreement > result.before.top1_agreement
    assert result.best_epoch >= 1 and result.steps > 0


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("nodes", [63, 4])
def test_trained_greedy_equals_ar(trained, name, nodes):
    backbone, cache_dir, _ = trained
    ar, spec = build_method(MethodConfig()), drafter(name, backbone, cache_dir, tree_nodes=nodes)
    accepted = 0
    for prompt in [*repeating_prompts()[:2], *random_prompts(2, seed=99)]:
        reference = decode(backbone, ar, prompt, max_new_tokens=32)
        out = decode(backbone, spec, prompt, max_new_tokens=32)
        assert out.new_ids == reference.new_ids
        accepted += sum(s.accepted for s in out.steps)
    assert accepted > 0  # the drafts are verified and some are taken


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_untrained_networks_are_lossless(name, arch, tmp_path):
    backbone = tiny_backbone(arch)
    torch.manual_seed(1)
    cls = NETWORKS[name]
    save_network(cls(backbone, cls.Params()), backbone, tmp_path)
    ar, spec = build_method(MethodConfig()), drafter(name, backbone, str(tmp_path), tree_nodes=8)
    for prompt in random_prompts(2, seed=4):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=20).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=20).new_ids
        )


def test_pseudo_states_leave_the_real_forward_exact(tmp_path):
    """Hidden Transfer's one forward: real rows' logits and committed K/V equal a plain tree forward."""
    backbone = tiny_backbone("llama", num_hidden_layers=4)
    torch.manual_seed(3)
    net = HiddenTransferNet(backbone, HiddenTransferNet.Params(transfer_layer=2, num_future=2))
    for linear in net.transfer:
        torch.nn.init.normal_(linear.weight, std=0.3)
    save_network(net, backbone, tmp_path)
    spec = drafter("hidden_transfer", backbone, str(tmp_path))
    prompt, block, parents = [5, 9, 11, 3, 7], [4, 8, 6, 10], [-1, 0, 0, 1]
    plain, fused = backbone.new_cache(64), backbone.new_cache(64)
    for cache in (plain, fused):
        backbone.forward(prompt, cache)
    reference = backbone.forward(block, plain, layout=BlockLayout(parents=parents))
    out = spec.verify_forward(block, parents, fused)
    assert out.logits.shape[0] == len(block) * (1 + 2)
    torch.testing.assert_close(out.logits[: len(block)], reference.logits, rtol=1e-5, atol=1e-5)
    for cache in (plain, fused):
        cache.compact(len(prompt), [0, 1, 3])
    assert fused.lengths == plain.lengths
    for layer in range(backbone.num_layers):
        n = plain.lengths[layer]
        torch.testing.assert_close(fused.keys[layer][:, :, :n], plain.keys[layer][:, :, :n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_sampling_preserves_target_distribution(name, tmp_path):
    target, _ = tiny_pair(vocab=5, layers=2)
    torch.manual_seed(2)
    cls = NETWORKS[name]
    save_network(
        cls(target, cls.Params(transfer_layer=1) if name == "hidden_transfer" else cls.Params()), target, tmp_path
    )
    spec = drafter(name, target, str(tmp_path), tree_nodes=5)
    params, prompt, runs = SamplingParams(temperature=1.0), [1, 4, 2, 3], 300
    counts, accepted = sample_second_and_third(target, spec, prompt, params, runs)
    assert accepted > 30
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_checkpoint_round_trip(trained, name):
    backbone, cache_dir, _ = trained
    first, second = drafter(name, backbone, cache_dir), drafter(name, backbone, cache_dir)
    for key, value in first.net.checkpoint_state().items():
        assert torch.equal(value, second.net.checkpoint_state()[key]), key


def test_missing_checkpoint_and_bad_settings_are_clear(tmp_path):
    backbone = tiny_backbone("llama")
    backbone.model_name = "tiny-llama"
    for name, cls in DRAFTERS.items():
        with pytest.raises(MissingCheckpointError, match=f"decodebench-train drafter={name} model=tiny-llama"):
            cls(cls.Params()).setup(backbone, str(tmp_path))
    with pytest.raises(DecodeBenchError, match="transfer_layer=9 must be in"):
        HiddenTransferNet(backbone, HiddenTransferNet.Params(transfer_layer=9))
    with pytest.raises(DecodeBenchError, match="draft_vocab_size does not apply"):
        HiddenTransferNet(backbone, HiddenTransferNet.Params(), DraftVocab.most_frequent(torch.ones(10), 4))


CORPUS_PROMPTS = [
    "Name three colours of the rainbow.",
    "What is the capital of France? Answer briefly.",
    "Give one tip for writing clear code.",
    "Describe a cat in one sentence.",
]


@pytest.fixture(scope="module")
def embedded_drafters(tmp_path_factory):
    """Clover and Hidden Transfer trained for one epoch on SmolLM2-135M's answers to 4 prompts (a
    few seconds; enough for drafts that are sometimes right), saved in a temporary cache."""
    torch.set_num_threads(1)
    backbone, sequences, counts = embedded_own_answers(CORPUS_PROMPTS, 32, stop_at_eos=True)
    cache = tmp_path_factory.mktemp("drafters-embedded")
    for name, cls in NETWORKS.items():
        vocab = DraftVocab.most_frequent(counts, 1024) if name == "clover" else None
        torch.manual_seed(0)
        net = cls(backbone, cls.Params(draft_vocab_size=1024) if name == "clover" else cls.Params(), vocab)
        train_network(
            net,
            backbone,
            sequences,
            DrafterConfig(name=name, epochs=1, learning_rate=1e-3, validation_fraction=0.25),
            seed=0,
            progress=False,
        )
        save_network(net, backbone, cache)
    return cache


@pytest.mark.parametrize("name", list(DRAFTERS))
def test_embedded_model_with_trained_drafter_is_lossless(embedded_drafters, name):
    from helpers import embedded_lossless

    accepted, drafted = embedded_lossless(name, cache_dir=embedded_drafters)
    assert drafted > 0 and accepted > 0
