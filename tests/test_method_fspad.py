"""FSPAD (``method=fspad``, :mod:`decodebench.methods.fspad_net`): the two components are what the
reference builds (feature sampling's embedding-gated MLP; partial alignment's predict / regress
halves, the token loss never reaching the regress half, the regress half fed back); a short training
on a tiny model lowers the loss and raises held-out agreement; greedy output equals AR token for
token (trained and untrained, both tiny architectures, the embedded model with a briefly trained
drafter); sampling keeps the target distribution; checkpoints round-trip, and an EAGLE checkpoint is
refused by name (and an FSPAD one by ``method=eagle2``)."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.draft_heads import (
    DraftVocab,
    MissingCheckpointError,
    checkpoint_dir,
    model_key,
)
from decodebench.methods.eagle import Eagle2Drafter
from decodebench.methods.eagle_net import EagleNet
from decodebench.methods.fspad import FspadDrafter
from decodebench.methods.fspad_net import FspadNet
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

SMALL = dict(total_tokens=6, depth=3, top_k=4)


def drafter(backbone, cache_dir, cls=FspadDrafter, **params):
    instance = cls(cls.Params(**params))
    instance.setup(backbone, str(cache_dir))
    return instance


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-llama, an FSPAD drafter (draft vocabulary 60) trained briefly on its own answers, saved in
    a temporary cache, and the training result."""
    torch.set_num_threads(1)
    backbone = tiny_backbone("llama")
    sequences, counts = own_answers(backbone, random_prompts(24, length=10, seed=3), 40)
    torch.manual_seed(0)
    net = FspadNet(backbone, FspadNet.Params(draft_vocab_size=60), DraftVocab.most_frequent(counts, 60))
    result = train_network(
        net,
        backbone,
        sequences,
        DrafterConfig(name="fspad", epochs=10, learning_rate=3e-3, validation_fraction=0.2),
        seed=0,
        progress=False,
    )
    cache = tmp_path_factory.mktemp("fspad")
    save_network(net, backbone, cache)
    return backbone, cache, result, sequences


def test_the_two_components_add_the_reference_shapes():
    """Feature sampling adds gate/up (h → I), down (I → h) and a norm; partial alignment widens the
    layer's down projection to 2h. Both off is EAGLE's network, weight for weight."""
    backbone = tiny_backbone("llama")
    hidden, inter = backbone.config.hidden_size, backbone.config.intermediate_size
    eagle = EagleNet(backbone, EagleNet.Params())
    plain = FspadNet(backbone, FspadNet.Params(feature_sampling=False, partial_alignment=False))
    assert {k: v.shape for k, v in plain.checkpoint_state().items()} == {
        k: v.shape for k, v in eagle.checkpoint_state().items()
    }
    full = FspadNet(backbone, FspadNet.Params())
    extra = sum(v.numel() for v in full.checkpoint_state().values()) - sum(
        v.numel() for v in eagle.checkpoint_state().values()
    )
    assert extra == 3 * hidden * inter + hidden + inter * hidden
    assert full.layers[0].mlp.down_proj.weight.shape == (2 * hidden, inter)


def test_the_token_loss_reaches_predict_only_and_regress_is_fed_back(trained):
    backbone, _, _, sequences = trained
    torch.manual_seed(0)
    net = FspadNet(backbone, FspadNet.Params(feature_weight=0.0))  # token loss alone
    hidden = backbone.config.hidden_size
    loss, _ = net.loss(sequences[0], backbone, noise=False)
    loss.backward()
    grad = net.layers[0].mlp.down_proj.weight.grad
    assert grad[:hidden].abs().sum() > 0 and torch.count_nonzero(grad[hidden:]) == 0
    output = torch.randn(3, 2 * hidden)
    assert torch.equal(net.next_feature(output), output[:, hidden:])
    assert torch.equal(net.draft_logits(output), net.head(output[:, :hidden]).float())
    # the token embedding gates the sampled feature: same fc output, another token, another input
    features, tokens = sequences[0].features[:2], sequences[0].ids[1:3]
    with torch.no_grad():
        embed = net._target["embed"]
        one = net.layer_input(embed(tokens), features)
        other = net.layer_input(embed(tokens.flip(0)), features.flip(0)).flip(0)
        fc_only = net.fc(torch.cat([embed(tokens), features], -1))
    assert not torch.allclose(one, fc_only) and torch.allclose(one, other)


def test_training_lowers_loss_and_raises_agreement(trained):
    _, _, result, _ = trained
    assert result.after.loss < result.before.loss
    assert result.after.top1_agreement > result.before.top1_agreement and result.best_epoch >= 1


@pytest.mark.parametrize("size", ["paper", "small"])
def test_greedy_equals_ar(trained, size):
    backbone, cache, _, _ = trained
    ar = build_method(MethodConfig())
    spec = drafter(backbone, cache, **({} if size == "paper" else SMALL))
    accepted = 0
    for prompt in [*repeating_prompts()[:2], *random_prompts(2, seed=99)]:
        reference = decode(backbone, ar, prompt, max_new_tokens=40)
        out = decode(backbone, spec, prompt, max_new_tokens=40)
        assert out.new_ids == reference.new_ids
        assert all(s.drafted <= (59 if size == "paper" else 5) for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    assert accepted > 0  # the drafts are verified and some are taken


def test_untrained_full_vocabulary_is_lossless_on_qwen2(tmp_path):
    backbone = tiny_backbone("qwen2")
    torch.manual_seed(1)
    save_network(FspadNet(backbone, FspadNet.Params()), backbone, tmp_path)
    ar, spec = build_method(MethodConfig()), drafter(backbone, tmp_path, **SMALL)
    for prompt in random_prompts(2, seed=4):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=24).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
        )


def test_sampling_preserves_target_distribution(tmp_path):
    target, _ = tiny_pair(vocab=5, layers=3)
    torch.manual_seed(2)
    save_network(FspadNet(target, FspadNet.Params()), target, tmp_path)
    spec = drafter(target, tmp_path, total_tokens=5, depth=2, top_k=2)
    params, prompt, runs = SamplingParams(temperature=1.0), [1, 4, 2, 3], 300
    counts, accepted = sample_second_and_third(target, spec, prompt, params, runs)
    assert accepted > 50
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


def test_checkpoint_round_trip_keeps_weights_and_drafts(trained):
    backbone, cache, _, _ = trained
    first, second = drafter(backbone, cache, **SMALL), drafter(backbone, cache, **SMALL)
    for key, value in first.net.checkpoint_state().items():
        assert torch.equal(value, second.net.checkpoint_state()[key]), key
    prompt = random_prompts(1, seed=7)[0]
    assert [s.drafted for s in decode(backbone, first, prompt, 24).steps] == [
        s.drafted for s in decode(backbone, second, prompt, 24).steps
    ]


def test_an_eagle_checkpoint_is_refused_by_name_and_the_other_way_round(trained, tmp_path):
    backbone, cache, _, _ = trained
    fspad_dir = checkpoint_dir(str(cache), model_key(backbone), "fspad")
    with pytest.raises(DecodeBenchError, match="holds a fspad drafter, not the eagle drafter"):
        drafter(backbone, cache, Eagle2Drafter, checkpoint=str(fspad_dir))
    torch.manual_seed(0)
    save_network(EagleNet(backbone, EagleNet.Params()), backbone, tmp_path)
    with pytest.raises(DecodeBenchError, match="holds a eagle drafter, not the fspad drafter"):
        drafter(backbone, cache, checkpoint=str(checkpoint_dir(str(tmp_path), model_key(backbone), "eagle")))


def test_missing_checkpoint_names_the_training_command(tmp_path):
    backbone = tiny_backbone("llama")
    backbone.model_name = "tiny-llama"
    with pytest.raises(MissingCheckpointError, match="decodebench-train drafter=fspad model=tiny-llama"):
        FspadDrafter(FspadDrafter.Params()).setup(backbone, str(tmp_path))


def test_cpu_preset_is_eagle2s():
    assert method_config("fspad").resolved_params("cpu") == method_config("eagle2").resolved_params("cpu")


@pytest.mark.slow
def test_embedded_model_with_a_briefly_trained_drafter_is_lossless(tmp_path):
    """SmolLM2-135M: an FSPAD drafter trained for one short epoch on four of the model's own answers,
    then greedy decoding equals AR on two chat prompts (helpers.embedded_lossless)."""
    from helpers import embedded_lossless

    texts = ["Name three colours.", "What is a cat?", "Say hello in French.", "Count to five."]
    backbone, sequences, counts = embedded_own_answers(texts, 16)
    torch.manual_seed(0)
    net = FspadNet(backbone, FspadNet.Params(draft_vocab_size=512), DraftVocab.most_frequent(counts, 512))
    train_network(net, backbone, sequences, DrafterConfig(name="fspad", epochs=1, validation_fraction=0.25), 0, False)
    save_network(net, backbone, tmp_path)
    accepted, drafted = embedded_lossless("fspad", cache_dir=tmp_path)
    assert drafted > 0
