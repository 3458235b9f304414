"""Medusa's typical acceptance (``method=medusa_typical``, lossy under sampling): the tree verifier
agrees with the reference's vectorised ``evaluate_posterior`` on the tree's root-to-leaf candidates,
the bonus token is never below its node's bar, greedy decoding stays exact, and the method is
declared lossy."""

from __future__ import annotations

import random

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.sampling import SamplingParams
from decodebench.engine.tree import children_lists
from decodebench.methods import build_method, method_config
from decodebench.methods.draft_heads import checkpoint_dir, model_key, save_checkpoint
from decodebench.methods.medusa import MedusaTypicalDrafter
from decodebench.methods.medusa_heads import MedusaHeads
from decodebench.methods.medusa_typical import typical_thresholds, verify_typical

from helpers import decode, random_prompts, tiny_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_evaluate_posterior(logits, candidates, temperature, posterior_threshold, posterior_alpha):
    """FasterDecoding/Medusa ``evaluate_posterior`` (typical branch) on ``candidates (c, L)`` whose
    column 0 is the root and ``logits (c, L, vocab)``: (best candidate, accept length)."""
    posterior_prob = torch.softmax(logits[:, :-1] / temperature, dim=-1)
    candidates_prob = torch.gather(posterior_prob, dim=-1, index=candidates[:, 1:].unsqueeze(-1)).squeeze(-1)
    posterior_entropy = -torch.sum(posterior_prob * torch.log(posterior_prob + 1e-5), dim=-1)
    threshold = torch.minimum(
        torch.ones_like(posterior_entropy) * posterior_threshold, torch.exp(-posterior_entropy) * posterior_alpha
    )
    posterior_mask = candidates_prob > threshold
    candidates_accept_length = (torch.cumprod(posterior_mask, dim=1)).sum(dim=1)
    accept_length = candidates_accept_length.max()
    if accept_length == 0:
        return 0, 0
    best_candidates = torch.where(candidates_accept_length == accept_length)[0]
    likelihood = torch.sum(torch.log(candidates_prob[best_candidates, :accept_length]), dim=-1)
    return int(best_candidates[torch.argmax(likelihood)]), int(accept_length)


def random_tree(rng: random.Random, nodes: int, vocab: int) -> tuple[list[int], list[int]]:
    parents = [-1] + [rng.randrange(0, i) for i in range(1, nodes)]
    return [rng.randrange(vocab) for _ in range(nodes)], parents


@pytest.mark.parametrize("threshold, alpha", [(0.09, 0.3), (0.3, 0.55), (0.02, 0.15)])
def test_tree_verifier_matches_the_reference_on_every_path(threshold, alpha):
    rng, vocab, params = random.Random(0), 6, SamplingParams(temperature=0.7)
    for trial in range(40):
        tokens, parents = random_tree(rng, 8, vocab)
        logits = torch.randn(len(tokens), vocab, generator=torch.Generator().manual_seed(trial)) * 2
        result = verify_typical(tokens, parents, logits, params, torch.Generator().manual_seed(0), threshold, alpha)
        children = children_lists(parents)
        leaves = [n for n in range(len(tokens)) if not children[n]]
        paths = []
        for leaf in leaves:
            path, node = [], leaf
            while node >= 0:
                path.append(node)
                node = parents[node]
            paths.append(path[::-1])
        width = max(map(len, paths))
        padded = [p + [p[-1]] * (width - len(p)) for p in paths]  # repeat the leaf: rows past it never count
        candidates = torch.tensor([[tokens[n] for n in p] for p in padded])
        # the padding never extends a path: the rows judging it give its token (0) no probability
        cand_logits = logits[torch.tensor(padded)]  # a copy
        for row, path in enumerate(paths):
            candidates[row, len(path) :] = 0
            cand_logits[row, len(path) - 1 :, 0] = -1e4
        best, length = reference_evaluate_posterior(cand_logits, candidates, 0.7, threshold, alpha)
        assert result.accepted == length
        assert result.accepted_nodes == paths[best][1 : 1 + length]


def test_bonus_token_is_never_below_the_bar():
    params, vocab = SamplingParams(temperature=1.0), 8
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    bar = typical_thresholds(torch.softmax(logits, -1), 0.09, 0.3)[0]
    allowed = {t for t in range(vocab) if float(torch.softmax(logits, -1)[0, t]) >= float(bar)}
    seen = {
        verify_typical([0], [-1], logits, params, torch.Generator().manual_seed(s), 0.09, 0.3).bonus_token
        for s in range(200)
    }
    assert seen <= allowed and len(allowed) < vocab


def test_method_is_lossy_and_greedy_stays_exact(tmp_path):
    assert method_config("medusa_typical").lossless is False and method_config("medusa").lossless is True
    backbone = tiny_backbone("llama")
    torch.manual_seed(1)
    heads = MedusaHeads(backbone, MedusaHeads.Params())
    save_checkpoint(
        checkpoint_dir(str(tmp_path), model_key(backbone), "medusa"),
        heads.checkpoint_state(),
        heads.checkpoint_config(backbone),
    )
    spec = MedusaTypicalDrafter(MedusaTypicalDrafter.Params(tree_nodes=5))
    spec.setup(backbone, str(tmp_path))
    ar = build_method(MethodConfig())
    prompt = random_prompts(1, seed=4)[0]
    assert decode(backbone, spec, prompt, max_new_tokens=16).new_ids == decode(backbone, ar, prompt, 16).new_ids
    out = decode(backbone, spec, prompt, max_new_tokens=16, sampling=SamplingParams(temperature=1.0), seed=0)
    assert len(out.new_ids) == 16


def test_bad_typical_settings_are_refused():
    with pytest.raises(Exception, match="method.params.posterior_threshold"):
        MedusaTypicalDrafter.Params(posterior_threshold=1.5)
