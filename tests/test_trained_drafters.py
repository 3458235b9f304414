"""Trained drafters (EAGLE, EAGLE-2, Medusa, Hydra) on the one decode loop: a short training run on a
tiny model lowers the held-out loss and raises top-1 agreement; every method's greedy output equals
AR token for token (trained and untrained networks, full and reduced draft vocabulary); sampling
keeps the target distribution; checkpoints round-trip; a missing checkpoint names its command."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.draft_heads import (
    DraftVocab,
    MissingCheckpointError,
)
from decodebench.methods.eagle import Eagle2Drafter, EagleDrafter
from decodebench.methods.eagle_net import EagleNet
from decodebench.methods.medusa import HydraDrafter, MedusaDrafter
from decodebench.methods.medusa_heads import HydraHeads, MedusaHeads
from decodebench.training.config import DrafterConfig
from decodebench.training.trainer import train_network

from helpers import (
    chi_square_p_value,
    decode,
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

NETWORKS = {"eagle": EagleNet, "medusa": MedusaHeads, "hydra": HydraHeads}
METHODS = {
    "eagle": (EagleDrafter, "eagle"),
    "eagle2": (Eagle2Drafter, "eagle"),
    "medusa": (MedusaDrafter, "medusa"),
    "hydra": (HydraDrafter, "hydra"),
}


def corpus(backbone, count: int = 24, answer_tokens: int = 40):
    return own_answers(backbone, random_prompts(count, length=10, seed=3), answer_tokens)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory):
    """A tiny model, EAGLE / Medusa / Hydra networks trained briefly on its own answers (EAGLE with a
    reduced draft vocabulary) in a temporary cache, and the training results."""
    torch.set_num_threads(1)
    backbone = tiny_backbone(request.param)
    sequences, counts = corpus(backbone)
    cache = tmp_path_factory.mktemp(f"drafters-{request.param}")
    results = {}
    for name, cls in NETWORKS.items():
        vocab = DraftVocab.most_frequent(counts, 60) if name == "eagle" else None
        torch.manual_seed(0)
        net = cls(backbone, cls.Params(draft_vocab_size=None if vocab is None else vocab.size), vocab)
        results[name] = train_network(
            net,
            backbone,
            sequences,
            DrafterConfig(name=name, epochs=5, learning_rate=3e-3, validation_fraction=0.2),
            seed=0,
            progress=False,
        )
        save_network(net, backbone, cache)
    return backbone, str(cache), results


def drafter(name: str, backbone, cache_dir: str, **params):
    cls, _ = METHODS[name]
    instance = cls(cls.Params(**params))
    instance.setup(backbone, cache_dir)
    return instance


def test_short_training_lowers_loss_and_raises_agreement(trained):
    _, _, results = trained
    eagle = results["eagle"]
    assert eagle.after.loss < eagle.before.loss
    assert eagle.after.top1_agreement > eagle.before.top1_agreement
    assert eagle.best_epoch >= 1 and eagle.steps > 0


SMALL = {
    "eagle": dict(tree_nodes=5),
    "eagle2": dict(total_tokens=6, depth=3, top_k=4),
    "medusa": dict(tree_nodes=5),
    "hydra": dict(tree_nodes=5),
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("size", ["paper", "small"])
def test_greedy_equals_ar(trained, method, size):
    backbone, cache_dir, _ = trained
    ar = build_method(MethodConfig())
    spec = drafter(method, backbone, cache_dir, **({} if size == "paper" else SMALL[method]))
    accepted = 0
    for prompt in [*repeating_prompts()[:3], *random_prompts(2, seed=99)]:
        reference = decode(backbone, ar, prompt, max_new_tokens=40)
        out = decode(backbone, spec, prompt, max_new_tokens=40)
        assert out.new_ids == reference.new_ids
        assert all(s.drafted <= 63 for s in out.steps)
        accepted += sum(s.accepted for s in out.steps)
    assert accepted > 0  # the drafts are verified and some are taken


@pytest.mark.parametrize("method", list(METHODS))
def test_untrained_networks_are_lossless_too(method, tmp_path):
    backbone = tiny_backbone("llama")
    torch.manual_seed(1)
    network = NETWORKS[METHODS[method][1]]
    save_network(network(backbone, network.Params()), backbone, tmp_path)
    ar, spec = build_method(MethodConfig()), drafter(method, backbone, str(tmp_path))
    for prompt in random_prompts(2, seed=4):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=24).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
        )


@pytest.mark.skipif(not (torch._C.has_mkl and torch.backends.mkldnn.is_available()), reason="needs MKL and oneDNN")
@pytest.mark.parametrize("method", ["eagle2", "medusa"])
def test_drafter_networks_follow_the_targets_kernels_and_stay_lossless(method, tmp_path):
    """On a tuned target every fp32 linear of the drafter network runs the target's kernel per row
    count (a 1-row draft on one kernel, a 4-row tree level on another); drafts only steer acceptance,
    so the output still equals AR's token for token."""
    from decodebench.engine import backends
    from decodebench.engine.kernels import KernelTable

    backbone = tiny_backbone("llama")
    torch.manual_seed(2)
    network = NETWORKS[METHODS[method][1]]
    save_network(network(backbone, network.Params()), backbone, tmp_path)
    ar = build_method(MethodConfig())
    references = [decode(backbone, ar, prompt, max_new_tokens=24).new_ids for prompt in random_prompts(2, seed=4)]
    choice = {1: "mkl", 2: "onednn", 4: "onednn", 8: "mkl_packed"}
    table = KernelTable(sorted(choice), {str(b): k for b, k in choice.items()}, {}, {}, "test", 1, 0.0)
    backends._apply_tuned(backbone, table)
    backbone.backend = "tuned"
    try:
        spec = drafter(method, backbone, str(tmp_path))
        net = spec.net if method == "eagle2" else spec.heads
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear) and m.weight.requires_grad]
        assert linears and all(type(m) is backends.TunedLinear for m in linears)
        assert all(m.kernel_by_rows == backbone.lm_head.kernel_by_rows for m in linears)
        for prompt, reference in zip(random_prompts(2, seed=4), references):
            assert decode(backbone, spec, prompt, max_new_tokens=24).new_ids == reference
    finally:
        backends.remove_backend(backbone)


@pytest.mark.parametrize("method", ["eagle2", "medusa"])
def test_sampling_preserves_target_distribution(method, tmp_path):
    target, _ = tiny_pair(vocab=5, layers=1)
    torch.manual_seed(2)
    network = NETWORKS[METHODS[method][1]]
    save_network(network(target, network.Params()), target, tmp_path)
    spec = drafter(
        method,
        target,
        str(tmp_path),
        **({"total_tokens": 5, "depth": 2, "top_k": 2} if method == "eagle2" else {"tree_nodes": 5}),
    )
    params, prompt, runs = SamplingParams(temperature=1.0), [1, 4, 2, 3], 300
    counts, accepted = sample_second_and_third(target, spec, prompt, params, runs)
    assert accepted > 50
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


def test_checkpoint_round_trip_keeps_the_drafts(trained):
    backbone, cache_dir, _ = trained
    first = drafter("eagle2", backbone, cache_dir, total_tokens=8, depth=2, top_k=3)
    second = drafter("eagle2", backbone, cache_dir, total_tokens=8, depth=2, top_k=3)
    assert first.net.vocab is not None and torch.equal(first.net.vocab.ids, second.net.vocab.ids)
    for key, value in first.net.checkpoint_state().items():
        assert torch.equal(value, second.net.checkpoint_state()[key]), key


def test_missing_checkpoint_names_the_training_command(tmp_path):
    backbone = tiny_backbone("llama")
    backbone.model_name = "tiny-llama"
    for cls, network in METHODS.values():
        with pytest.raises(MissingCheckpointError, match=f"decodebench-train drafter={network} model=tiny-llama"):
            cls(cls.Params()).setup(backbone, str(tmp_path))
        assert MissingCheckpointError.exit_code == 2


def test_draft_vocab_maps_round_trip():
    counts = torch.tensor([5, 0, 9, 1, 7, 3])
    vocab = DraftVocab.most_frequent(counts, 3)
    assert vocab.ids.tolist() == [2, 4, 0]
    assert (torch.arange(3) + vocab.d2t).tolist() == [2, 4, 0]  # EAGLE-3: target = draft + d2t[draft]
    assert vocab.t2d.tolist() == [True, False, True, False, True, False]
    assert torch.equal(DraftVocab.from_maps(vocab.d2t, vocab.t2d).ids, vocab.ids)
    assert vocab.draft_index().tolist() == [2, -1, 0, -1, 1, -1]


def test_presets_are_sized_from_the_latency_curve():
    for name in ("eagle", "eagle2", "medusa", "hydra"):
        cfg = method_config(name)
        assert cfg.resolved_params("cpu")["max_verify_cost"] == 1.15  # the cap below holds without a curve
        assert cfg.resolved_params("cpu")["total_tokens" if name == "eagle2" else "tree_nodes"] == (
            6 if name == "eagle2" else 5
        )
        assert cfg.resolved_params("cuda")["max_verify_cost"] is None


# --- published checkpoint layouts ----------------------------------------------------------------
def write_published_medusa(directory, hidden: int, vocab: int, heads: int = 2, layers: int = 1, seed: int = 0):
    """A FasterDecoding/medusa-* folder written from raw tensors: config.json + medusa_lm_head.safetensors."""
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(heads):
        for j in range(layers):
            state[f"{i}.{j}.linear.weight"] = torch.randn(hidden, hidden, generator=generator) * 0.01
            state[f"{i}.{j}.linear.bias"] = torch.randn(hidden, generator=generator) * 0.01
        state[f"{i}.{layers}.weight"] = torch.randn(vocab, hidden, generator=generator)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "medusa_lm_head.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {"medusa_num_heads": heads, "medusa_num_layers": layers, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}
        )
    )
    return state


def write_published_eagle(directory, config, vocab: int, seed: int = 0):
    """A yuhuili/EAGLE-* folder written from raw tensors: LlamaConfig-style config.json + model.safetensors."""
    import json

    from safetensors.torch import save_file

    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "embed_tokens.weight": (vocab, hidden),
        "fc.weight": (hidden, 2 * hidden),
        "fc.bias": (hidden,),
        "layers.0.self_attn.q_proj.weight": (hidden, hidden),
        "layers.0.self_attn.k_proj.weight": (kv, hidden),
        "layers.0.self_attn.v_proj.weight": (kv, hidden),
        "layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "layers.0.mlp.gate_proj.weight": (inter, hidden),
        "layers.0.mlp.up_proj.weight": (inter, hidden),
        "layers.0.mlp.down_proj.weight": (hidden, inter),
        "layers.0.post_attention_layernorm.weight": (hidden,),
    }
    state = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "bias": True,
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "num_hidden_layers": 1,
                "vocab_size": vocab,
                "rms_norm_eps": 1e-6,
            }
        )
    )
    return state


def test_published_medusa_layout_loads_and_stays_lossless(tmp_path):
    backbone = tiny_backbone("llama")
    state = write_published_medusa(tmp_path / "medusa-tiny", backbone.config.hidden_size, backbone.config.vocab_size)
    spec = drafter("medusa", backbone, str(tmp_path), checkpoint=str(tmp_path / "medusa-tiny"))
    assert spec.heads.params.num_heads == 2
    assert torch.equal(spec.heads.heads[1][1].weight, state["1.1.weight"])
    assert torch.equal(spec.heads.heads[0][0].linear.bias, state["0.0.linear.bias"])
    ar = build_method(MethodConfig())
    for prompt in random_prompts(2, seed=6):
        assert (
            decode(backbone, spec, prompt, max_new_tokens=24).new_ids
            == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
        )


@pytest.mark.parametrize("wrong", ["hidden_size", "vocab_size"])
def test_published_medusa_for_another_target_is_refused(tmp_path, wrong):
    from decodebench.registry import DecodeBenchError

    backbone = tiny_backbone("llama")
    hidden, vocab = backbone.config.hidden_size, backbone.config.vocab_size
    write_published_medusa(
        tmp_path / "m", hidden * 2 if wrong == "hidden_size" else hidden, vocab + 7 if wrong == "vocab_size" else vocab
    )
    with pytest.raises(DecodeBenchError, match=f"its {wrong} is"):
        drafter("medusa", backbone, str(tmp_path), checkpoint=str(tmp_path / "m"))


def test_published_eagle_layout_loads_and_stays_lossless(tmp_path):
    backbone = tiny_backbone("llama")
    state = write_published_eagle(tmp_path / "eagle-tiny", backbone.config, backbone.config.vocab_size)
    for method in ("eagle", "eagle2"):
        spec = drafter(method, backbone, str(tmp_path), checkpoint=str(tmp_path / "eagle-tiny"))
        assert torch.equal(spec.net.fc.weight, state["fc.weight"])
        assert torch.equal(spec.net.layers[0].mlp.down_proj.weight, state["layers.0.mlp.down_proj.weight"])
        ar = build_method(MethodConfig())
        for prompt in random_prompts(2, seed=8):
            assert (
                decode(backbone, spec, prompt, max_new_tokens=24).new_ids
                == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
            )


@pytest.mark.parametrize("wrong", ["hidden_size", "vocab_size"])
def test_published_eagle_for_another_target_is_refused(tmp_path, wrong):
    from decodebench.registry import DecodeBenchError

    backbone = tiny_backbone("llama")
    config = backbone.config
    write_published_eagle(tmp_path / "e", config, config.vocab_size)
    import json

    written = json.loads((tmp_path / "e" / "config.json").read_text())
    written[wrong] += 32
    (tmp_path / "e" / "config.json").write_text(json.dumps(written))
    with pytest.raises(DecodeBenchError, match=f"its {wrong} is {written[wrong]}, the target's is"):
        drafter("eagle", backbone, str(tmp_path), checkpoint=str(tmp_path / "e"))
