"""PEARL: greedy = AR token for token (fixed window and adaptive, tiny pairs and the embedded
model), both strategies (pre-verify, post-verify) run, the draft model really runs at the same time
as the target's forward (overlapping intervals, measured), the background run stops on a rejection,
and a chi-square test that sampling leaves the target's distribution unchanged."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from decodebench.config import ConfigValueError, MethodConfig, compose_run_config
from decodebench.engine.backbone import Backbone
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.pearl import DraftRun, PearlDrafter

from helpers import chi_square_p_value, decode, exact_second_and_third, random_prompts, tiny_pair

PEARL = "decodebench.methods.pearl:PearlDrafter"
pytestmark = pytest.mark.usefixtures("one_thread")


def pearl_for(draft: Backbone, target: Backbone, **params) -> PearlDrafter:
    drafter = build_method(MethodConfig(name="pearl", impl=PEARL, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


@pytest.mark.parametrize(
    "params",
    [dict(num_draft_tokens=3), dict(num_draft_tokens=1), dict(adaptive=True, max_draft_tokens=6)],
    ids=["window3", "window1", "adaptive"],
)
def test_pearl_greedy_equals_ar(pair, params):
    target, draft = pair
    ar = build_method(MethodConfig())
    drafter = pearl_for(draft, target, **params)
    accepted = pre = post = 0
    for prompt in random_prompts(4):
        reference = decode(target, ar, prompt, max_new_tokens=40)
        ours = decode(target, drafter, prompt, max_new_tokens=40)
        assert ours.new_ids == reference.new_ids
        accepted += sum(s.accepted for s in ours.steps)
        pre += ours.method_stats["pre_verify_steps"]
        post += ours.method_stats["post_verify_steps"]
    drafter.finish()
    assert accepted > 20, "drafts were (almost) never accepted: the greedy check proves little"
    assert pre > 0 and post > 0, (pre, post)  # both strategies ran


def test_draft_runs_while_the_target_verifies(monkeypatch):
    """While the target's verify forward runs, the draft model is inside a forward of its own in
    the background thread (observed, not assumed), for most steps."""
    target, draft = tiny_pair()
    drafting = threading.Event()  # set while a draft forward runs
    seen: list[bool] = []  # per target forward: the draft was seen mid-forward meanwhile

    draft_forward, target_forward = draft.forward, target.forward

    def slow_draft(*args, **kwargs):
        drafting.set()
        time.sleep(0.005)
        try:
            return draft_forward(*args, **kwargs)
        finally:
            drafting.clear()

    def watching_target(*args, **kwargs):
        seen.append(drafting.wait(timeout=0.5))
        return target_forward(*args, **kwargs)

    prompt = random_prompts(1)[0]
    reference = decode(target, build_method(MethodConfig()), prompt, max_new_tokens=30)
    monkeypatch.setattr(draft, "forward", slow_draft)
    monkeypatch.setattr(target, "forward", watching_target)
    drafter = pearl_for(draft, target, num_draft_tokens=4)
    out = decode(target, drafter, prompt, max_new_tokens=30)
    drafter.finish()
    assert out.new_ids == reference.new_ids
    assert sum(seen[1:]) >= len(out.steps) - 1, seen  # every step but the last (nothing left to draft)
    assert not any(t.name.startswith("pearl-draft") for t in threading.enumerate())  # finish() ended it


def test_continuation_keeps_only_drafts_on_the_real_path():
    run = DraftRun(base=[1, 2, 3], tokens=[7, 8, 9])
    assert run.continuation([1, 2, 3, 7]) == ([8, 9], [])  # the bonus equals the first draft
    assert run.continuation([1, 2, 3, 7, 8]) == ([9], [])
    assert run.continuation([1, 2, 3, 5]) == ([], [])  # the bonus differs
    assert run.continuation([1, 2, 4, 7]) == ([], [])  # a draft before it was rejected
    assert run.continuation([1, 2, 3, 7, 8, 9, 1]) == ([], [])  # past the run


def test_embedded_model_greedy_equals_ar():
    """SmolLM2-135M as the target, a perturbed copy of it as the draft, both on the engine; one chat
    prompt, 32 tokens, cpu preset (adaptive)."""
    from decodebench.config import default_cache_dir
    from decodebench.engine.decode_loop import DecodeSettings, generate
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    from helpers import EMBEDDED_PROMPTS

    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip("smollm2-135m is not prepared (make setup)")
    loaded = load_model(cfg)
    target = Backbone(loaded.model)
    draft_model = copy.deepcopy(loaded.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in draft_model.parameters():
            if weight.dim() > 1:
                weight.add_(torch.randn(weight.shape, generator=generator) * 0.02 * weight.std())
    method_cfg = method_config("pearl")
    method_cfg.params.update(method_cfg.presets["cpu"])
    method_cfg.preset = None
    drafter = build_method(method_cfg)
    drafter.attach_draft(Backbone(draft_model))
    drafter.setup(target)
    settings = DecodeSettings(max_new_tokens=32, eos_token_ids=[loaded.tokenizer.eos_token_id])
    accepted = 0
    for text in EMBEDDED_PROMPTS[:1]:
        prompt = encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], cfg.chat_template)
        reference = generate(target, build_method(MethodConfig()), prompt, settings, target.new_cache(256))
        ours = generate(target, drafter, prompt, settings, target.new_cache(256))
        assert ours.new_ids == reference.new_ids, text
        accepted += sum(s.accepted for s in ours.steps)
    drafter.finish()
    assert accepted > 10


def test_pearl_sampling_preserves_target_distribution():
    """(t2, t3) over 400 seeds vs the exact target distribution (25 cells)."""
    target, draft = tiny_pair(vocab=5, noise=0.5, layers=1)
    prompt, params = [1, 4, 2, 3], SamplingParams(temperature=1.0)
    vocab = target.config.vocab_size
    counts, accepted = torch.zeros(vocab * vocab), 0
    drafter = pearl_for(draft, target, num_draft_tokens=3)
    for seed in range(400):
        out = decode(target, drafter, prompt, max_new_tokens=4, sampling=params, seed=seed)
        counts[out.new_ids[1] * vocab + out.new_ids[2]] += 1
        accepted += sum(s.accepted for s in out.steps)
    drafter.finish()
    assert 100 < accepted < 2 * 400  # drafts are accepted and rejected: both branches of the rule run
    assert chi_square_p_value(counts, exact_second_and_third(target, prompt, params)) > 1e-3


def test_config_and_errors():
    cfg = compose_run_config(["model=qwen2.5-coder-1.5b", "method=pearl"])
    assert cfg.model.draft == "qwen2.5-coder-0.5b"
    assert build_method(cfg.method, "cpu").needs_draft_model
    assert method_config("pearl").resolved_params("cpu")["adaptive"] is True
    assert method_config("pearl").resolved_params("cuda")["adaptive"] is False
    with pytest.raises(ConfigValueError, match="method.params.num_draft_tokens"):
        build_method(MethodConfig(name="pearl", impl=PEARL, params=dict(num_draft_tokens=0)))
    with pytest.raises(ConfigValueError, match="Did you mean .adaptive."):
        build_method(MethodConfig(name="pearl", impl=PEARL, params=dict(adaptve=True)))
