"""Curves on first use: a cpu preset that sizes its drafts from the verify-latency curve never falls
back to the paper budget because no curve is stored; the runner measures a short one first.
Curves are keyed by thread count on a CPU."""

import json

import pytest
import torch

from decodebench.config import ModelConfig
from decodebench.engine.backbone import Backbone
from decodebench.engine.profile import (
    FIRST_USE_KS,
    ensure_latency_curve,
    load_latency_curve,
    profile_path,
    stored_curve_path,
)
from decodebench.methods import build_method, method_config
from decodebench.models.tiny import build_tiny
from decodebench.runners.run_dir import read_records

from helpers import REVISION, TINY, run_cli

CURVE = {"k": [1, 2, 4, 8], "ms": [1.0, 1.1, 1.2, 2.0], "ratio": [1.0, 1.1, 1.2, 2.0], **REVISION}


def named_backbone(name: str, seed: int = 0, layers: int = 3) -> Backbone:
    config = ModelConfig(name=name, source="tiny", architecture="llama", tiny={**TINY, "num_hidden_layers": layers})
    backbone = Backbone(build_tiny(config, seed=seed))
    backbone.model_name = name
    return backbone


def test_cpu_curves_are_keyed_by_threads(tmp_path):
    one, two = profile_path("m", "eager", "cpu", str(tmp_path), 1), profile_path("m", "eager", "cpu", str(tmp_path), 2)
    assert one.name == "m__eager__cpu__1t.json" and two.name == "m__eager__cpu__2t.json"
    assert profile_path("m", "eager", "cuda:0", str(tmp_path), 4).name == "m__eager__cuda.json"
    assert profile_path("m", "eager", "cpu", str(tmp_path)) == profile_path(
        "m", "eager", "cpu", str(tmp_path), torch.get_num_threads()
    )
    one.parent.mkdir(parents=True)
    one.write_text(json.dumps({**CURVE, "threads": 1}))
    assert load_latency_curve("m", "eager", "cpu", str(tmp_path), threads=1)["ratio"] == CURVE["ratio"]
    assert load_latency_curve("m", "eager", "cpu", str(tmp_path), threads=2) is None


def test_a_curve_stored_before_thread_keys_is_read_only_at_its_thread_count(tmp_path):
    legacy = tmp_path / "profiles" / "m__eager__cpu.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({**CURVE, "threads": 2}))
    assert stored_curve_path("m", "eager", "cpu", str(tmp_path), threads=2) == legacy
    assert load_latency_curve("m", "eager", "cpu", str(tmp_path), threads=1) is None


def test_ensure_measures_once_then_reads_the_stored_curve(tmp_path):
    backbone = named_backbone("tiny-first-use")
    first = ensure_latency_curve(backbone, str(tmp_path), repeats=1, context=16)
    assert first.measured_now and first.ks == list(FIRST_USE_KS) and first.measure_s > 0
    stored = json.loads(profile_path("tiny-first-use", "eager", "cpu", str(tmp_path)).read_text())
    assert stored["measured_by"] == "first use" and stored["k"] == list(FIRST_USE_KS)
    assert stored["ratio"][0] == 1.0 and all(r > 0 for r in stored["ratio"])
    assert stored["threads"] == torch.get_num_threads() and first.path.endswith(f"__{stored['threads']}t.json")
    again = ensure_latency_curve(backbone, str(tmp_path), repeats=1, context=16)
    assert not again.measured_now and again.path == first.path


def test_ensure_adds_the_draft_step_when_the_curve_lacks_it(tmp_path):
    target, draft = named_backbone("tiny-target"), named_backbone("tiny-draft", seed=1, layers=1)
    ensure_latency_curve(target, str(tmp_path), repeats=1, context=16)
    with_draft = ensure_latency_curve(target, str(tmp_path), draft=draft, repeats=1, context=16)
    assert with_draft.measured_now and with_draft.draft_model == "tiny-draft"
    stored = json.loads(profile_path("tiny-target", "eager", "cpu", str(tmp_path)).read_text())
    assert stored["draft"]["model"] == "tiny-draft" and stored["draft"]["cost_ratio"] > 0
    assert not ensure_latency_curve(target, str(tmp_path), draft=draft, repeats=1, context=16).measured_now


@pytest.mark.parametrize(
    "method, reads",
    [
        ("pld", True),
        ("token_recycling", True),
        ("lookahead", True),
        ("suffix", True),
        ("aded", True),
        ("sps", True),
        ("lade", False),
        ("ar", False),
    ],
)
def test_cpu_presets_that_size_drafts_read_the_curve(method, reads):
    cfg = method_config(method)
    cfg.preset = "auto"
    assert build_method(cfg, "cpu").reads_latency_curve() is reads
    cfg.preset = "paper" if "paper" in cfg.presets else None
    assert build_method(cfg, "cuda").reads_latency_curve() is False


@pytest.mark.embedded
def test_token_recycling_cpu_preset_gets_a_curve_on_first_use(tmp_path, data_dir):
    """Empty cache: the run measures a curve (log + manifest), and TR's cpu preset sizes its tree from
    it instead of verifying the paper's 80-node tree."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    result = run_cli(
        "model=tiny-llama",
        "method=token_recycling",
        "threads=1",
        "task.per_category=1",
        "task.categories=[qa]",
        "gen.max_new_tokens=16",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        f"cache_dir={cache}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "no stored verify-latency curve for tiny-llama on eager/cpu at 1 threads: measuring one now" in log
    stored = cache / "profiles" / "tiny-llama__eager__cpu__1t.json"
    assert stored.is_file() and json.loads(stored.read_text())["measured_by"] == "first use"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["latency_curve"]["measured_now"] is True and manifest["latency_curve"]["path"] == str(stored)
    assert (run_dir / "latency_curve.json").is_file()
    method = [r for r in read_records(run_dir / "records.jsonl") if r.role == "method"]
    budget = method[0].method_stats["verify_budget"]
    assert 2 <= budget <= max(FIRST_USE_KS) and max(max(r.tree_sizes) for r in method) <= budget
    again = run_cli(
        "model=tiny-llama",
        "method=token_recycling",
        "threads=1",
        "task.per_category=1",
        "task.categories=[qa]",
        "gen.max_new_tokens=16",
        f"hydra.run.dir={tmp_path / 'again'}",
        f"data_dir={data_dir}",
        f"cache_dir={cache}",
        "progress=false",
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["latency_curve"]["measured_now"] is False


@pytest.mark.embedded
def test_runs_without_a_curve_reading_preset_measure_nothing(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny-llama",
        "method=pld",
        "method.preset=paper",
        "threads=1",
        "task.per_category=1",
        "task.categories=[qa]",
        "gen.max_new_tokens=8",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "manifest.json").read_text())["latency_curve"] is None
    assert not (tmp_path / "cache" / "profiles").exists()


def test_a_curve_of_another_engine_revision_is_not_read(tmp_path, caplog):
    path = profile_path("m", "eager", "cpu", str(tmp_path), 1)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({**CURVE, "threads": 1, "engine_revision": "0123456789ab"}))
    assert load_latency_curve("m", "eager", "cpu", str(tmp_path), threads=1) is None
    assert "engine revision 0123456789ab" in caplog.text
    path.write_text(json.dumps({**CURVE, "threads": 1, "engine_revision": None}))  # stored before revisions
    assert load_latency_curve("m", "eager", "cpu", str(tmp_path), threads=1) is None
