"""Your own model in one command: ``decodebench model=hf model.id=<hub id | local dir>``.

A local Hugging Face directory is tested end to end offline: a tiny random Llama (and a smaller
draft) saved with the embedded model's tokenizer, then run through the CLI like a user's checkpoint.
"""

import json

import pytest
import torch

from decodebench.config import ConfigValueError, ModelConfig, compose_run_config
from decodebench.models.loading import (
    draft_model_config,
    hf_location,
    load_model,
    load_model_config,
    load_tokenizer,
    resolve_dtype,
)
from decodebench.models.naming import model_name_from_id
from decodebench.models.tiny import build_tiny
from decodebench.runners.run_dir import read_records

from helpers import run_cli


def save_checkpoint(folder, catalogue_name: str = "tiny-llama", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A catalogue tiny model saved as a user's checkpoint: weights, config and the SmolLM2 tokenizer."""
    model = build_tiny(load_model_config(catalogue_name), seed=seed)
    tokenizer = load_tokenizer(load_model_config("smollm2-135m"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(tokenizer, key))
        setattr(model.generation_config, key, getattr(tokenizer, key))
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "my-tiny-llama")


# --- naming and validation (no model) --------------------------------------------------------------
def test_name_is_the_ids_last_part(tmp_path):
    folder = tmp_path / "my-checkpoint"
    folder.mkdir()
    assert model_name_from_id(str(folder)) == "my-checkpoint"
    assert model_name_from_id(f"{folder}/") == "my-checkpoint"
    assert model_name_from_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen2.5-0.5B-Instruct"
    assert model_name_from_id(None) == "hf"


def test_hf_location_tells_directories_from_hub_ids(tmp_path):
    assert hf_location(str(tmp_path)) == (str(tmp_path.resolve()), True)
    assert hf_location("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", False)
    for bad in (str(tmp_path / "missing"), "./nowhere", "not a hub id", "a/b/c"):
        with pytest.raises(ConfigValueError, match="model.id"):
            hf_location(bad)


def test_compose_hf_needs_an_id_and_names_the_model(tmp_path):
    with pytest.raises(ConfigValueError, match="model.id"):
        compose_run_config(["model=hf"])
    cfg = compose_run_config(["model=hf", f"model.id={tmp_path}", "method=pld"])
    assert (cfg.model.source, cfg.model.name, cfg.dtype) == ("hf", tmp_path.name, "auto")
    named = compose_run_config(["model=hf", f"model.id={tmp_path}", "model.name=mine"])
    assert named.model.name == "mine"
    with pytest.raises(ConfigValueError, match="model.draft_id"):
        compose_run_config(["model=smollm2-135m", f"+model.draft_id={tmp_path}"])


def test_draft_model_config_resolves_draft_id_or_catalogue_name(tmp_path):
    cfg = ModelConfig(name="t", source="hf", id=str(tmp_path), draft_id=str(tmp_path))
    draft = draft_model_config(cfg)
    assert (draft.source, draft.id, draft.name) == ("hf", str(tmp_path), tmp_path.name)
    assert draft_model_config(ModelConfig(name="t", source="hf", id="x/y")) is None
    assert draft_model_config(load_model_config("qwen2.5-coder-1.5b")).name == "qwen2.5-coder-0.5b"
    with pytest.raises(ConfigValueError, match="both"):
        draft_model_config(ModelConfig(name="t", source="hf", id="x/y", draft_id="a/b", draft="tiny-llama"))


# --- loading a local directory ---------------------------------------------------------------------
@pytest.mark.embedded
def test_dtype_comes_from_the_checkpoint_unless_given(tmp_path):
    folder = save_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = ModelConfig(name="bf16", source="hf", id=str(folder))
    assert resolve_dtype(cfg, "auto", str(folder), None) == ("bfloat16", "checkpoint config torch_dtype")
    loaded = load_model(cfg, dtype="auto")
    assert loaded.info["dtype"] == "bfloat16" and next(loaded.model.parameters()).dtype == torch.bfloat16
    forced = load_model(cfg, dtype="float32")
    assert (forced.info["dtype"], forced.info["dtype_source"]) == ("float32", "dtype=")
    assert next(forced.model.parameters()).dtype == torch.float32
    catalogue = load_model(load_model_config("tiny-llama"), dtype="auto")
    assert (catalogue.info["dtype"], catalogue.info["dtype_source"]) == ("float32", "catalogue (fp32)")


@pytest.mark.embedded
def test_tokenizer_and_chat_template_come_from_the_directory(checkpoint):
    loaded = load_model(ModelConfig(name="x", source="hf", id=str(checkpoint)))
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == 49152
    assert loaded.info["chat_template"] is True and loaded.info["location"] == str(checkpoint.resolve())
    no_template = ModelConfig(name="x", source="hf", id=str(checkpoint), chat_template=False)
    assert load_model(no_template).info["chat_template"] is False


@pytest.mark.embedded
@pytest.mark.slow
def test_own_directory_end_to_end_is_lossless(tmp_path, checkpoint, data_dir):
    """``decodebench model=hf model.id=DIR method=pld``: records for every turn, PLD equal to AR."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=hf",
        f"model.id={checkpoint}",
        "method=pld",
        "threads=1",
        "task.per_category=1",
        "task.categories=[qa,math_reasoning,rag]",
        "gen.max_new_tokens=40",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_records(run_dir / "records.jsonl")
    assert {r.role for r in records} == {"baseline", "method"} and len(records) == 6
    assert all(r.model == "my-tiny-llama" and r.error is None and r.new_tokens for r in records)
    method = [r for r in records if r.role == "method"]
    assert all(r.lossless is True for r in method)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lossless_rate"] == 1.0 and summary["errors"] == 0
    model = json.loads((run_dir / "manifest.json").read_text())["model"]
    assert model["source"] == "hf" and model["location"] == str(checkpoint.resolve())
    assert (model["dtype"], model["dtype_source"], model["chat_template"]) == (
        "float32",
        "checkpoint config torch_dtype",
        True,
    )


@pytest.mark.embedded
@pytest.mark.slow
def test_own_draft_model_from_draft_id(tmp_path, checkpoint, data_dir):
    """``method=sps model.draft_id=DIR``: the draft is loaded like the target, in its dtype; lossless."""
    draft = save_checkpoint(tmp_path / "my-draft", "tiny-llama-draft", seed=1)
    run_dir = tmp_path / "run"
    result = run_cli(
        "model=hf",
        f"model.id={checkpoint}",
        f"model.draft_id={draft}",
        "method=sps",
        "threads=1",
        "task.per_category=1",
        "task.categories=[qa]",
        "gen.max_new_tokens=24",
        f"hydra.run.dir={run_dir}",
        f"data_dir={data_dir}",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["lossless_rate"] == 1.0 and summary["errors"] == 0 and summary["alpha"] is not None
    engine = json.loads((run_dir / "manifest.json").read_text())["engine"]
    assert set(engine) == {"my-tiny-llama", "my-draft"}


@pytest.mark.parametrize("method", ["sps", "dyspec", "specdec_pp"])
def test_missing_draft_is_a_clear_error_before_loading(tmp_path, method):
    folder = tmp_path / "no-weights-here"
    folder.mkdir()  # not a checkpoint: the error must come before anything is loaded from it
    result = run_cli(
        "model=hf",
        f"model.id={folder}",
        f"method={method}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr  # hydra logs the error
    assert "model.draft_id" in output and f"method '{method}'" in output
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_bad_model_id_exits_2_before_loading(tmp_path):
    result = run_cli(
        "model=hf",
        f"model.id={tmp_path / 'missing'}",
        "method=pld",
        "data_dir=/nonexistent",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid value for 'model.id'" in result.stdout + result.stderr


def test_hub_id_goes_through_the_hub_loader_with_an_offline_hint(monkeypatch):
    """A hub id is loaded by from_pretrained(id, revision=...); offline and uncached, the error says what to do."""
    from decodebench.registry import DecodeBenchError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DecodeBenchError, match="no network\\? run `hf download ID --local-dir DIR`"):
        load_model(ModelConfig(name="x", source="hf", id="someorg/not-cached-model", revision="main"))
