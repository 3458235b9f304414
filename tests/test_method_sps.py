"""SpS with a draft model: greedy = AR token for token, the draft cache is kept and cropped, the
heuristic draft length, a clear error for a draft with another tokenizer, and a chi-square test
that speculative sampling leaves the target's distribution unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, ModelConfig, RunConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Proposal
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.sps import DraftModelState, SpeculativeSamplingDrafter

from helpers import REVISION, chi_square_p_value, decode, exact_second_and_third, random_prompts, tiny_pair

SPS = "decodebench.methods.sps:SpeculativeSamplingDrafter"
pytestmark = pytest.mark.usefixtures("one_thread")


def drafter_for(draft: Backbone, target: Backbone, **params) -> SpeculativeSamplingDrafter:
    drafter = build_method(MethodConfig(name="sps", impl=SPS, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


@pytest.mark.parametrize(
    "params",
    [dict(num_draft_tokens=3), dict(num_draft_tokens=1), dict(num_draft_tokens=5, schedule="heuristic")],
    ids=["g3", "g1", "heuristic"],
)
def test_sps_greedy_equals_ar(pair, params):
    target, draft = pair
    ar = build_method(MethodConfig())
    accepted = 0
    for prompt in random_prompts(4):
        reference = decode(target, ar, prompt, max_new_tokens=40)
        ours = decode(target, drafter_for(draft, target, **params), prompt, max_new_tokens=40)
        assert ours.new_ids == reference.new_ids
        assert all(s.drafted <= max(params["num_draft_tokens"], 32) for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 20, "drafts were (almost) never accepted: the greedy check proves little"


def test_sps_with_an_unrelated_draft_architecture_still_equals_ar():
    """Any same-vocabulary draft works (a qwen2 draft for a llama target); output = AR."""
    target, _ = tiny_pair("llama")
    other, _ = tiny_pair("qwen2", layers=2, seed=3)
    for prompt in random_prompts(2):
        assert (
            decode(target, drafter_for(other, target), prompt, max_new_tokens=40).new_ids
            == decode(target, build_method(MethodConfig()), prompt, max_new_tokens=40).new_ids
        )


def test_draft_cache_is_kept_and_cropped(monkeypatch):
    """After the draft's prefill every step feeds at most 2 tokens (an unseen accepted draft and
    the bonus): the draft cache survives across steps and is cropped after rejections."""
    target, draft = tiny_pair()
    fed: list[int] = []
    original = DraftModelState.feed

    def counting_feed(self, tokens):
        fed.append(len(tokens))
        return original(self, tokens)

    monkeypatch.setattr(DraftModelState, "feed", counting_feed)
    drafter = drafter_for(draft, target, num_draft_tokens=4)
    prompt = random_prompts(1)[0]
    out = decode(target, drafter, prompt, max_new_tokens=60)
    assert fed[0] == len(prompt) + 1  # prefill: prompt + first token
    assert max(fed[1:]) <= 2
    assert sum(s.accepted for s in out.steps) < sum(s.drafted for s in out.steps)  # some rejections
    # the cache holds exactly its list of fed ids; syncing to the final context crops the
    # rejected drafts and feeds only the tail the draft has not seen
    context = prompt + out.new_ids
    state = drafter.draft
    assert state.cache.length == len(state.fed)
    state.sync(context)
    assert state.fed == context and state.cache.length == len(context)
    assert fed[-1] <= 1 + sum(s.emitted for s in out.steps[-2:])


def test_heuristic_schedule_adds_two_or_removes_one():
    drafter = build_method(
        MethodConfig(name="sps", impl=SPS, params=dict(num_draft_tokens=5, schedule="heuristic", max_draft_tokens=8))
    )

    def step(drafted: int, accepted: int) -> int:
        drafter.feedback(
            SimpleNamespace(proposal=Proposal(tokens=[0] * drafted), result=SimpleNamespace(accepted=accepted))
        )
        return drafter.gamma

    assert step(5, 5) == 7
    assert step(7, 7) == 8  # capped by max_draft_tokens
    assert step(8, 3) == 7
    drafter.gamma = 1
    assert step(1, 0) == 1  # never below 1
    drafter.reset_state()
    assert drafter.gamma == 5
    transient = build_method(MethodConfig(name="sps", impl=SPS, params=dict(schedule="heuristic_transient")))
    transient.gamma = 11
    transient.draft = SimpleNamespace(reset=lambda: None)
    transient.start_request([1], SamplingParams(), None)
    assert transient.gamma == 5


def test_gamma_from_the_curve_and_the_draft_cost_ratio(pair, tmp_path):
    """cpu preset: γ maximising E(γ) / (γc + T(γ+1)/T(1)) on the target's stored curve, using the
    draft cost ratio c stored with it for this draft (decodebench-profile --draft)."""
    import json

    from decodebench.engine.budget import expected_tokens, pick_draft_budget
    from decodebench.engine.profile import profile_path

    target, draft = pair
    target.model_name, draft.model_name = "tiny-t", "tiny-d"
    # Qwen2.5-Coder 1.5B's onednn curve here, with the 0.5B draft's measured cost ratio
    curve = {
        "k": [1, 2, 3, 4, 5, 6, 8, 12, 16],
        "ratio": [1.0, 1.04, 1.13, 0.99, 1.08, 1.08, 1.2, 1.26, 1.44],
        "model": "tiny-t",
        "backend": "eager",
        "device": "cpu",
        "draft": {"model": "tiny-d", "ms": 1.0, "cost_ratio": 0.385},
        **REVISION,
    }
    path = profile_path("tiny-t", "eager", "cpu", str(tmp_path))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(curve))
    choice = pick_draft_budget(curve, 0.8, 32, draft_cost_ratio=0.385)
    assert choice.draft_tokens == 3  # (1 + .8 + .64 + .512) / (3 * .385 + T(4)/T(1)) = 1.38
    assert choice.tokens_per_cost == pytest.approx(expected_tokens(3, 0.8) / (3 * 0.385 + 0.99))
    assert pick_draft_budget(curve, 0.8, 32).draft_tokens > 3  # a free draft would draft more
    params = dict(budget_from_curve=True, expected_acceptance=0.8, num_draft_tokens=5)
    drafter = build_method(MethodConfig(name="sps", impl=SPS, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target, str(tmp_path))
    assert (drafter.gamma, drafter.budget_source, drafter.request_stats()) == (3, "curve:eager", {"verify_budget": 4.0})
    drafter.gamma = 9
    drafter.reset_state()
    assert drafter.gamma == 3
    draft.model_name = "another-draft"  # the stored ratio is for another draft: keep num_draft_tokens
    drafter = build_method(MethodConfig(name="sps", impl=SPS, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target, str(tmp_path))
    assert (drafter.gamma, drafter.budget_source) == (5, "params")


def test_bad_schedule_is_a_clear_error():
    with pytest.raises(ConfigValueError, match="schedule"):
        build_method(MethodConfig(name="sps", impl=SPS, params=dict(schedule="linear")))


# --- draft model wiring -----------------------------------------------------------------------
def test_qwen_target_names_its_draft_and_methods_compose():
    for method in ("sps", "dyspec", "specdec_pp"):
        cfg = compose_run_config(["model=qwen2.5-coder-1.5b", f"method={method}"])
        assert cfg.model.draft == "qwen2.5-coder-0.5b"
        assert build_method(cfg.method, "cpu").needs_draft_model
    assert method_config("sps").resolved_params("cpu")["num_draft_tokens"] == 3
    assert method_config("sps").resolved_params("cuda")["num_draft_tokens"] == 5


def _runner_with_draft(monkeypatch, target_vocab: int, draft_vocab: int, draft_name="tiny-draft"):
    from decodebench.models import loading
    from decodebench.models.loading import load_model
    from decodebench.runners import local

    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    catalogue = {"tiny-draft": ModelConfig(name="tiny-draft", source="tiny", tiny={**sizes, "vocab_size": draft_vocab})}
    monkeypatch.setattr(loading, "load_model_config", lambda name: catalogue[name])
    target_cfg = ModelConfig(
        name="tiny-target", source="tiny", tiny={**sizes, "vocab_size": target_vocab}, draft=draft_name
    )
    runner = local.Runner(RunConfig(model=target_cfg, method=method_config("sps")), {})
    return runner, load_model(target_cfg)


def test_draft_with_another_vocabulary_is_a_clear_error(monkeypatch):
    runner, target = _runner_with_draft(monkeypatch, target_vocab=101, draft_vocab=103)
    with pytest.raises(ConfigValueError, match="does not share the tokenizer of target 'tiny-target'"):
        runner._load_draft(target)
    runner, target = _runner_with_draft(monkeypatch, target_vocab=101, draft_vocab=101)
    assert isinstance(runner._load_draft(target), Backbone)


def test_missing_draft_is_a_clear_error(monkeypatch):
    from decodebench.config import validate_before_loading

    runner, target = _runner_with_draft(monkeypatch, 101, 101, draft_name=None)
    with pytest.raises(ConfigValueError, match="set model.draft"):  # checked before any model is loaded
        validate_before_loading(runner.cfg)


# --- sampling: the target distribution is preserved -------------------------------------------
def sampled_second_and_third(target, make_drafter, prompt, params, runs: int) -> tuple[torch.Tensor, int]:
    """Counts of (t2, t3) over ``runs`` seeded generations of 4 tokens (t1 comes from the prefill,
    t2.. from speculative steps), and the number of accepted drafts."""
    vocab = target.config.vocab_size
    counts, accepted = torch.zeros(vocab * vocab), 0
    drafter = make_drafter()
    for seed in range(runs):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * vocab + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
    return counts, accepted


def test_sps_sampling_preserves_target_distribution():
    """(t2, t3) over 400 seeds vs the exact target distribution (25 cells)."""
    target, draft = tiny_pair(vocab=5, noise=0.5, layers=1)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    counts, accepted = sampled_second_and_third(
        target, lambda: drafter_for(draft, target, num_draft_tokens=3), prompt, params, runs=400
    )
    assert 100 < accepted < 2 * 400  # drafts are accepted and rejected: both branches of the rule run
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3
