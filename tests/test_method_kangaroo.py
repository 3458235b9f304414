"""Kangaroo: a tiny training run (seconds) saves an adapter into the cache, the method loads it and
its greedy output equals AR token for token; clear errors when the adapter is missing; the
training command end to end and one embedded-model losslessness check."""

from __future__ import annotations

import functools
import json

import pytest

from decodebench.config import MethodConfig, ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.kangaroo import adapter_path, save_adapter
from decodebench.methods.kangaroo_train import (
    AdapterTrainingConfig,
    collect_sequences,
    read_corpus,
    self_generate,
    train_adapter,
)
from decodebench.models.tiny import build_tiny
from decodebench.registry import DecodeBenchError

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
    """A tiny model and an adapter trained on its own generations, saved in a temporary cache."""
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", architecture=request.param, tiny=TINY), 0))
    train_prompts = prompts(12, seed=7)
    answers = self_generate(backbone, train_prompts, max_new_tokens=24)
    sequences = collect_sequences(backbone, train_prompts, answers, exit_layer=2)
    adapter, metrics = train_adapter(backbone, sequences, AdapterTrainingConfig(epochs=4, learning_rate=3e-3))
    cache = tmp_path_factory.mktemp(f"cache-{request.param}")
    save_adapter(adapter_path(str(cache), backbone), adapter, metrics)
    return backbone, str(cache), metrics


def kangaroo(backbone, cache_dir, **params):
    cfg = method_config("kangaroo")
    drafter = build_method(MethodConfig(**{**cfg.__dict__, "params": {**cfg.params, **params}}))
    drafter.setup(backbone, cache_dir)
    return drafter


def test_batched_self_generation_equals_unbatched():
    backbone = Backbone(build_tiny(ModelConfig(name="t", source="tiny", tiny=TINY), 0))
    batch = [*prompts(3, seed=8), *prompts(2, length=6, seed=9)]
    assert self_generate(backbone, batch, 12, eos_token_ids=(5, 9), batch_size=3) == self_generate(
        backbone, batch, 12, eos_token_ids=(5, 9)
    )


def test_training_improves_held_out_agreement(trained):
    _, _, metrics = trained
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert metrics["after"]["top1_agreement"] >= metrics["before"]["top1_agreement"]


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
    with pytest.raises(DecodeBenchError, match="decodebench-train-kangaroo"):
        kangaroo(backbone, str(tmp_path))


def test_exit_layer_mismatch_is_an_error(trained):
    backbone, cache_dir, _ = trained
    with pytest.raises(DecodeBenchError, match="exit_layer"):
        kangaroo(backbone, cache_dir, exit_layer=1)


def test_corpus_file(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert read_corpus(str(text)) == ["first prompt", "second prompt"]
    rows = tmp_path / "c.jsonl"
    rows.write_text(json.dumps({"instruction": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert read_corpus(str(rows)) == ["a", "b"]


@pytest.mark.embedded
def test_train_command_and_embedded_losslessness(tmp_path):
    """The training command end to end on the embedded model (2 prompts, 1 epoch: seconds), then
    Kangaroo with that adapter reproduces AR greedy output on the embedded model."""
    from decodebench.config import default_cache_dir
    from decodebench.methods.kangaroo_train import main
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    try:
        loaded = load_model(
            load_model_config("smollm2-135m"), device="cpu", dtype="float32", cache_dir=default_cache_dir(), seed=0
        )
    except Exception as error:  # not prepared
        pytest.skip(f"embedded model not available: {error}")
    output = tmp_path / "adapter.pt"
    assert (
        main(
            [
                "--model",
                "smollm2-135m",
                "--prompts",
                "3",
                "--max-new-tokens",
                "12",
                "--epochs",
                "1",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    meta = json.loads(output.with_suffix(".json").read_text())
    assert meta["prompts"] == 3 and meta["train_s"] >= 0
    backbone = Backbone(loaded.model)
    drafter = kangaroo(backbone, None, adapter_path=str(output))
    ar = build_method(MethodConfig())
    prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": "Name three primary colours."}], True)
    assert (
        decode(backbone, drafter, prompt, max_new_tokens=24).new_ids
        == decode(backbone, ar, prompt, max_new_tokens=24).new_ids
    )
