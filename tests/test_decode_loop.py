"""The one decode loop: AR equals HF greedy generation; lossless methods equal AR token for token."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.decode_loop import DecodeSettings, StopChecker
from decodebench.engine.drafting import Drafter, Proposal
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import available_methods, build_method, method_config

from helpers import decode as decode_once
from helpers import repeating_prompts

PLD = dict(name="pld", impl="decodebench.methods.pld:PromptLookupDrafter")
# every decode here starts from a freshly set-up drafter
decode = partial(decode_once, setup=True)


def test_ar_equals_hf_greedy_generate(backbone):
    ar = build_method(MethodConfig())
    for prompt in repeating_prompts(3):
        ours = decode(backbone, ar, prompt, max_new_tokens=40)
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            theirs = backbone.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=40,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert ours.new_ids == theirs[0, len(prompt) :].tolist()
        assert ours.target_forwards == len(ours.new_ids)  # AR: one forward per token (tau = 1)


@pytest.mark.parametrize("draft_tokens", [1, 2, 10])
def test_pld_greedy_equals_ar(backbone, draft_tokens):
    ar = build_method(MethodConfig())
    pld = build_method(MethodConfig(**PLD, params={"num_draft_tokens": draft_tokens}))
    accepted = 0
    for prompt in repeating_prompts():
        reference = decode(backbone, ar, prompt)
        ours = decode(backbone, pld, prompt)
        assert ours.new_ids == reference.new_ids
        assert sum(s.emitted for s in ours.steps) + 1 == len(ours.new_ids)
        assert all(s.drafted <= draft_tokens for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "PLD never got a draft accepted: the losslessness check proves nothing"


def test_pld_sampling_is_reproducible_and_uses_target_distribution(backbone):
    pld = build_method(MethodConfig(**PLD))
    sampling = SamplingParams(temperature=0.8)
    first = decode(backbone, pld, repeating_prompts()[0], sampling=sampling, seed=3)
    second = decode(backbone, pld, repeating_prompts()[0], sampling=sampling, seed=3)
    assert first.new_ids == second.new_ids
    assert len(first.new_ids) == 48


def test_pld_proposals_follow_earliest_match():
    pld = build_method(MethodConfig(**PLD, params={"num_draft_tokens": 3}))
    context = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3]

    def propose(ctx, budget=10):  # a fresh request each time (the index assumes append-only context)
        pld.begin(ctx)
        return pld.propose(ctx, budget).tokens

    assert propose(context) == [4, 5, 9]  # trigram (1,2,3) first seen at 0
    assert propose(context + [6]) == []  # (…, 3, 6) / (6,) never seen before
    assert propose(context + [9]) == [2, 3, 7]  # (3, 9) unseen -> unigram (9,) first at 5
    assert propose(context + [9], 1) == [2]  # budget respected
    assert propose([5]) == []
    # growing the context step by step gives the same answers as a fresh index
    pld.begin([])
    for end in range(1, len(context) + 1):
        assert pld.propose(context[:end], 10) == build_method(
            MethodConfig(**PLD, params={"num_draft_tokens": 3})
        ).propose(context[:end], 10)


def test_stops_at_eos_and_counts_it(backbone):
    ar = build_method(MethodConfig())
    free = decode(backbone, ar, repeating_prompts()[1])
    eos = free.new_ids[5]
    stopped = decode(backbone, ar, repeating_prompts()[1], eos=[eos])
    assert stopped.stop_reason == "eos"
    assert stopped.new_ids == free.new_ids[: free.new_ids.index(eos) + 1]
    pld = build_method(MethodConfig(**PLD))
    assert decode(backbone, pld, repeating_prompts()[1], eos=[eos]).new_ids == stopped.new_ids


def test_stop_strings_checked_token_by_token():
    class FakeTokenizer:
        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    checker = StopChecker(DecodeSettings(max_new_tokens=100, stop_strings=["7 8"], tokenizer=FakeTokenizer()))
    assert checker.check([1, 7]) is None
    assert checker.check([1, 7, 8]) == "stop_string"
    assert StopChecker(DecodeSettings(max_new_tokens=2)).check([1, 2]) == "max_new_tokens"


def test_tree_proposals_are_verified_losslessly(backbone):
    """A drafter proposing a 2-branch tree (one branch = AR's future) emits AR's tokens."""
    ar = build_method(MethodConfig())
    prompt = repeating_prompts()[2]
    reference = decode(backbone, ar, prompt).new_ids

    class OracleTree(Drafter):
        def begin(self, prompt_ids):
            self.prompt_len = len(prompt_ids)

        def propose(self, context, max_tokens):
            done = len(context) - self.prompt_len
            truth = reference[done : done + 2]
            if len(truth) < 2 or max_tokens < 2:
                return Proposal()
            wrong = (truth[0] + 1) % 101
            # nodes: 0 = wrong, 1 = truth[0], 2 = child of wrong, 3 = truth[1] under truth[0]
            return Proposal(tokens=[wrong, truth[0], 5, truth[1]], parents=[-1, -1, 0, 1])

    out = decode(backbone, OracleTree(), prompt)
    assert out.new_ids == reference
    assert max(s.accepted for s in out.steps) == 2


def test_every_method_yaml_builds():
    for name in available_methods():
        cfg = method_config(name)
        for device in ("cpu", "cuda"):
            assert isinstance(build_method(cfg, device), Drafter)


def test_aux_tokens_never_change_the_output_and_get_logits(backbone):
    """Auxiliary tokens (LADE's lookahead branch) share the forward but not the verification."""
    ar = build_method(MethodConfig())
    prompt = repeating_prompts()[3]
    reference = decode(backbone, ar, prompt).new_ids
    seen = []

    class WithAux(Drafter):
        def propose(self, context, max_tokens):
            self.context = list(context)
            aux = [7, 8, 9]
            mask = torch.zeros(3, 2 + 3, dtype=torch.bool)  # over [root, draft, aux0, aux1, aux2]
            mask[:, 0] = True  # every aux token sees the root ...
            for j in range(3):
                mask[j, 2 : 2 + j + 1] = True  # ... and the aux chain up to itself, never the draft
            return Proposal(tokens=[5], aux_tokens=aux, aux_mask=mask, aux_offsets=[1, 2, 3])

        def feedback(self, outcome):
            seen.append((self.context, outcome.target.logits[2:].clone()))

    out = decode(backbone, WithAux(), prompt)
    assert out.new_ids == reference
    context, aux_logits = seen[4]
    with torch.inference_mode():
        expected = backbone.model(torch.tensor([context + [7, 8, 9]])).logits[0, -3:]
    torch.testing.assert_close(aux_logits, expected, atol=1e-4, rtol=0)
