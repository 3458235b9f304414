"""Kangaroo: a tiny training run on the training pipeline (seconds) saves an adapter into the cache,
the method loads it and its greedy output equals AR token for token; clear errors when the adapter
is missing; ``decodebench-train drafter=kangaroo`` end to end and one embedded-model losslessness
check."""

from __future__ import annotations

import functools
import json
import os

import pytest

from decodebench.config import MethodConfig, ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.draft_heads import checkpoint_dir, model_key, save_checkpoint
from decodebench.methods.kangaroo_net import KangarooNet
from decodebench.models.tiny import build_tiny
from decodebench.registry import DecodeBenchError
from decodebench.training.config import DrafterConfig
from decodebench.training.corpus import greedy_answers, target_features
from decodebench.training.trainer import train_network

from helpers import decode as helpers_decode
from helpers import random_prompts

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


prompts = functools.partial(random_prompts, length=10)  # tests/helpers.py, 10-token prompts


# helpers.decode with the 40 new tokens this file's expectations were written for
decode = functools.partial(helpers_decode, max_new_tokens=40)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def trained(request, tmp_path_factory):
    """A tiny model and an adapter trained on its own generations (the pipeline's network and
    loop), saved in a temporary cache."""
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture=request.param, tiny=TINY), 0))
    train_prompts = prompts(12, seed=7)
    answers = greedy_answers(backbone, train_prompts, 24, 12, (), progress=False)
    sequences = [target_features(backbone, p, a) for p, a in zip(train_prompts, answers)]
    net = KangarooNet(backbone, KangarooNet.Params(exit_layer=2))
    result = train_network(
        net,
        backbone,
        sequences,
        DrafterConfig(name="kangaroo", epochs=4, learning_rate=3e-3, validation_fraction=0.15),
        seed=0,
        progress=False,
    )
    cache = tmp_path_factory.mktemp(f"cache-{request.param}")
    save_checkpoint(
        checkpoint_dir(str(cache), model_key(backbone), "kangaroo"),
        net.checkpoint_state(),
        net.checkpoint_config(backbone),
    )
    return backbone, str(cache), result


def kangaroo(backbone, cache_dir, **params):
    cfg = method_config("kangaroo")
    drafter = build_method(MethodConfig(**{**cfg.__dict__, "params": {**cfg.params, **params}}))
    drafter.setup(backbone, cache_dir)
    return drafter


def test_training_improves_held_out_agreement(trained):
    _, _, result = trained
    assert min(epoch["held_out_loss"] for epoch in result.history) < result.before.loss
    assert result.after.top1_agreement >= result.before.top1_agreement and result.steps > 0


@pytest.mark.parametrize("params", [{}, dict(confidence_threshold=0.0, max_draft_tokens=3)], ids=["paper", "always"])
def test_kangaroo_greedy_equals_ar(trained, params):
    backbone, cache_dir, _ = trained
    drafter = kangaroo(backbone, cache_dir, **params)
    ar = build_method(MethodConfig())
    drafted = accepted = 0
    for prompt in prompts(4):
        reference = decode(backbone, ar, prompt)
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference.new_ids
        assert all(s.drafted <= drafter.params.max_draft_tokens for s in ours.steps)
        drafted += sum(s.drafted for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    if not params:
        return
    assert accepted > 0 and accepted < drafted, "drafts never / always accepted: the check proves little"


def test_verification_reuses_the_drafted_shallow_layers(trained, monkeypatch):
    """Every step's verify forward continues from the drafted shallow states (never the loop's
    plain full forward), and still equals AR."""
    from decodebench.methods.kangaroo import KangarooDrafter

    backbone, cache_dir, _ = trained
    drafter = kangaroo(backbone, cache_dir, confidence_threshold=0.0, max_draft_tokens=3)
    results = []
    original = KangarooDrafter.verify_forward

    def spying(self, *args):
        out = original(self, *args)
        results.append(out is not None)
        return out

    monkeypatch.setattr(KangarooDrafter, "verify_forward", spying)
    prompt = prompts(1)[0]
    out = decode(backbone, drafter, prompt)
    assert len(results) == len(out.steps)
    # only a last step with no room for drafts (max_new_tokens reached after it) runs a plain forward
    assert all(results[:-1]) and (results[-1] or out.steps[-1].drafted == 0)
    assert out.new_ids == decode(backbone, build_method(MethodConfig()), prompt).new_ids


def test_confidence_exit_stops_after_the_low_confidence_token(trained):
    """threshold ~1: no draft is confident enough, yet (as in the reference) each step drafts one
    token, the low-confidence one, and the target verifies it."""
    backbone, cache_dir, _ = trained
    out = decode(backbone, kangaroo(backbone, cache_dir, confidence_threshold=0.999999), prompts(1)[0])
    assert all(s.drafted == 1 for s in out.steps[:-1])
    assert out.new_ids == decode(backbone, build_method(MethodConfig()), prompts(1)[0]).new_ids


def test_kangaroo_sampling_is_reproducible(trained):
    backbone, cache_dir, _ = trained
    sampling = SamplingParams(temperature=0.8)
    first = decode(backbone, kangaroo(backbone, cache_dir), prompts(1)[0], sampling=sampling, seed=3)
    second = decode(backbone, kangaroo(backbone, cache_dir), prompts(1)[0], sampling=sampling, seed=3)
    assert first.new_ids == second.new_ids


def test_missing_adapter_names_the_training_command(tmp_path):
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", tiny=TINY), 0))
    with pytest.raises(DecodeBenchError, match="decodebench-train drafter=kangaroo model="):
        kangaroo(backbone, str(tmp_path))


def test_exit_layer_mismatch_is_an_error(trained):
    backbone, cache_dir, _ = trained
    with pytest.raises(DecodeBenchError, match="exit_layer"):
        kangaroo(backbone, cache_dir, exit_layer=1)


@pytest.mark.embedded
def test_train_command_and_embedded_losslessness(tmp_path):
    """decodebench-train drafter=kangaroo end to end on the embedded model (3 prompts, 1 epoch, a
    temporary cache sharing the prepared model), then Kangaroo with that adapter reproduces AR
    greedy output on the embedded model."""
    from decodebench.config import default_cache_dir
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt
    from decodebench.training.cli import main

    try:
        loaded = load_model(
            load_model_config("smollm2-135m"), device="cpu", dtype="float32", cache_dir=default_cache_dir(), seed=0
        )
    except Exception as error:  # not prepared
        pytest.skip(f"embedded model not available: {error}")
    cache = tmp_path / "cache"
    cache.mkdir()
    os.symlink(os.path.join(os.path.expanduser(default_cache_dir()), "models"), cache / "models")
    main(
        [
            "drafter=kangaroo",
            "model=smollm2-135m",
            "corpus.prompts=3",
            "corpus.answer_tokens=12",
            "corpus.prompt_tokens=12",
            "drafter.epochs=1",
            "threads=1",
            "progress=false",
            f"cache_dir={cache}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    directory = cache / "drafters" / "smollm2-135m" / "kangaroo"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["corpus"]["sequences"] == 3 and manifest["training"]["steps"] >= 1
    backbone = Backbone(loaded.model)
    drafter = kangaroo(backbone, None, checkpoint=str(directory))
    ar = build_method(MethodConfig())
    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Name three primary colours."}], True)
    assert (
        decode(backbone, drafter, prompt, max_new_tokens=24).new_ids
        == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
    )
