"""Lookahead (PIA, trie cache): greedy output equals AR; trie insert / retrieve / prune; state policies."""

from __future__ import annotations

import pytest
import torch

from decodebench.config import ConfigValueError
from decodebench.methods import build_method, method_config
from decodebench.methods.lookahead import LookaheadDrafter
from decodebench.methods.lookahead_trie import (
    AnchorTrie,
    DraftTree,
    RetrievalSettings,
    TrieCache,
    _admission,
    _live_nodes,
    parallel_branches,
)
from decodebench.methods.state_policy import state_path
from decodebench.runners.run_dir import read_records

from helpers import decode, embedded_method_summary, repeating_prompts


def lookahead(preset: str = "paper", **params) -> LookaheadDrafter:
    cfg = method_config("lookahead")
    cfg.preset, cfg.params = preset, {**cfg.params, **params}
    return build_method(cfg)


def settings(max_drafts=63, branch_length=12, mode="mix", min_output_size=32) -> RetrievalSettings:
    return RetrievalSettings(
        max_drafts=max_drafts,
        branch_length=branch_length,
        mode=mode,
        output_weight=1e-4,
        min_output_size=min_output_size,
    )


@pytest.mark.parametrize("preset, mode", [("paper", "hier"), ("paper", "par"), ("cpu", "hier")])
def test_greedy_output_equals_ar_and_drafts_get_accepted(backbone, ar_outputs, preset, mode):
    drafter = lookahead(preset, decoding_mode=mode)
    drafter.setup(backbone)
    accepted = 0
    for prompt, reference in zip(repeating_prompts(), ar_outputs):
        ours = decode(backbone, drafter, prompt)
        assert ours.new_ids == reference
        assert all(s.drafted < drafter.params.decoding_length for s in ours.steps)
        accepted += sum(s.accepted for s in ours.steps)
    assert accepted > 0, "no draft was ever accepted: the losslessness check proves nothing"


# -- the trie ------------------------------------------------------------------------------------
def test_insert_counts_prompt_and_output_separately():
    trie = AnchorTrie()
    trie.insert([1, 2, 3], output=False)
    trie.insert([1, 2, 3], output=False)
    trie.insert([1, 4], output=True)
    one = trie.children[1]
    assert (one.input_count, one.output_count) == (2.0, 1.0)
    assert one.children[2].children[3].input_count == 2.0
    assert one.children[4].output_count == 1.0 and one.children[4].input_count == 0.0
    assert (trie.node_count, trie.output_node_count) == (4, 1)


def test_every_prompt_position_anchors_the_tokens_after_it_and_eos_cuts():
    cache = TrieCache(insert_length=2, eos_ids=[99])
    cache.put_prompt([10, 11, 12, 13, 99, 14])
    assert set(cache.tries) == {10, 11, 12}
    assert list(cache.tries[10].children) == [11] and list(cache.tries[10].children[11].children) == [12]
    assert list(cache.tries[11].children[12].children) == [13]
    assert list(cache.tries[12].children) == [13]  # the branch ends at EOS


def test_output_stream_inserts_an_anchor_once_its_branch_is_complete():
    cache = TrieCache(insert_length=3)
    cache.stream_output([1, 2, 3])
    assert cache.tries == {}  # anchor 1 still lacks a third follower
    cache.stream_output([4])
    assert set(cache.tries) == {1} and cache.pending == [2, 3, 4]
    cache.end_generation()  # final flush: the remaining anchors with what follows them
    assert set(cache.tries) == {1, 2, 3} and cache.pending == []
    assert list(cache.tries[3].children) == [4] and cache.tries[3].children[4].output_count == 1.0


def test_end_generation_drops_prompt_counts_and_prompt_only_paths():
    cache = TrieCache(insert_length=2)
    cache.put_prompt([5, 6, 7])
    cache.stream_output([5, 6, 8], final=False)
    cache.end_generation()
    node = cache.tries[5].children[6]
    assert (node.input_count, node.output_count) == (0.0, 1.0)
    assert list(node.children) == [8]  # 5 -> 6 -> 7 came only from the prompt: removed
    assert 6 in cache.tries and list(cache.tries[6].children) == [8]


def test_squeeze_halves_frequent_output_paths_and_prunes_the_rest():
    cache = TrieCache(insert_length=2, max_output_nodes=2, squeeze_after=1)
    for _ in range(4):  # four generations output 1 2 3
        cache.stream_output([1, 2, 3])
        cache.end_generation()
    cache.stream_output([1, 5])  # one generation outputs 1 5
    cache.end_generation()
    trie = cache.tries[1]
    assert trie.node_count <= 3  # squeezed after the generations that outgrew max_output_nodes
    two = trie.children[2]
    assert two.output_count < 4.0 and 5 not in trie.children  # halved; the once-seen branch pruned


def test_retrieval_ranks_prompt_evidence_first_and_respects_budget_and_depth():
    cache = TrieCache(insert_length=4)
    cache.put_prompt([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 7, 8])  # after (1, 2): 3 4 1 (twice), 7 8 (once)
    for _ in range(5):
        cache.stream_output([1, 2, 9, 9, 9], final=True)  # outputs say 9, five times: a tie-breaker only
    tree = cache.retrieve([1, 2], settings(max_drafts=63, branch_length=3))
    assert tree.tokens[:3] == [3, 4, 1] and tree.parents[:3] == [-1, 0, 1]  # depth-first, best child first
    assert tree.tokens[3] == 7 and tree.parents[3] == -1
    assert max(depth(tree, i) for i in range(len(tree))) <= 3
    assert len(cache.retrieve([1, 2], settings(max_drafts=2, branch_length=3))) == 2
    # output-only ranking puts the outputs' continuation first
    assert cache.retrieve([1, 2], settings(mode="output", branch_length=3)).tokens[0] == 9


def depth(tree: DraftTree, node: int) -> int:
    return 1 if tree.parents[node] < 0 else 1 + depth(tree, tree.parents[node])


def test_query_falls_back_to_the_last_token_when_the_two_token_match_is_short():
    cache = TrieCache(insert_length=3)
    cache.put_prompt([1, 2, 3, 8, 2, 4, 5, 6])  # (1, 2) continues with 3 8 ...; 2 alone also with 4 5 6
    long_enough = cache.retrieve([1, 2], settings(branch_length=3))
    assert long_enough.tokens[:2] == [3, 8]  # 3 tokens (root included) >= branch_length: kept
    fallback = cache.retrieve([1, 2], settings(branch_length=6))
    assert set(fallback.tokens) >= {3, 4, 5, 6}  # too short: 2's own trie replaces it
    assert cache.retrieve([42, 43], settings()).tokens == []  # unknown tokens: no draft


def test_large_subtrees_admit_top_output_nodes_and_the_best_mixed_weights():
    trie = AnchorTrie()
    for token, input_count, output_count in [(1, 3, 0), (2, 2, 0), (3, 1, 0), (4, 0, 5), (5, 0, 1), (6, 0, 2)]:
        if input_count:
            trie.insert([token], output=False, count=input_count)
        if output_count:
            trie.insert([token], output=True, count=output_count)
    nodes = _live_nodes(trie.children, "mix")
    admit = _admission(nodes, settings(max_drafts=4, min_output_size=1))  # 6 live nodes > 5 allowed
    admitted = {token for token, node in trie.children.items() if admit(node)}
    assert admitted == {1, 2, 3, 4, 6}  # top output (4), then by mixed weight until 5 are in
    assert _admission(nodes, settings(max_drafts=10)) is None  # small subtree: everything may go


def test_par_mode_turns_the_tree_into_independent_chains_within_the_budget():
    tree = DraftTree(tokens=[10, 11, 12, 20], parents=[-1, 0, 0, -1])  # 10 -> {11, 12}, 20
    chains = parallel_branches(tree)
    assert chains.tokens == [10, 11, 10, 12] and chains.parents == [-1, 0, -1, 2]  # 20 cut by the budget
    assert parallel_branches(DraftTree()).tokens == []


def test_snapshot_round_trip_keeps_structure_and_counts():
    cache = TrieCache(insert_length=3)
    cache.put_prompt([1, 2, 3, 4, 2, 3, 5])
    cache.stream_output([7, 8, 9, 7, 8, 6], final=True)
    restored = TrieCache(insert_length=3)
    restored.load_tensors(cache.to_tensors())
    for query in ([1, 2], [2, 3], [7, 8], [9, 7]):
        assert restored.retrieve(query, settings()) == cache.retrieve(query, settings())
    assert torch.equal(restored.to_tensors()["output_count"], cache.to_tensors()["output_count"])


def test_params_are_validated():
    Params = LookaheadDrafter.Params
    with pytest.raises(ConfigValueError, match="method.params.decoding_mode"):
        Params(decoding_mode="tree")
    with pytest.raises(ConfigValueError, match="method.params.decoding_length"):
        Params(decoding_length=1)
    with pytest.raises(ConfigValueError, match="method.params.state"):
        Params(state="global")


# -- state policies -------------------------------------------------------------------------------
def test_per_prompt_clears_the_trie_per_prompt(backbone):
    drafter = lookahead("cpu", state="per_prompt")
    drafter.setup(backbone)
    decode(backbone, drafter, repeating_prompts()[0])
    drafter.begin(repeating_prompts()[1])
    anchors = set(drafter.cache.tries)
    assert anchors <= set(repeating_prompts()[1])  # only the new prompt is in it
    assert all(node.output_count == 0 for trie in drafter.cache.tries.values() for node in trie.children.values())


def test_per_task_keeps_outputs_and_reset_state_empties(backbone):
    drafter = lookahead("cpu", state="per_task")
    drafter.setup(backbone)
    out = decode(backbone, drafter, repeating_prompts()[0])
    drafter.begin(repeating_prompts()[1])  # closes the first generation: its output is in the trie
    assert out.new_ids[0] in drafter.cache.tries
    assert any(node.output_count > 0 for node in drafter.cache.tries[out.new_ids[0]].children.values())
    drafter.reset_state()
    assert drafter.cache.tries == {}


def test_persistent_state_round_trips_through_the_cache_dir(backbone, tmp_path):
    first = lookahead("cpu", state="persistent")
    first.setup(backbone, str(tmp_path))
    assert first.cache.tries == {}
    decode(backbone, first, repeating_prompts()[0])
    first.finish()
    saved = first.cache.to_tensors()
    path = state_path(str(tmp_path), "lookahead", backbone)
    assert path.is_file() and path.name.startswith("lookahead-")
    second = lookahead("cpu", state="persistent")
    second.setup(backbone, str(tmp_path))
    assert all(torch.equal(second.cache.to_tensors()[key], saved[key]) for key in saved)
    decode(backbone, second, repeating_prompts()[1])
    second.reset_state()  # back to what setup loaded
    assert all(torch.equal(second.cache.to_tensors()[key], saved[key]) for key in saved)


# -- the embedded model ---------------------------------------------------------------------------
@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_lookahead_is_lossless_and_speculates(tmp_path, data_dir):
    """SmolLM2-135M (fp32, greedy), default (cpu) preset: output equals AR token for token."""
    summary = embedded_method_summary("lookahead", tmp_path, data_dir, timeout=900)
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0
    assert summary["tau"] > 1.0
    records = [r for r in read_records(tmp_path / "run" / "records.jsonl") if r.role == "method"]
    assert records and all(r.first_divergence is None for r in records)
