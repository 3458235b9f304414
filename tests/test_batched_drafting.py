"""Batched drafting with a draft model (SpS in a batch): the rows share one batched draft KV cache and
the draft model runs once per draft level for the whole batch (one padded catch-up forward, then one
one-token forward per further level), not once per row and draft token. Under greedy decoding the
batched drafts are the row-by-row drafts, token for token, with rows at different γ (heuristic
schedule) and rows leaving the batch at different steps; each row still equals AR at batch size 1."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.engine.drafting import Drafter
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import build_method, method_config
from decodebench.methods.sps import ChainDrafter, SpeculativeSamplingDrafter

from helpers import VOCAB, random_prompts, stop_at_different_steps, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 3
NEW_TOKENS = 20


def batch_prompts() -> list[list[int]]:
    """Three random prompts of 10, 17 and 24 tokens."""
    return [p[: 10 + 7 * i] for i, p in enumerate(random_prompts(BATCH, length=24))]


@pytest.fixture(scope="module")
def models():
    return tiny_pair("llama")


@pytest.fixture(scope="module")
def stop_settings(models) -> DecodeSettings:
    """Greedy, NEW_TOKENS tokens, with a stop id that ends the rows after different numbers of decode
    steps (a token AR emits in some rows, never among a row's first two tokens)."""
    return stop_at_different_steps(models[0], batch_prompts(), NEW_TOKENS)


@pytest.fixture(scope="module")
def ar_reference(models, stop_settings) -> list[list[int]]:
    target, _ = models
    ar = build_method(MethodConfig())
    ids = [generate(target, ar, p, stop_settings, target.new_cache(16)).new_ids for p in batch_prompts()]
    assert len({len(row) for row in ids}) == BATCH and min(map(len, ids)) > 2, "rows should end at different steps"
    return ids


def chain_drafter(models, method: str = "sps", cache_dir: str | None = None, **params) -> ChainDrafter:
    target, draft = models
    drafter = build_method(MethodConfig(name=method, impl=method_config(method).impl, params=params))
    drafter.attach_draft(draft)
    drafter.setup(target, cache_dir)
    return drafter


def untrained_specdec_head(models, cache_dir: str) -> None:
    """A random SpecDec++ acceptance head saved where the method looks (its stopping decisions are
    what batching must keep, not their quality)."""
    from decodebench.methods.draft_heads import checkpoint_dir, model_key, save_checkpoint
    from decodebench.methods.specdec_pp_net import SpecDecPPNet

    target, draft = models
    torch.manual_seed(0)
    net = SpecDecPPNet(target, SpecDecPPNet.Params(mode="greedy"), None, draft=draft)
    directory = checkpoint_dir(cache_dir, model_key(target), net.network)
    save_checkpoint(directory, net.checkpoint_state(), net.checkpoint_config(target))


def batch_steps(outputs) -> list[list[int]]:
    """Drafts per live row at each step of the batch (a row's steps are the batch's first steps)."""
    longest = max(len(o.steps) for o in outputs)
    return [[o.steps[k].drafted for o in outputs if len(o.steps) > k] for k in range(longest)]


def test_the_draft_model_runs_once_per_draft_level_for_the_whole_batch(
    models, stop_settings, ar_reference, monkeypatch
):
    target, draft = models
    calls: list[tuple[int, list[int]]] = []  # (rows, real tokens per row) of each batched draft forward
    batched = draft.forward_batch

    def counting_forward_batch(ids, cache, **kwargs):
        calls.append((ids.shape[0], list(kwargs["sizes"])))
        return batched(ids, cache, **kwargs)

    def refused_forward(*args, **kwargs):
        raise AssertionError("a one-row draft forward in a batch")

    monkeypatch.setattr(draft, "forward_batch", counting_forward_batch)
    monkeypatch.setattr(draft, "forward", refused_forward)
    out = generate_batch(
        target, chain_drafter(models), batch_prompts(), stop_settings, target.new_cache(16, batch_size=BATCH)
    )
    assert [o.new_ids for o in out.outputs] == ar_reference

    # per step: one catch-up forward + (γ - 1) one-token forwards, each over every live row
    expected = [len(drafted) for drafted in batch_steps(out.outputs) for _ in range(max(drafted))]
    assert [rows for rows, _ in calls] == expected
    assert min(expected) < BATCH, "rows that finished must leave the draft batch too"
    row_forwards = sum(s.drafted for o in out.outputs for s in o.steps)  # what row-by-row drafting runs
    assert len(calls) < row_forwards / 2
    # the first catch-up feeds each prompt and its first token; later ones what the cache lacks (<= 2)
    assert calls[0][1] == [len(p) + 1 for p in batch_prompts()]
    levels = iter(calls)
    for step, drafted in enumerate(batch_steps(out.outputs)):
        catch_up, *one_token = [next(levels)[1] for _ in range(max(drafted))]
        assert all(size == 1 for sizes in one_token for size in sizes if size)
        assert step == 0 or max(catch_up) <= 2


def proposals_of(models, settings, runs: int, row_by_row: bool, monkeypatch, method: str, cache_dir, **params):
    """Every step's draft tokens per live row over ``runs`` batches decoded with one drafter (its
    row copies and their draft caches kept from batch to batch), and the outputs."""
    implementation = (Drafter if row_by_row else ChainDrafter).propose_rows.__func__
    log: list[list[list[int]]] = []

    def recording(cls, drafters, contexts, limits, device):
        drafted = implementation(cls, drafters, contexts, limits, device)
        log.append([p.tokens for p in drafted.proposals])
        return drafted

    target, _ = models
    drafter = chain_drafter(models, method, cache_dir, **params)
    monkeypatch.setattr(type(drafter), "propose_rows", classmethod(recording))
    outputs = [
        generate_batch(target, drafter, batch_prompts(), settings, target.new_cache(16, batch_size=BATCH))
        for _ in range(runs)
    ]
    monkeypatch.undo()
    return log, outputs


@pytest.mark.parametrize(
    "method, params",
    [
        ("sps", {"schedule": "constant"}),
        ("sps", {"schedule": "heuristic"}),
        ("specdec_pp", {"use_head": False}),
        ("specdec_pp", {}),
    ],
    ids=["sps-constant", "sps-heuristic", "specdec_pp-confidence", "specdec_pp-head"],
)
def test_batched_drafts_equal_row_by_row_drafts(
    method, params, models, stop_settings, ar_reference, monkeypatch, tmp_path
):
    """Greedy fp32: the same draft tokens for every row at every step, batched or row by row, also
    when the rows draft different numbers of tokens (heuristic γ, SpecDec++'s stopping rule, the last
    tokens) and leave the batch at different steps, and again in a second batch on the same row
    drafters."""
    if method == "specdec_pp" and params.get("use_head", True):
        untrained_specdec_head(models, str(tmp_path))
    run = (models, stop_settings, 2)
    batched, batched_out = proposals_of(*run, False, monkeypatch, method, str(tmp_path), **params)
    rows, rows_out = proposals_of(*run, True, monkeypatch, method, str(tmp_path), **params)
    assert batched == rows
    for out in (*batched_out, *rows_out):
        assert [o.new_ids for o in out.outputs] == ar_reference
    assert any(len({len(tokens) for tokens in step}) > 1 for step in batched), "rows should draft different lengths"
    assert sum(s.accepted for o in batched_out[0].outputs for s in o.steps) > 0
    if params.get("schedule") != "heuristic":  # nothing carries over between batches: the second drafts the same
        half = len(batched) // 2
        assert batched[:half] == batched[half:]


def test_batched_sampling_drafts_carry_their_distributions(models, monkeypatch):
    """Under sampling every row's drafts come with the distributions they were drawn from (what the
    Leviathan verifier needs), one row per draft, each giving its draft a positive probability."""
    seen: list = []
    implementation = SpeculativeSamplingDrafter.propose_rows.__func__

    def checking(cls, drafters, contexts, limits, device):
        drafted = implementation(cls, drafters, contexts, limits, device)
        seen.extend(p for p in drafted.proposals if p.tokens)
        return drafted

    monkeypatch.setattr(SpeculativeSamplingDrafter, "propose_rows", classmethod(checking))
    target, _ = models
    settings = DecodeSettings(max_new_tokens=12, sampling=SamplingParams(temperature=0.8))
    cache = target.new_cache(16, batch_size=BATCH)
    out = generate_batch(
        target, chain_drafter(models), batch_prompts(), settings, cache, torch.Generator().manual_seed(0)
    )
    assert all(len(o.new_ids) == 12 and all(0 <= t < VOCAB for t in o.new_ids) for o in out.outputs)
    assert seen
    for proposal in seen:
        assert proposal.probs.shape == (len(proposal), target.lm_head.out_features)
        assert all(proposal.probs[i, token] > 0 for i, token in enumerate(proposal.tokens))
        torch.testing.assert_close(proposal.probs.sum(-1), torch.ones(len(proposal)))
