"""EAD (entropy adaptive decoding, lossy): τ = +inf is the small model's own greedy decoding after
the target's first token, τ = -inf is the target's AR token for token, a mixed threshold uses both
models with every token equal to the generating model's argmax on the full context (so the KV
catch-up of both caches is exact), the switching rule itself, the token fractions in
``method_stats``, and bad hyperparameters exit 2 before any model is loaded."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.methods import build_method
from decodebench.methods.ead import LARGE, SMALL, EntropyAdaptiveDecoding, EntropySwitch

from helpers import decode, random_prompts, run_cli, tiny_pair

EAD = "decodebench.methods.ead:EntropyAdaptiveDecoding"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_pair() -> tuple[Backbone, Backbone]:
    """A tiny pair with peaked distributions (entropies ~1-4 bits), so a threshold splits the tokens."""
    return tiny_pair(lm_head_scale=6.0, noise=0.3)


def ead_for(target: Backbone, draft: Backbone, **params) -> EntropyAdaptiveDecoding:
    drafter = build_method(MethodConfig(name="ead", impl=EAD, lossless=False, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target)
    return drafter


def greedy_next(model: Backbone, ids: list[int]) -> list[int]:
    """The model's argmax after every prefix of ``ids`` (one fresh forward, no reused cache)."""
    return model.forward(ids, model.new_cache(len(ids) + 8)).logits.argmax(-1).tolist()


def test_threshold_inf_is_the_small_models_own_decoding(sharp_pair):
    target, draft = sharp_pair
    ar = build_method(MethodConfig())
    drafter = ead_for(target, draft, entropy_threshold=float("inf"))
    for prompt in random_prompts(3):
        out = decode(target, drafter, prompt, max_new_tokens=32)
        first = out.new_ids[0]  # the target's prefill token
        assert out.new_ids[1:] == decode(draft, ar, [*prompt, first], max_new_tokens=31).new_ids
        assert out.target_forwards == 1 and all(s.tree_size == 0 for s in out.steps)
        assert out.method_stats["small_tokens"] == 31 and out.method_stats["large_tokens"] == 1


def test_threshold_minus_inf_equals_target_ar(sharp_pair):
    target, draft = sharp_pair
    ar = build_method(MethodConfig())
    drafter = ead_for(target, draft, entropy_threshold=float("-inf"), window_size=3, min_duration=4)
    for prompt in random_prompts(3):
        out = decode(target, drafter, prompt, max_new_tokens=32)
        assert out.new_ids == decode(target, ar, prompt, max_new_tokens=32).new_ids
        assert out.method_stats["large_token_fraction"] == 1.0 and out.method_stats["switches"] == 0


def test_mixed_threshold_switches_and_catches_up_exactly(sharp_pair):
    """Every token is the argmax of the model that generated it, given the whole context so far:
    the target caught up on the small model's tokens (and the draft on the target's) exactly."""
    target, draft = sharp_pair
    drafter = ead_for(target, draft, entropy_threshold=2.0, window_size=2, min_duration=2)
    caught_up = switches = 0
    for prompt in random_prompts(3):
        out = decode(target, drafter, prompt, max_new_tokens=40)
        stats = out.method_stats
        assert stats["large_tokens"] + stats["small_tokens"] == len(out.new_ids) == 40
        assert stats["large_token_fraction"] == stats["large_tokens"] / 40
        # each step emits one token: step i emitted new_ids[i + 1]; tree_size 0 = the small model's
        assert all(s.emitted == 1 for s in out.steps)
        by_large = [True, *(s.tree_size > 0 for s in out.steps)]
        assert sum(by_large) == stats["large_tokens"] == out.target_forwards
        ids = [*prompt, *out.new_ids]
        large_next, small_next = greedy_next(target, ids), greedy_next(draft, ids)
        for index, large in enumerate(by_large):
            position = len(prompt) + index - 1  # the row that predicts new_ids[index]
            assert out.new_ids[index] == (large_next if large else small_next)[position], index
        caught_up += sum(s.tree_size > 1 for s in out.steps)  # a target forward over lagging tokens
        switches += stats["switches"]
    assert caught_up >= 3 and switches >= 6, (caught_up, switches)


def test_catch_up_in_front_of_tree_and_aux_blocks_is_exact(backbone):
    """The decode loop's catch-up (any drafter may emit unverified tokens): AR's own tokens emitted
    unverified, then a tree (a wrong and a right branch) or a draft with aux tokens verified in the
    same forward as the lagging tokens. The output stays AR's, so the K/V and masks are right."""
    ar = build_method(MethodConfig())
    prompt = random_prompts(1)[0]
    reference = decode(backbone, ar, prompt).new_ids

    class Oracle(Drafter):
        def begin(self, prompt_ids):
            self.prompt_len, self.step = len(prompt_ids), 0

        def propose(self, context, max_tokens):
            done, self.step = len(context) - self.prompt_len, self.step + 1
            truth = reference[done : done + 2]
            if self.step % 3:  # two unverified steps of the true tokens, then a verified block
                return Proposal(tokens=truth[:1], unverified=True)
            if len(truth) < 2 or max_tokens < 2:
                return Proposal()
            if self.step % 2:
                return Proposal(tokens=[(truth[0] + 1) % 101, truth[0], 5, truth[1]], parents=[-1, -1, 0, 1])
            mask = torch.ones(2, 2 + 2, dtype=torch.bool).tril(2)  # aux chain over [root, draft, aux0, aux1]
            return Proposal(tokens=truth[:1], aux_tokens=[7, 8], aux_mask=mask, aux_offsets=[2, 3])

    out = decode(backbone, Oracle(), prompt)
    assert out.new_ids == reference
    verified = [s for s in out.steps if s.tree_size]
    assert sum(s.accepted for s in verified) >= 8  # drafts behind caught-up tokens were accepted
    assert all(s.tree_size > 2 for s in verified[:-1])  # each verified block carried the 2 lagging tokens
    assert out.target_forwards == len(verified) + 1


def test_switching_rule_holds_each_model_for_the_minimum_duration():
    rule = EntropySwitch(threshold=1.0, window_size=2, min_duration=3)
    assert rule.model == LARGE  # the prefill's model; the first decision is free
    assert rule.observe(0.2) == SMALL
    assert [rule.observe(h) for h in (5.0, 5.0)] == [SMALL, SMALL]  # held: only 1, 2 tokens so far
    assert rule.observe(5.0) == LARGE  # 3 small tokens, mean 5.0 > 1.0
    assert [rule.observe(h) for h in (0.0, 0.0, 0.0)] == [LARGE, LARGE, SMALL]
    assert rule.observe(1.5) == SMALL  # held again, whatever the entropy
    assert rule.switches == 3


def test_sampling_runs_with_both_models(sharp_pair):
    from decodebench.engine.sampling import SamplingParams

    target, draft = sharp_pair
    drafter = ead_for(target, draft, entropy_threshold=2.0, window_size=2, min_duration=2)
    params = SamplingParams(temperature=0.8)
    outs = [decode(target, drafter, random_prompts(1)[0], 24, params, seed=seed) for seed in (1, 1, 2)]
    assert outs[0].new_ids == outs[1].new_ids  # seeded
    assert all(len(o.new_ids) == 24 for o in outs)


def test_bad_hyperparameter_exits_2_before_loading(tmp_path):
    result = run_cli(
        "method=ead", "model=tiny-llama", "model.draft=tiny-llama-draft", "method.params.window_size=0",
        f"results_dir={tmp_path}/results", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid value for 'method.params.window_size': 0 (allowed: >= 1)" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr and not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "override, key",
    [("method.params.min_duration=0", "min_duration"), ("method.params.entropy_threshold=nan", "entropy_threshold")],
)
def test_bad_hyperparameters_are_config_errors(override, key):
    from decodebench.config import ConfigValueError, compose_run_config, validate_before_loading

    with pytest.raises(ConfigValueError, match=f"invalid value for 'method.params.{key}'"):
        validate_before_loading(compose_run_config(["method=ead", "model=tiny-llama", override]))


def test_batch_is_refused_before_loading():
    from decodebench.config import ConfigValueError, compose_run_config, validate_before_loading

    cfg = compose_run_config(["method=ead", "model=tiny-llama", "model.draft=tiny-llama-draft", "gen.batch_size=2"])
    with pytest.raises(ConfigValueError, match="gen.batch_size"):
        validate_before_loading(cfg)


def test_cli_run_end_to_end_reports_quality_agreement_and_fractions(tmp_path, data_dir):
    """The tiny pair through the runner: lossy (token match rate, no lossless verdict), the token
    fractions per record, τ = tokens per target forward."""
    import json

    from decodebench.runners.run_dir import read_records

    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny-llama", "model.draft=tiny-llama-draft", "method=ead", "method.params.entropy_threshold=12.0",
        "task=gsm8k", "task.limit=2", "gen.max_new_tokens=24", f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}", "progress=false", "threads=1", cwd=tmp_path,
        env={"DECODEBENCH_DATA": str(data_dir)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ead[balanced]" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["lossless_rate"] is None
    assert summary["token_match_rate"] is not None and summary["speedup"] > 0
    records = [r for r in read_records(run_dir / "records.jsonl") if r.role == "method"]
    assert len(records) == 2
    for record in records:
        stats = record.method_stats
        assert stats["large_tokens"] + stats["small_tokens"] == record.new_tokens
        assert record.steps == stats["large_tokens"]  # target forwards: the prefill + large-model steps
        assert record.quality and record.token_match_rate is not None
