"""Tiny random-init decoder models built in code (tests, smoke runs; no download).

The architecture comes from ``ModelConfig.architecture`` and every size from ``ModelConfig.tiny``
(plain Hugging Face config kwargs). Keys are checked against the config class's fields, because
transformers silently keeps unknown kwargs (a typo would otherwise build a different model).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from decodebench.config import ConfigValueError, ModelConfig
from decodebench.registry import unknown_name_message

# architecture -> (config class, model class)
TINY_ARCHITECTURES: dict[str, tuple[type[PreTrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

# Used when ``tiny`` does not set initializer_range. HF's default (0.02) leaves a 64-wide model's
# residual stream dominated by the embedding, so greedy output depends almost only on the last
# token; 0.1 gives context-dependent argmax (drafts get both accepted and rejected in tests).
TINY_INITIALIZER_RANGE = 0.1


def build_tiny_config(cfg: ModelConfig) -> PreTrainedConfig:
    """Build the HF config for a tiny model from ``cfg.architecture`` and ``cfg.tiny``.

    Raises:
        ConfigValueError: unknown architecture or a ``tiny`` key the config class lacks.
    """
    if cfg.architecture not in TINY_ARCHITECTURES:
        raise ConfigValueError(unknown_name_message("model.architecture", cfg.architecture, TINY_ARCHITECTURES))
    config_cls, _ = TINY_ARCHITECTURES[cfg.architecture]
    known = {f.name for f in dataclasses.fields(config_cls)}
    for key in cfg.tiny:
        if key not in known:
            raise ConfigValueError(unknown_name_message("model.tiny key", key, known, f" for {cfg.architecture}"))
    kwargs = {"initializer_range": TINY_INITIALIZER_RANGE, **cfg.tiny}
    config = config_cls(**kwargs)
    config._attn_implementation = cfg.attn_implementation
    return config


def build_tiny(cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """Random-init fp32 model; the same ``cfg`` and ``seed`` give identical weights.

    The global torch RNG is left untouched (the init runs inside ``torch.random.fork_rng``).

    Args:
        cfg: model config with ``source == "tiny"``.
        seed: weight-init seed.

    Returns:
        The model in eval mode, on CPU, float32.
    """
    config = build_tiny_config(cfg)
    _, model_cls = TINY_ARCHITECTURES[cfg.architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(torch.float32).eval()
