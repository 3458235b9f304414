"""Token Recycling: greedy output equals AR; adjacency matrix updates; tree template; state policies."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import ConfigValueError
from decodebench.engine.backbone import ForwardOutput
from decodebench.engine.drafting import Proposal, StepOutcome
from decodebench.engine.verify import VerifyResult
from decodebench.methods import build_method, method_config
from decodebench.methods.state_policy import state_path
from decodebench.methods.token_recycling import PAPER_TREE, TokenRecyclingDrafter, TreeTemplate
from decodebench.runners.run_dir import read_records

from helpers import decode, embedded_method_summary, repeating_prompts


def recycling(preset: str = "paper", **params) -> TokenRecyclingDrafter:
    cfg = method_config("token_recycling")
    cfg.preset, cfg.params = preset, {**cfg.params, **params}
    return build_method(cfg)


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_greedy_output_equals_ar_and_drafts_get_accepted(backbone, ar_outputs, preset):
    drafter = recycling(preset)
    drafter.setup(backbone)
    accepted = 0
    for prompt, reference in zip(repeating_prompts(), ar_outputs):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference
        assert all(s.drafted <= len(drafter.template.parents) for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


def test_paper_tree_is_the_reference_template():
    template = TreeTemplate.from_paths(PAPER_TREE)
    assert len(PAPER_TREE) == 80 and max(template.depths) == 6
    assert [template.depths.count(d) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    # the Params default is the one source of the tree; the paper preset keeps it
    paper = method_config("token_recycling").resolved_params("cuda")
    assert TokenRecyclingDrafter.Params().tree == PAPER_TREE == paper["tree"]
    assert paper["candidates"] == 8
    # parents come first and a node's parent path is its path minus the last rank
    for i, path in enumerate(PAPER_TREE):
        parent = template.parents[i]
        assert parent < i and (PAPER_TREE[parent] if parent >= 0 else []) == path[:-1]


def test_propose_fills_the_template_breadth_first_from_the_matrix():
    drafter = TokenRecyclingDrafter(TokenRecyclingDrafter.Params(candidates=2, tree=[[0], [1], [0, 0], [0, 1], [1, 0]]))
    drafter.vocab_size = 10
    drafter._clear_state()
    drafter.adj[5] = torch.tensor([6, 7])
    drafter.adj[6] = torch.tensor([8, 9])
    drafter.adj[7] = torch.tensor([1, 2])
    proposal = drafter.propose([3, 4, 5], max_tokens=10)
    assert proposal.tokens == [6, 7, 8, 9, 1]
    assert proposal.parents == [-1, -1, 0, 0, 1]
    # near the end of a generation: at most max_tokens nodes, shallowest first
    assert drafter.propose([5], max_tokens=3) == Proposal(tokens=[6, 7, 8], parents=[-1, -1, 0])
    assert drafter.propose([5], max_tokens=0).tokens == []
    # a fresh matrix is all zeros (as in the reference): every candidate is token 0
    assert drafter.propose([9], max_tokens=10).tokens == [0] * 5


def fake_outcome(block_tokens, block_parents, logits, accepted_nodes) -> StepOutcome:
    result = VerifyResult(
        accepted_nodes=accepted_nodes,
        accepted_tokens=[block_tokens[i] for i in accepted_nodes],
        bonus_token=0,
        drafted=len(block_tokens) - 1,
    )
    return StepOutcome(
        proposal=Proposal(tokens=block_tokens[1:], parents=[p - 1 for p in block_parents[1:]]),
        result=result,
        block_tokens=block_tokens,
        block_parents=block_parents,
        target=ForwardOutput(logits=logits),
        context_length=10,
    )


def test_feedback_recycles_top_k_of_every_node_and_the_accepted_path_wins_ties():
    drafter = TokenRecyclingDrafter(TokenRecyclingDrafter.Params(candidates=3, tree=[[0], [1], [0, 0]]))
    drafter.vocab_size = 12
    drafter._clear_state()
    # block: root 4, drafts 5 (child of root), 7 (child of root), 7 (child of 5)
    tokens, parents = [4, 5, 7, 7], [-1, 0, 0, 1]
    logits = torch.zeros(4, 12)
    for row, top in enumerate([[1, 2, 3], [6, 5, 4], [9, 8, 7], [11, 10, 0]]):
        logits[row, top] = torch.tensor([3.0, 2.0, 1.0])
    drafter.feedback(fake_outcome(tokens, parents, logits, accepted_nodes=[2]))  # path: root -> node 2 (token 7)
    assert drafter.adj[4].tolist() == [1, 2, 3]
    assert drafter.adj[5].tolist() == [6, 5, 4]
    assert drafter.adj[7].tolist() == [9, 8, 7]  # node 2 is on the accepted path: it beats node 3
    assert drafter.adj[0].tolist() == [0, 0, 0]  # untouched rows stay
    drafter.feedback(fake_outcome(tokens, parents, logits, accepted_nodes=[]))
    assert drafter.adj[7].tolist() == [11, 10, 0]  # no accepted node: the last occurrence wins


def test_params_are_validated():
    Params = TokenRecyclingDrafter.Params
    with pytest.raises(ConfigValueError, match="method.params.tree"):
        Params(tree=[[0, 0]])  # parent [0] missing
    with pytest.raises(ConfigValueError, match="method.params.tree"):
        Params(candidates=2, tree=[[0], [2]])  # rank outside the top-2
    with pytest.raises(ConfigValueError, match="method.params.tree"):
        Params(tree=[[0], [0]])
    with pytest.raises(ConfigValueError, match="method.params.state"):
        Params(state="forever")
    with pytest.raises(ConfigValueError, match="method.params.candidates"):
        Params(candidates=0)


# -- state policies -------------------------------------------------------------------------------
def test_per_prompt_starts_every_prompt_from_an_empty_matrix(backbone):
    drafter = recycling("cpu", state="per_prompt")
    drafter.setup(backbone)
    decode(backbone, drafter, repeating_prompts()[0])
    assert drafter.adj.any()
    drafter.begin(repeating_prompts()[1])
    assert not drafter.adj.any()


def test_per_task_keeps_the_matrix_and_reset_state_clears_it(backbone):
    drafter = recycling("cpu", state="per_task")
    drafter.setup(backbone)
    decode(backbone, drafter, repeating_prompts()[0])
    learned = drafter.adj.clone()
    drafter.begin(repeating_prompts()[1])
    assert torch.equal(drafter.adj, learned)
    drafter.reset_state()
    assert not drafter.adj.any()


def test_persistent_state_round_trips_through_the_cache_dir(backbone, tmp_path):
    first = recycling("cpu", state="persistent")
    first.setup(backbone, str(tmp_path))
    assert not first.adj.any()  # nothing saved yet
    decode(backbone, first, repeating_prompts()[0])
    first.finish()
    path = state_path(str(tmp_path), "token_recycling", backbone)
    assert path.is_file() and path.parent == tmp_path / "state" and path.name.startswith("token_recycling-")
    second = recycling("cpu", state="persistent")
    second.setup(backbone, str(tmp_path))
    assert torch.equal(second.adj, first.adj)
    decode(backbone, second, repeating_prompts()[1])  # learn more, then the runner's reset returns to the loaded state
    second.reset_state()
    assert torch.equal(second.adj, first.adj)
    # a matrix of another shape (k) does not fit: start empty instead of failing
    other = recycling(None, state="persistent", candidates=4, tree=[[0], [1]])
    other.setup(backbone, str(tmp_path))
    assert other.adj.shape[1] == 4 and not other.adj.any()


# -- the embedded model ---------------------------------------------------------------------------
@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_token_recycling_is_lossless_and_speculates(tmp_path, data_dir):
    """SmolLM2-135M (fp32, greedy), default (cpu) preset: output equals AR token for token."""
    summary = embedded_method_summary("token_recycling", tmp_path, data_dir, timeout=900)
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["tau"] > 1.0
    records = [r for r in read_records(tmp_path / "run" / "records.jsonl") if r.role == "method"]
    assert records and all(r.first_divergence is None for r in records)
