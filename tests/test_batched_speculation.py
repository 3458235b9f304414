"""Batched speculation: every row of a batch drafts its own chain or tree, all rows are verified in
ONE target forward (padded, masked, each row at its own cache length), and each row's greedy output
equals AR's at batch size 1 for its prompt, for every lossless method. Also the per-row cache
bookkeeping (commit, rows leaving the batch, one-row views) and the refusal of methods that cannot
batch."""

from __future__ import annotations

import json

import pytest
import torch

from decodebench.config import MethodConfig
from decodebench.engine.backbone import BlockLayout
from decodebench.engine.decode_loop import DecodeSettings, generate, generate_batch
from decodebench.engine.drafting import forget_row_drafters, row_drafters
from decodebench.engine.kv_cache import KVCache
from decodebench.engine.sampling import SamplingParams
from decodebench.methods import available_methods, batchable_methods, build_method, method_config

from helpers import load_benchmark, repeating_prompts, stop_at_different_steps, tiny_backbone, tiny_pair

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 3
NEW_TOKENS = 20


def batch_prompts() -> list[list[int]]:
    """Three prompts of mixed lengths (10, 17, 24 tokens) with repeated n-grams to draft from."""
    return [p[: 10 + 7 * i] for i, p in enumerate(repeating_prompts(BATCH))]


@pytest.fixture(scope="module")
def models():
    """A tiny target and a noisy copy of it as the draft model (draft-model methods)."""
    return tiny_pair("llama")


@pytest.fixture(scope="module")
def stop_settings(models) -> DecodeSettings:
    """Greedy, NEW_TOKENS tokens, with a stop id that ends the rows (and makes them leave the batch)
    after different numbers of decode steps."""
    return stop_at_different_steps(models[0], batch_prompts(), NEW_TOKENS)


@pytest.fixture(scope="module")
def ar_reference(models, stop_settings):
    """AR at batch size 1: each prompt's greedy ids (rows of different lengths)."""
    target, _ = models
    ar = build_method(MethodConfig())
    ids = [generate(target, ar, p, stop_settings, target.new_cache(16)).new_ids for p in batch_prompts()]
    assert len({len(row) for row in ids}) > 1 and min(map(len, ids)) > 2, "rows should end at different steps"
    return ids


def corpus(tmp_path, answers: list[list[int]], prompts: list[list[int]] | None = None) -> str:
    """A token-id corpus file (tiny models have no tokenizer) for the retrieval methods: each prompt
    (``batch_prompts()`` by default) followed by the target's greedy answer, as the target's own
    generations are in the real corpus."""
    path = tmp_path / "corpus.jsonl"
    pairs = zip(batch_prompts() if prompts is None else prompts, answers)
    path.write_text("".join(json.dumps({"token_ids": p + a}) + "\n" for p, a in pairs))
    return str(path)


# method -> params (the tiny models' limits, a token corpus) and whether drafts must get accepted
LOSSLESS = {
    "pld": {},
    "lookahead": {},
    "lade": {},
    "suffix": {},
    "token_recycling": {},
    "aded": {"corpus_prompts": 0},
    "rest": {"corpus": "jsonl", "corpus_path": "CORPUS"},
    "sam": {"corpus": "jsonl", "corpus_path": "CORPUS"},
    "aggressive": {},
    "swift": {},
    "early_exit_spec": {"exit_layer": 1, "num_draft_tokens": 4},
    "del": {},
    "sps": {},
    "dyspec": {},
    "specdec_pp": {"use_head": False},  # the draft's confidence: the head's batching is the same code
    "rsd": {},
    "stand": {},
    "pearl": {},  # one background draft thread per row
}
NO_ACCEPTANCE_NEEDED = {"aggressive", "del", "aded"}  # their tiny-model drafts may all be rejected


@pytest.mark.parametrize("method", sorted(LOSSLESS))
def test_batched_speculation_equals_ar_at_batch_size_one(method, models, stop_settings, ar_reference, tmp_path):
    target, draft = models
    base = method_config(method)
    params = {k: corpus(tmp_path, ar_reference) if v == "CORPUS" else v for k, v in LOSSLESS[method].items()}
    drafter = build_method(MethodConfig(name=method, impl=base.impl, params=params))
    if drafter.needs_draft_model:
        drafter.attach_draft(draft)
    drafter.setup(target, str(tmp_path))
    out = generate_batch(target, drafter, batch_prompts(), stop_settings, target.new_cache(16, batch_size=BATCH))
    assert [o.new_ids for o in out.outputs] == ar_reference
    # a row that stopped left the batch: it records no step after its last token
    assert all(len(o.steps) <= len(o.new_ids) - 1 for o in out.outputs)
    if method not in NO_ACCEPTANCE_NEEDED:
        accepted = sum(s.accepted for o in out.outputs for s in o.steps)
        assert accepted > 0, "no draft was accepted: the losslessness check proves nothing"
    assert len(out.finish_s) == BATCH and max(out.finish_s) <= out.wall_s


def lossless_methods() -> list[str]:
    """Every lossless method of the catalogue (conf/method/*.yaml with ``lossless: true``), AR aside."""
    return sorted(name for name in available_methods() if name != "ar" and method_config(name).lossless)


def test_every_lossless_method_batches_and_is_tested_here():
    """The refusal is only for methods that say they cannot batch; no lossless method does, and the
    tiny-model tests above and below cover each of them."""
    assert set(lossless_methods()) <= set(batchable_methods())
    assert set(LOSSLESS) | set(FEATURE_NETWORKS) == set(lossless_methods())


def test_one_drafter_per_row_shares_models_not_state(models, tmp_path):
    target, draft = models
    sps = build_method(method_config("sps"))
    sps.attach_draft(draft)
    sps.setup(target)
    rows = row_drafters(sps, BATCH)
    assert rows[0] is sps and len({id(r) for r in rows}) == BATCH
    # the draft model is shared, its cache is per row ...
    assert all(r.draft.backbone is sps.draft.backbone and r.draft.cache is not sps.draft.cache for r in rows[1:])
    assert row_drafters(sps, BATCH)[1] is rows[1]  # ... the copies are kept across batches ...
    forget_row_drafters(sps)
    assert row_drafters(sps, BATCH)[1] is not rows[1]  # ... until the runner resets learned state


def test_sampling_batch_runs_and_stays_in_vocabulary(models):
    target, _ = models
    pld = build_method(method_config("pld"))
    settings = DecodeSettings(max_new_tokens=12, sampling=SamplingParams(temperature=0.8))
    out = generate_batch(
        target, pld, batch_prompts(), settings, target.new_cache(16, batch_size=BATCH), torch.Generator().manual_seed(0)
    )
    assert all(len(o.new_ids) == 12 and all(0 <= t < 101 for t in o.new_ids) for o in out.outputs)


def test_rows_with_trees_at_their_own_lengths_equal_single_forwards():
    """One batched forward over two rows at different cache lengths, one a tree and one a chain
    (padded), gives each row the logits of its own unbatched forward; committing a tree branch
    moves the accepted entries so the next step still matches."""
    backbone = tiny_backbone("llama")
    prefixes = [list(range(3, 15)), list(range(20, 27))]
    blocks = [([40, 41, 42, 43], [-1, 0, 0, 1]), ([50, 51], None)]
    cache = backbone.new_cache(8, batch_size=2)
    width = max(map(len, prefixes))
    backbone.forward_batch(
        torch.tensor([p + [0] * (width - len(p)) for p in prefixes]), cache, sizes=[len(p) for p in prefixes]
    )
    cache.commit_rows([0, 0], [range(len(p)) for p in prefixes])
    assert [cache.row_length(b) for b in range(2)] == [12, 7]
    out = backbone.forward_batch(
        torch.tensor([[40, 41, 42, 43], [50, 51, 0, 0]]),
        cache,
        sizes=[4, 2],
        layouts=[BlockLayout(parents=blocks[0][1]), BlockLayout()],
    )
    singles = []
    for prefix, (tokens, parents) in zip(prefixes, blocks):
        single = backbone.new_cache(8)
        backbone.forward(prefix, single)
        singles.append(backbone.forward(tokens, single, layout=BlockLayout(parents=parents)).logits)
    torch.testing.assert_close(out.logits[0], singles[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1, :2], singles[1], atol=1e-5, rtol=1e-5)

    # row 0 keeps root + node 2 (a side branch), row 1 keeps its root only; then one more token each
    cache.commit_rows([12, 7], [[0, 2], [0]])
    assert [cache.row_length(b) for b in range(2)] == [14, 8]
    step = backbone.forward_batch(torch.tensor([[60], [61]]), cache)
    for row, history in enumerate([prefixes[0] + [40, 42, 60], prefixes[1] + [50, 61]]):
        reference = backbone.forward(history, backbone.new_cache(8)).logits[-1]
        torch.testing.assert_close(step.logits[row, -1], reference, atol=1e-5, rtol=1e-5)

    # a row leaving the batch: the other keeps its entries; a one-row view writes into the batch
    cache.keep_rows([1])
    assert cache.batch_size == 1 and cache.length == 9
    view = backbone.new_cache(8, batch_size=2)
    view.ensure_capacity(16)
    row = view.row_view(1)
    backbone.forward([5, 6, 7], row)
    assert row.length == 3 and view.row_lengths[0] == [0, 0]  # the batch's lengths are the caller's
    assert torch.equal(view.keys[0][1, :, :3], row.keys[0][0, :, :3]) and not view.keys[0][0].any()
    cache.reset()
    assert cache.batch_size == 2  # rows that left come back for the next batch


def test_rows_leave_the_batch_in_place_and_come_back_on_reset():
    """keep_rows moves the kept rows to the front of the SAME buffers. It used to copy the cache at
    every call, and the row views that finished rows' drafters still held kept each copy alive
    (measured: EAGLE-2 at B = 16 peaked at 14 GB where AR needs 3.4)."""
    cache = KVCache(num_layers=2, num_kv_heads=1, head_dim=4, capacity=8, batch_size=3)
    for layer in range(2):
        for row in range(3):
            cache.keys[layer][row] = 10 * layer + row + 1
            cache.values[layer][row] = -(10 * layer + row + 1)
    cache.row_lengths = [[5, 3, 4], [5, 3, 4]]
    storages = [buffer.untyped_storage().data_ptr() for buffer in (*cache.keys, *cache.values)]
    held = cache.row_view(1)  # what a drafter of a finished row keeps

    cache.keep_rows([2, 0])
    assert [buffer.untyped_storage().data_ptr() for buffer in (*cache.keys, *cache.values)] == storages
    assert cache.batch_size == 2 and cache.row_lengths == [[4, 5], [4, 5]] and cache.keys[0].shape[0] == 2
    for layer in range(2):
        for slot, row in enumerate([2, 0]):
            assert (cache.keys[layer][slot, :, :4] == 10 * layer + row + 1).all()
            assert (cache.values[layer][slot, :, :4] == -(10 * layer + row + 1)).all()
    assert held.keys[0].untyped_storage().data_ptr() == storages[0]

    cache.ensure_capacity(20)  # growing a smaller batch keeps its rows; the others come back on reset
    assert cache.batch_size == 2 and (cache.keys[1][1, :, :5] == 11).all()
    cache.reset()
    assert cache.batch_size == 3 and cache.keys[0].shape == (3, 1, 20, 4) and cache.row_lengths == [[0] * 3] * 2


def test_a_method_that_cannot_batch_is_refused_before_loading(monkeypatch):
    from decodebench.config import ConfigValueError, compose_run_config, validate_before_loading
    from decodebench.methods.pld import PromptLookupDrafter

    monkeypatch.setattr(PromptLookupDrafter, "supports_batch", False)
    monkeypatch.setattr(PromptLookupDrafter, "batch_refusal", "its index is shared by every row")
    cfg = compose_run_config(["model=tiny-llama", "method=pld", "gen.batch_size=4"])
    with pytest.raises(
        ConfigValueError, match=r"gen.batch_size.*'pld'.*shared by every row.*methods that batch: .*sps"
    ):
        validate_before_loading(cfg)


# method -> its network's module and class, and the network's params for a 3-layer model
FEATURE_NETWORKS = {
    "eagle": ("eagle_net", "EagleNet", {}),
    "eagle2": ("eagle_net", "EagleNet", {}),
    "eagle3": ("eagle3_net", "Eagle3Net", {}),
    "fspad": ("fspad_net", "FspadNet", {}),
    "medusa": ("medusa_heads", "MedusaHeads", {}),
    "hydra": ("medusa_heads", "HydraHeads", {}),
    "clover": ("clover_net", "CloverNet", {}),
    "kangaroo": ("kangaroo_net", "KangarooNet", {}),
    "hidden_transfer": ("hidden_transfer_net", "HiddenTransferNet", {"transfer_layer": 1, "num_future": 2}),
}


def save_untrained_network(method: str, backbone, cache_dir) -> None:
    """``method``'s drafter network, untrained (seeded by the caller), saved where its drafter looks."""
    import importlib

    from decodebench.methods.draft_heads import checkpoint_dir, model_key, save_checkpoint

    module, name, params = FEATURE_NETWORKS[method]
    network = getattr(importlib.import_module(f"decodebench.methods.{module}"), name)
    net = network(backbone, network.Params(**params))
    save_checkpoint(
        checkpoint_dir(str(cache_dir), model_key(backbone), net.network),
        net.checkpoint_state(),
        net.checkpoint_config(backbone),
    )


@pytest.mark.parametrize("method", sorted(FEATURE_NETWORKS))
def test_feature_drafters_batch_losslessly(method, models, stop_settings, ar_reference, tmp_path):
    """Drafters that draft from the target's hidden states (EAGLE, Medusa, Hydra: untrained networks
    saved as checkpoints, EAGLE-3, FSPAD, Clover and Kangaroo's adapter too) read each row's own
    slice; Hidden Transfer's pseudo rows ride in the batch's one forward (verify_forward_rows)."""
    target, _ = models
    torch.manual_seed(1)
    save_untrained_network(method, target, tmp_path)
    drafter = build_method(method_config(method))
    drafter.setup(target, str(tmp_path))
    out = generate_batch(target, drafter, batch_prompts(), stop_settings, target.new_cache(16, batch_size=BATCH))
    assert [o.new_ids for o in out.outputs] == ar_reference
    assert sum(s.drafted for o in out.outputs for s in o.steps) > 0


def test_hidden_transfer_batched_pseudo_rows_draft_what_one_row_alone_drafts(
    models, stop_settings, tmp_path, monkeypatch
):
    """The pseudo rows of a batch's one forward (verify_forward_rows) give each row the drafts the
    row's own single-sequence forward (verify_forward) gives it, step for step."""
    target, _ = models
    torch.manual_seed(2)
    from decodebench.methods.hidden_transfer import HiddenTransferDrafter

    save_untrained_network("hidden_transfer", target, tmp_path)
    drafter = build_method(method_config("hidden_transfer"))
    drafter.setup(target, str(tmp_path))
    proposals: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    propose = HiddenTransferDrafter.propose

    def recording(self, context, max_tokens):
        proposal = propose(self, context, max_tokens)
        proposals.append((tuple(context), tuple(proposal.tokens)))
        return proposal

    monkeypatch.setattr(HiddenTransferDrafter, "propose", recording)
    for prompt in batch_prompts():
        generate(target, drafter, prompt, stop_settings, target.new_cache(16))
    alone = sorted(proposals)
    proposals.clear()
    generate_batch(target, drafter, batch_prompts(), stop_settings, target.new_cache(16, batch_size=BATCH))
    assert sorted(proposals) == alone
    assert sum(len(tokens) for _, tokens in alone) > len(alone), "too few drafts to compare"


@pytest.fixture(scope="module")
def embedded():
    """SmolLM2-135M (fp32), three chat prompts of different lengths, greedy 24 tokens, and AR's ids
    for each prompt at batch size 1."""
    from decodebench.config import default_cache_dir
    from decodebench.engine.backbone import Backbone
    from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
    from decodebench.models.loading import load_model, load_model_config
    from decodebench.tasks.prompts import encode_prompt

    from helpers import EMBEDDED_PROMPTS

    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip("smollm2-135m is not prepared (make setup)")
    loaded = load_model(cfg)
    backbone = Backbone(loaded.model)
    texts = [*EMBEDDED_PROMPTS, "Repeat after me: the quick brown fox jumps over the lazy dog. The quick brown fox"]
    prompts = [
        encode_prompt(loaded.tokenizer, [{"role": "user", "content": text}], cfg.chat_template) for text in texts
    ]
    settings = DecodeSettings(max_new_tokens=24, eos_token_ids=[loaded.tokenizer.eos_token_id])
    ar = build_method(MethodConfig())
    reference = [generate(backbone, ar, p, settings, backbone.new_cache(256)).new_ids for p in prompts]
    return backbone, loaded.tokenizer, prompts, settings, reference


# the embedded model's batch: what each method needs besides its cpu preset (trees pinned: no curve)
EMBEDDED_PARAMS = {
    "aded": {"corpus_prompts": 0},
    "rest": {"corpus": "jsonl", "corpus_path": "CORPUS"},
    "sam": {"corpus": "jsonl", "corpus_path": "CORPUS"},
    "specdec_pp": {"use_head": False},
}


@pytest.mark.embedded
@pytest.mark.parametrize("method", lossless_methods())
def test_embedded_model_batched_speculation_is_lossless(method, embedded, tmp_path, monkeypatch):
    """Every lossless method on SmolLM2-135M (fp32, greedy), three prompts decoded together: each
    row equals AR at batch size 1. Trained drafters run untrained networks saved as checkpoints
    (their drafts are mostly rejected: the check is the batched verify and bookkeeping);
    draft-model methods draft with the target itself (same tokenizer, every draft accepted)."""
    backbone, tokenizer, prompts, settings, reference = embedded
    torch.manual_seed(0)
    if method == "del":  # its cost model rightly never drafts on this 30-layer model: 3 drafts from layer 15
        monkeypatch.setattr("decodebench.methods.dynamic_exit.best_exit", lambda _, __, most: (15, min(3, most), 1.0))
    if method in FEATURE_NETWORKS:
        save_untrained_network(method, backbone, tmp_path)
    cfg = method_config(method)
    cfg.params.update(cfg.presets.get("cpu", {}), **EMBEDDED_PARAMS.get(method, {}))
    if cfg.params.get("max_verify_cost") is not None:
        cfg.params["max_verify_cost"] = None
    if cfg.params.get("corpus_path") == "CORPUS":
        cfg.params["corpus_path"] = corpus(tmp_path, reference, prompts)
    cfg.preset = None
    drafter = build_method(cfg)
    drafter.tokenizer = tokenizer
    if drafter.needs_draft_model:
        drafter.attach_draft(backbone)
    drafter.setup(backbone, str(tmp_path))
    out = generate_batch(backbone, drafter, prompts, settings, backbone.new_cache(256, batch_size=len(prompts)))
    assert [o.new_ids for o in out.outputs] == reference
    assert sum(s.drafted for o in out.outputs for s in o.steps) > 0, "nothing drafted: the check proves nothing"


# -- SmartSpec ---------------------------------------------------------------------------------------
def surface(flat: bool) -> dict:
    """A T(B, k) surface: flat (a GPU at small B: drafts nearly free) or steep (every token costs)."""
    ks, sizes = [1, 2, 4, 8], [1, 4]
    ratio = [[1.0, 1.02, 1.05, 1.1]] * 2 if flat else [[1.0, 1.9, 3.7, 7.5]] * 2
    return {"batch_sizes": sizes, "k": ks, "ratio": ratio, "ms": [[10 * r for r in row] for row in ratio]}


def test_smartspec_speculates_where_it_pays_and_not_where_it_does_not():
    from decodebench.engine.smartspec import PROBE_EVERY, SmartSpec

    assert SmartSpec(surface(flat=True), max_draft=6, prior_acceptance=0.8).choose(4) == 6
    steep = SmartSpec(surface(flat=False), max_draft=6, prior_acceptance=0.5)
    assert [steep.choose(4) for _ in range(PROBE_EVERY)] == [0] * (PROBE_EVERY - 1) + [1]  # then a probe
    learning = SmartSpec(surface(flat=True), max_draft=6, prior_acceptance=0.8)
    for _ in range(30):  # every row's first draft rejected: acceptance falls, and so does the length
        learning.observe(4, [(4, 0, 0.001)] * 4)
    assert learning.acceptance < 0.05 and learning.choose(4) < 6
    # expensive drafts (a draft model) cost goodput too
    costly = SmartSpec(surface(flat=True), max_draft=6, prior_acceptance=0.8)
    costly.draft_s_per_token = 0.05  # 50 ms per draft token vs a 10 ms step
    assert costly.choose(4) == 0


def test_smartspec_prices_a_packed_batch_by_the_rows_that_propose():
    """Where the forward packs padding out, only proposing rows pay for drafts: with 30 % of rows
    proposing, speculation pays on a curve where a padded batch should not speculate."""
    from decodebench.engine.smartspec import SmartSpec

    ks, ratio = [1, 2, 4, 8], [[1.0, 1.3, 1.9, 3.1]] * 2
    curve = {"batch_sizes": [1, 4], "k": ks, "ratio": ratio, "ms": [[10 * r for r in row] for row in ratio]}
    padded, packed = (SmartSpec(curve, 4, prior_acceptance=0.6, packs_padding=p) for p in (False, True))
    padded.proposing = packed.proposing = 0.3
    assert padded.choose(4) == 0 and packed.choose(4) >= 1
    assert packed.goodput(4, 2) > packed.goodput(4, 0) > padded.goodput(4, 2)


@pytest.mark.parametrize("method", ["pld", "sps", "suffix"])
def test_smartspec_is_lossless_at_batch_sizes_one_and_three(method, models, stop_settings, ar_reference):
    target, draft = models
    drafter = build_method(MethodConfig(name=method, impl=method_config(method).impl, params={"smartspec": True}))
    if drafter.needs_draft_model:
        drafter.attach_draft(draft)
    drafter.setup(target)
    assert drafter.speculation is not None  # measured the (tiny) T(B, k) surface on first use
    out = generate_batch(target, drafter, batch_prompts(), stop_settings, target.new_cache(16, batch_size=BATCH))
    assert [o.new_ids for o in out.outputs] == ar_reference
    single = generate(target, drafter, batch_prompts()[1], stop_settings, target.new_cache(16))
    assert single.new_ids == ar_reference[1]
    assert "smartspec_mean_k" in single.method_stats


# -- throughput mode (analysis/throughput.py) --------------------------------------------------------
def throughput_run(root, batch_size: int, method_wall: float, sequence_s: float, rss_mb: float):
    """A run dir of 4 prompts at ``gen.batch_size``: AR records of 1.0 s each (their share of the
    batch wall), the method's of ``method_wall``; 9 tokens each, the method in 5 forwards; a batch
    holds at most the 4 prompts."""
    from decodebench.records import Record
    from decodebench.runners.run_dir import MANIFEST, RunDirectory

    run = RunDirectory(root / f"b{batch_size}")
    run.write_config(
        {
            "model": {"name": "tiny"},
            "method": {"name": "pld", "lossless": True},
            "task": {"name": "spec_bench"},
            "gen": {"temperature": 0.0, "max_new_tokens": 8, "batch_size": batch_size},
            "seed": 0,
            "device": "cpu",
            "dtype": "float32",
        }
    )
    run.write_json(
        MANIFEST, {"hardware": {"cpu": "TestCPU", "device": "cpu"}, "memory": {"peak_rss_bytes": rss_mb * 2**20}}
    )
    for sample in range(4):
        for role, method, wall, steps in (("baseline", "ar", 1.0, 9), ("method", "pld[cpu]", method_wall, 5)):
            run.append_record(
                Record(
                    method=method, role=role, task="spec_bench", model="tiny", sample_id=str(sample), category="qa",
                    group="qa", turn=0, seed=0, new_tokens=9, wall_s=wall, steps=steps, sequence_s=sequence_s * (1 + sample),
                    tree_sizes=[3] * (steps - 1), output_ids=list(range(9)), batch_size=min(batch_size, 4),
                )
            )  # fmt: skip


def test_throughput_table_and_figure_against_ar_at_the_same_batch_size(tmp_path):
    from decodebench.analysis.frame import load_frame
    from decodebench.analysis.throughput import crossover, speedup_vs_batch_figure, throughput_table

    for batch, wall, rss in ((1, 0.5, 600.0), (4, 0.8, 650.0), (16, 1.25, 900.0)):
        throughput_run(tmp_path / "runs", batch, wall, sequence_s=0.1 * batch, rss_mb=rss)
    table = throughput_table(load_frame([tmp_path / "runs"]), surface(flat=True))
    method = table[table["method"] == "pld[cpu]"].set_index("batch_size")
    assert method["speedup"].round(3).tolist() == [2.0, 1.25, 0.8]  # Σ AR wall / Σ method wall, per B
    assert method.loc[4, "tokens_per_s"] == pytest.approx(36 / 3.2)
    assert method.loc[16, "peak_rss_mb"] == 900.0 and method.loc[4, "latency_p50_s"] == pytest.approx(1.0)
    assert method["batch_rows"].tolist() == [1.0, 4.0, 4.0]  # B = 16 over 4 prompts decodes batches of 4
    assert method.loc[1, "tau"] == pytest.approx(9 / 5) and method.loc[1, "block"] == 3.0
    assert method.loc[1, "predicted"] == pytest.approx((9 / 5) / 1.035)  # τ / (T(1, 3) / T(1, 1)), k=3 interpolated
    assert crossover([1, 4, 16], [2.0, 1.25, 0.8]) == pytest.approx(2 ** (2 + 0.25 / 0.45 * 2))
    assert crossover([1, 4], [0.9, 0.8]) is None
    figure = speedup_vs_batch_figure(table, tmp_path / "fig")
    assert figure.png.stat().st_size > 0 and "pld[cpu] at B≈" in figure.caption


def test_bench_batch_fills_every_batch_size_or_refuses(capsys):
    """Spec-Bench's per_category counts 6 groups: B = 16 needs 3 per group (1 would decode B = 8 and
    16 as the same batches of 6); an explicit smaller one exits 2 naming the one that fills it."""
    bench = load_benchmark("bench_batch")
    assert bench.per_category_filling([1, 2, 4, 8, 16], None, None) == 3
    assert bench.per_category_filling([1, 4], None, None) == 1 and bench.per_category_filling([1, 4], None, 2) == 2
    assert bench.per_category_filling([4], "qa,math_reasoning,writing,roleplay", None) == 2  # 3 groups
    with pytest.raises(SystemExit) as exited:
        bench.per_category_filling([1, 2, 4, 8, 16], None, 1)
    assert exited.value.code == 2
    assert "gives 6: use --per-category 3" in capsys.readouterr().err
