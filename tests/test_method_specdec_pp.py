"""SpecDec++: greedy = AR token for token (draft confidence and a trained head), the stopping
rule, the acceptance head on the training pipeline (``decodebench-train drafter=specdec_pp``) on a
tiny pair, its checkpoint round trip, and a missing head naming the training command."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method
from decodebench.methods.draft_heads import MissingCheckpointError, checkpoint_dir, model_key, save_checkpoint
from decodebench.methods.specdec_pp import AcceptanceHead, head_network, load_head
from decodebench.methods.specdec_pp_net import SpecDecPPNet, weighted_bce
from decodebench.registry import DecodeBenchError
from decodebench.training.config import DrafterConfig
from decodebench.training.corpus import target_features
from decodebench.training.trainer import train_network

from helpers import decode, random_prompts, tiny_pair

SPECDEC_PP = "decodebench.methods.specdec_pp:SpecDecPPDrafter"


pytestmark = pytest.mark.usefixtures("one_thread")


def drafter_for(draft, target, cache_dir=None, **params):
    drafter = build_method(MethodConfig(name="specdec_pp", impl=SPECDEC_PP, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target, cache_dir)
    return drafter


@pytest.fixture(scope="module")
def pair():
    """A tiny llama target (2 layers, LM head x 8: draft confidences spread over 0.3-0.97) and its
    noisy draft."""
    return tiny_pair(layers=2, lm_head_scale=8.0)


def texts(count: int = 12):
    generator = torch.Generator().manual_seed(3)
    return [
        (
            torch.randint(3, 101, (6,), generator=generator).tolist(),
            torch.randint(3, 101, (24,), generator=generator).tolist(),
        )
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def trained_heads(pair, tmp_path_factory):
    """Heads trained on the pipeline (corpus sequences -> SpecDecPPNet -> train_network), saved
    where the method looks; and each mode's prepared examples."""
    target, draft = pair
    sequences = [target_features(target, prompt, answer) for prompt, answer in texts()]
    cache_dir = tmp_path_factory.mktemp("cache")
    examples = {}
    for mode in ("greedy", "sampling"):
        torch.manual_seed(0)
        net = SpecDecPPNet(target, SpecDecPPNet.Params(mode=mode), None, draft=draft)
        examples[mode] = [net.prepare(s, target) for s in sequences]
        train_network(
            net, target, sequences, DrafterConfig(name="specdec_pp", epochs=3, validation_fraction=0.2), 0, False
        )
        save_checkpoint(
            checkpoint_dir(str(cache_dir), model_key(target), net.network),
            net.checkpoint_state(),
            net.checkpoint_config(target),
        )
    return str(cache_dir), examples


def test_training_examples_match_inference_time_features(pair, trained_heads):
    """The tree-forward features equal the draft's hidden state at a drafted token given the true
    prefix (what the drafter sees), and labels are the acceptance indicator / probability."""
    target, draft = pair
    _, examples = trained_heads
    features = torch.cat([e.features for e in examples["greedy"]])
    labels = torch.cat([e.labels for e in examples["greedy"]])
    assert features.shape == (12 * 24, 64) and set(labels.unique().tolist()) <= {0.0, 1.0}
    assert 0.2 < float(labels.mean()) < 1.0
    soft = torch.cat([e.labels for e in examples["sampling"]])
    assert float(soft.min()) >= 0.0 and float(soft.max()) <= 1.0 and len(soft.unique()) > 2
    prompt, answer = texts(1)[0]
    with torch.inference_mode():
        position = 5  # the drafted y_5 hangs off x_4: features row 5 of the first text
        logits = draft.model(torch.tensor([prompt + answer[:position]])).logits[0, -1]
        guess = int(logits.argmax())
        hidden = draft.model(
            torch.tensor([prompt + answer[:position] + [guess]]), output_hidden_states=True
        ).hidden_states[-1][0, -1]
    torch.testing.assert_close(examples["greedy"][0].features[position], hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("use_head", [False, True], ids=["confidence-fallback", "trained-head"])
def test_specdec_pp_greedy_equals_ar(pair, trained_heads, use_head, caplog):
    target, draft = pair
    cache_dir, _ = trained_heads
    ar = build_method(MethodConfig())
    accepted, lengths = 0, set()
    for prompt in random_prompts(4):
        drafter = drafter_for(draft, target, cache_dir=cache_dir, use_head=use_head, stop_threshold=0.5)
        out = decode(target, drafter, prompt, max_new_tokens=40)
        assert (drafter.head is not None) == use_head
        assert out.new_ids == decode(target, ar, prompt, max_new_tokens=40).new_ids
        accepted += sum(s.accepted for s in out.steps)
        lengths.update(s.drafted for s in out.steps[:-2])
    assert accepted > 10
    assert all(2 <= n <= 20 for n in lengths)
    if not use_head:
        assert len(lengths) > 1, "the draft length never adapted"


def test_missing_head_names_the_training_command(pair, trained_heads, tmp_path):
    target, draft = pair
    with pytest.raises(
        MissingCheckpointError, match="decodebench-train drafter=specdec_pp model=.* drafter.params.mode=greedy"
    ):
        drafter_for(draft, target, cache_dir=str(tmp_path / "empty"))  # nothing trained: stops in setup
    assert MissingCheckpointError.exit_code == 2
    cache_dir, _ = trained_heads
    greedy = checkpoint_dir(cache_dir, model_key(target), head_network("greedy", model_key(draft)))
    shutil.copytree(greedy, checkpoint_dir(str(tmp_path), model_key(target), greedy.name))
    drafter = drafter_for(draft, target, cache_dir=str(tmp_path))  # the greedy head alone
    decode(target, drafter, random_prompts(1)[0], max_new_tokens=8)
    with pytest.raises(MissingCheckpointError, match="drafter.params.mode=sampling"):
        decode(target, drafter, random_prompts(1)[0], max_new_tokens=8, sampling=SamplingParams(temperature=1.0))


def test_stopping_rule_uses_predicted_rejection_probability(pair):
    """With a head that predicts acceptance a for every token, the draft stops at the first i >=
    min_draft_tokens with 1 - a^i > threshold."""
    target, draft = pair
    for accept, threshold, expected in [(0.9, 0.3, 4), (0.5, 0.3, 2), (0.99, 0.05, 6), (0.999, 0.5, 20)]:
        drafter = drafter_for(draft, target, use_head=False)
        drafter.start_request([1, 2, 3], SamplingParams(), None)
        head = AcceptanceHead(64, 0)
        with torch.no_grad():
            head.output.weight.zero_()
            head.output.bias.fill_(math.log(accept / (1 - accept)))
        drafter.head = head
        drafter.params.stop_threshold = threshold
        assert len(drafter.propose([1, 2, 3, 4], 100).tokens) == expected
    assert len(drafter.propose([1, 2, 3, 4], 7).tokens) == 7  # the loop's budget still binds


def test_sampling_runs_with_the_sampling_head(pair, trained_heads):
    target, draft = pair
    cache_dir, _ = trained_heads
    drafter = drafter_for(draft, target, cache_dir=cache_dir)
    out = decode(
        target, drafter, random_prompts(1)[0], max_new_tokens=40, sampling=SamplingParams(temperature=1.0), seed=0
    )
    assert drafter.head is drafter.heads["sampling"] is not None
    assert len(out.new_ids) == 40


def test_head_round_trip_and_width_check(pair, trained_heads):
    target, draft = pair
    cache_dir, _ = trained_heads
    directory = checkpoint_dir(cache_dir, model_key(target), head_network("greedy", model_key(draft)))
    head = load_head(directory, 64)
    drafter = drafter_for(draft, target, cache_dir=cache_dir)
    drafter.start_request([1, 2, 3], SamplingParams(), None)
    x = torch.randn(3, 64)
    torch.testing.assert_close(drafter.head(x), head(x))
    with pytest.raises(DecodeBenchError, match="hidden size 64"):
        load_head(directory, 32)


def test_weighted_loss_and_model_keys(pair):
    logits, labels = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    plain = weighted_bce(logits, labels, 1.0)
    expected = (
        -(torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.nn.functional.logsigmoid(torch.tensor(1.0))) / 2
    )
    torch.testing.assert_close(plain, expected)
    assert float(weighted_bce(logits, labels, 6.0)) < float(plain) * 6
    target, _ = pair
    assert model_key(target) == "llama-h64-l2-v101"
