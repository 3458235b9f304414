"""EAGLE-3 (``method=eagle3``, :mod:`decodebench.methods.eagle3_net`): the training-time-test unroll on
a tiny model lowers the held-out loss and raises the drafter's own-prediction agreement at the later
unroll steps; greedy output equals AR token for token (trained and untrained, both tiny
architectures, the embedded model with a briefly trained drafter); sampling keeps the target
distribution; checkpoints and the published yuhuili/EAGLE3-* layout load, and a layout made for
another target is refused naming both shapes."""

from __future__ import annotations

import json

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.draft_heads import (
    DraftVocab,
    MissingCheckpointError,
)
from decodebench.methods.eagle3 import Eagle3Drafter
from decodebench.methods.eagle3_net import Eagle3Net, reference_layers
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


def drafter(backbone, cache_dir, **params) -> Eagle3Drafter:
    instance = Eagle3Drafter(Eagle3Drafter.Params(**params))
    instance.setup(backbone, str(cache_dir))
    return instance


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """tiny-llama, an EAGLE-3 drafter (draft vocabulary 60) trained briefly on its own answers, saved in
    a temporary cache; its per-step own-prediction agreement before and after, and the training result."""
    torch.set_num_threads(1)
    backbone = tiny_backbone("llama")
    sequences, counts = own_answers(backbone, random_prompts(24, length=10, seed=3), 40)
    torch.manual_seed(0)
    net = Eagle3Net(backbone, Eagle3Net.Params(draft_vocab_size=60), DraftVocab.most_frequent(counts, 60))
    probe = [net.prepare(s, backbone) for s in sequences[:6]]
    before = net.step_agreement(probe)
    result = train_network(
        net,
        backbone,
        sequences,
        DrafterConfig(name="eagle3", epochs=5, learning_rate=3e-3, validation_fraction=0.2),
        seed=0,
        progress=False,
    )
    after = net.step_agreement(probe)
    cache = tmp_path_factory.mktemp("eagle3")
    save_network(net, backbone, cache)
    return backbone, cache, result, before, after


def test_reference_layers_are_low_middle_high():
    assert reference_layers(32) == [2, 16, 29]  # LLaMA-3.1-8B: the reference's 2, L // 2, L - 3
    assert reference_layers(30) == [2, 15, 27]  # SmolLM2-135M


def test_training_time_test_lowers_loss_and_raises_own_prediction_agreement(trained):
    _, _, result, before, after = trained
    assert len(before) == len(after) == Eagle3Net.Params().ttt_steps == 7
    assert result.after.loss < result.before.loss
    assert result.after.top1_agreement > result.before.top1_agreement and result.best_epoch >= 1
    # steps 1..6 draft from the network's own hidden states: what the unroll trains
    later_before, later_after = sum(before[1:]) / 6, sum(after[1:]) / 6
    assert later_after > later_before + 0.03, (before, after)


@pytest.mark.parametrize("size", ["paper", "small"])
def test_greedy_equals_ar(trained, size):
    backbone, cache, _, _, _ = trained
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
    save_network(Eagle3Net(backbone, Eagle3Net.Params(draft_vocab_size=None)), backbone, tmp_path)
    ar, spec = build_method(MethodConfig()), drafter(backbone, tmp_path, **SMALL)
    assert spec.net.lm_head.weight.shape[0] == backbone.config.vocab_size
    for prompt in random_prompts(2, seed=4):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=24).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
        )


def test_sampling_preserves_target_distribution(tmp_path):
    target, _ = tiny_pair(vocab=5, layers=3)
    torch.manual_seed(2)
    save_network(Eagle3Net(target, Eagle3Net.Params(draft_vocab_size=None)), target, tmp_path)
    spec = drafter(target, tmp_path, total_tokens=5, depth=2, top_k=2)
    params, prompt, runs = SamplingParams(temperature=1.0), [1, 4, 2, 3], 300
    counts, accepted = sample_second_and_third(target, spec, prompt, params, runs)
    assert accepted > 50
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


def test_checkpoint_round_trip_keeps_weights_maps_and_drafts(trained):
    backbone, cache, _, _, _ = trained
    first, second = drafter(backbone, cache, **SMALL), drafter(backbone, cache, **SMALL)
    assert first.net.feature_layers == second.net.feature_layers == [0, 1, 2]
    for key, value in first.net.checkpoint_state().items():
        assert torch.equal(value, second.net.checkpoint_state()[key]), key
    assert int(first.net.t2d.sum()) == 60
    prompt = random_prompts(1, seed=7)[0]
    assert [s.drafted for s in decode(backbone, first, prompt, 24).steps] == [
        s.drafted for s in decode(backbone, second, prompt, 24).steps
    ]


def test_missing_checkpoint_names_the_training_command(tmp_path):
    backbone = tiny_backbone("llama")
    backbone.model_name = "tiny-llama"
    with pytest.raises(MissingCheckpointError, match="decodebench-train drafter=eagle3 model=tiny-llama"):
        Eagle3Drafter(Eagle3Drafter.Params()).setup(backbone, str(tmp_path))


def test_layers_must_be_three_distinct_target_layers():
    backbone = tiny_backbone("llama")
    with pytest.raises(DecodeBenchError, match=r"drafter.params.layers.*\[0, 3\)"):
        Eagle3Net(backbone, Eagle3Net.Params(layers=[0, 1, 5]))


def write_published_eagle3(directory, config, draft_vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A yuhuili/EAGLE3-* folder from raw tensors: LlamaConfig-style config.json + model.safetensors
    with the reference's weight names, d2t / t2d and the target's embedding."""
    from safetensors.torch import save_file

    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "embed_tokens.weight": (vocab, hidden),
        "fc.weight": (hidden, 3 * hidden),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.post_attention_layernorm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (q, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, q),
        "midlayer.mlp.gate_proj.weight": (inter, hidden),
        "midlayer.mlp.up_proj.weight": (inter, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, inter),
        "norm.weight": (hidden,),
        "lm_head.weight": (draft_vocab, hidden),
    }
    state = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    used = torch.randperm(vocab, generator=generator)[:draft_vocab].sort().values  # the reference sorts its ids
    state["d2t"] = used - torch.arange(draft_vocab)
    state["t2d"] = torch.zeros(vocab, dtype=torch.bool)
    state["t2d"][used] = True
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLMEagle3"],
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": 1,
                "vocab_size": vocab,
                "draft_vocab_size": draft_vocab,
                "rms_norm_eps": 1e-5,
                "torch_dtype": "float16",
            }
        )
    )
    return state


def test_published_eagle3_layout_loads_and_stays_lossless(tmp_path):
    backbone = tiny_backbone("llama")
    state = write_published_eagle3(tmp_path / "eagle3-tiny", backbone.config, draft_vocab=40)
    spec = drafter(backbone, tmp_path, checkpoint=str(tmp_path / "eagle3-tiny"), **SMALL)
    assert torch.equal(spec.net.fc.weight, state["fc.weight"])
    assert torch.equal(spec.net.midlayer.self_attn.k_proj.weight, state["midlayer.self_attn.k_proj.weight"])
    assert torch.equal(spec.net.lm_head.weight, state["lm_head.weight"])
    assert torch.equal(spec.net.to_target(torch.arange(40)), torch.nonzero(state["t2d"])[:, 0])
    ar = build_method(MethodConfig())
    for prompt in random_prompts(2, seed=8):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=24).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
        )


@pytest.mark.parametrize("wrong", ["hidden_size", "vocab_size"])
def test_published_eagle3_for_another_target_is_refused(tmp_path, wrong):
    backbone = tiny_backbone("llama")
    write_published_eagle3(tmp_path / "e", backbone.config, draft_vocab=40)
    written = json.loads((tmp_path / "e" / "config.json").read_text())
    written[wrong] += 32
    (tmp_path / "e" / "config.json").write_text(json.dumps(written))
    with pytest.raises(DecodeBenchError, match=f"its {wrong} is {written[wrong]}, the target's is"):
        drafter(backbone, tmp_path, checkpoint=str(tmp_path / "e"))


def test_cpu_preset_is_eagle2s():
    assert method_config("eagle3").resolved_params("cpu") == method_config("eagle2").resolved_params("cpu")


@pytest.mark.slow
def test_embedded_model_with_a_briefly_trained_drafter_is_lossless(tmp_path):
    """SmolLM2-135M: an EAGLE-3 drafter trained for one short epoch on four of the model's own
    answers, then greedy decoding equals AR on two chat prompts (helpers.embedded_lossless)."""
    from helpers import embedded_lossless

    texts = ["Name three colours.", "What is a cat?", "Say hello in French.", "Count to five."]
    backbone, sequences, counts = embedded_own_answers(texts, 16)
    torch.manual_seed(0)
    net = Eagle3Net(
        backbone, Eagle3Net.Params(draft_vocab_size=512, ttt_steps=3), DraftVocab.most_frequent(counts, 512)
    )
    assert net.feature_layers == [2, 15, 27]
    train_network(net, backbone, sequences, DrafterConfig(name="eagle3", epochs=1, validation_fraction=0.25), 0, False)
    save_network(net, backbone, tmp_path)
    accepted, drafted = embedded_lossless("eagle3", cache_dir=tmp_path)
    assert drafted > 0
