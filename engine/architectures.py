"""Architecture adapters: what the Backbone's own layer loop needs to know about each HF family.

The loop (:class:`decodebench.engine.backbone.Backbone`) calls the library's own modules; families
differ only in where those modules live and in a few numbers applied around them:

* where the embeddings, decoder layers, final norm, rotary embedding and LM head are
  (``model.model.layers`` for most, ``model.gpt_neox.layers``, ``model.transformer.h``, ...);
* a multiplier on the embeddings (Granite) and a transform of the final logits (Cohere's
  ``logit_scale``, Granite's ``logits_scaling``, Gemma 2/3's final soft-capping);
* per-layer rotary tables (Gemma 3: local and global RoPE bases, ``rotary_emb(x, pos, layer_type)``);
* the KV-cache geometry (DeepSeek-V3's multi-head latent attention caches the compressed latent and
  the shared rotary key: one "head" of ``kv_lora_rank`` / ``qk_rope_head_dim``);
* the decoder layer's two residual halves (attention, then MLP) with their norms, which sublayer
  skipping (SWIFT, FFN-SkipLLM) runs one at a time; parallel-residual layers (attention and MLP
  read the same input) have no such halves and refuse sublayer skipping;
* the name of the layer's cache argument: ``past_key_values`` (transformers < 5.25), ``cache``
  (5.25+, where ``past_key_values`` is deprecated and removed in 5.40) or ``layer_past`` (GPT-NeoX,
  Falcon), read once from the layer's forward signature.

A family not in :data:`FAMILIES` (or a variant the loop cannot run exactly, e.g. Falcon with ALiBi)
is refused when the Backbone is built, with the list of supported families. Every supported family
is proven equal to the HF model's own forward by ``tests/test_architectures.py`` (tiny random
configs, fp32), and every run proves it again on the loaded checkpoint (:mod:`engine.self_check`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from decodebench.registry import DecodeBenchError


class UnsupportedArchitectureError(DecodeBenchError):
    """The model's family (or a variant of it) cannot run exactly in the engine's layer loop."""


@dataclass(frozen=True)
class ResidualHalves:
    """A decoder layer as two residual halves, each ``x + post(sublayer(pre(x))) * multiplier``.

    Norm names are attributes of the layer (None = no norm there). Llama-style pre-norm layers use
    the defaults; Gemma 2/3 add post-norms; OLMo 2 and EXAONE 4 are post-norm only.
    """

    attention_norm: str | None = "input_layernorm"
    attention_post_norm: str | None = None
    mlp_norm: str | None = "post_attention_layernorm"
    mlp_post_norm: str | None = None
    residual_multiplier_key: str | None = None  # config key (Granite's residual_multiplier)


PRE_NORM = ResidualHalves()
SANDWICH_NORM = ResidualHalves(
    attention_post_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
)
POST_NORM = ResidualHalves(
    attention_norm=None,
    attention_post_norm="post_attention_layernorm",
    mlp_norm=None,
    mlp_post_norm="post_feedforward_layernorm",
)


@dataclass(frozen=True)
class Family:
    """One HF model family (``config.model_type``) as the engine runs it."""

    name: str
    halves: ResidualHalves | None = PRE_NORM  # None: parallel residual, no sublayer skipping
    needs_eager: bool = False  # transformers refuses sdpa (attention soft-capping, attention sinks)
    embedding_multiplier_key: str | None = None  # config key multiplying the embeddings
    logit_scale_key: str | None = None  # config key multiplying the final logits
    logit_divisor_key: str | None = None  # config key dividing the final logits
    mla: bool = False  # multi-head latent attention: the cache holds the latent, not K/V
    # config key of the number of K/V heads (None: one per attention head, e.g. GPT-NeoX)
    kv_heads_key: str | None = "num_key_value_heads"
    # a variant of the family the loop cannot run exactly: config -> reason (None = fine)
    refuse: Callable[[object], str | None] | None = None
    # halves that depend on the config (StableLM: parallel residual or not)
    halves_for: Callable[[Any], ResidualHalves | None] | None = None

    def residual_halves(self, config) -> ResidualHalves | None:
        return self.halves_for(config) if self.halves_for is not None else self.halves


def _falcon_refusal(config) -> str | None:
    if getattr(config, "alibi", False):
        return "Falcon with ALiBi adds its position bias to the attention mask, which the engine builds itself"
    return None


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("llama"),
        Family("mistral"),
        Family("mixtral"),
        Family("qwen2"),
        Family("qwen3"),
        Family("qwen3_moe"),
        Family("gemma"),
        Family("phi3"),
        Family("glm"),
        Family("smollm3"),
        Family("olmo"),
        Family("starcoder2"),
        Family("deepseek_v3", mla=True),
        Family("gemma2", halves=SANDWICH_NORM, needs_eager=True),
        Family("gemma3_text", halves=SANDWICH_NORM),
        Family("olmo2", halves=POST_NORM),
        Family("exaone4", halves=POST_NORM),
        Family(
            "granite",
            halves=ResidualHalves(residual_multiplier_key="residual_multiplier"),
            embedding_multiplier_key="embedding_multiplier",
            logit_divisor_key="logits_scaling",
        ),
        Family("gpt_oss", needs_eager=True),
        Family("stablelm", halves_for=lambda c: None if c.use_parallel_residual else PRE_NORM),
        Family("cohere", halves=None, logit_scale_key="logit_scale"),
        Family("phi", halves=None),
        Family(
            "gpt_neox",
            kv_heads_key=None,
            halves_for=lambda c: (
                None
                if c.use_parallel_residual
                else ResidualHalves(attention_norm="input_layernorm", mlp_norm="post_attention_layernorm")
            ),
        ),
        Family("falcon", halves=None, refuse=_falcon_refusal),
    ]
}
# families refused by name, with the reason (families neither here nor in FAMILIES: "not supported")
REFUSED = {
    "gemma3": "a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration: vision tower + language model); "
    "the engine runs text decoders, e.g. Gemma 3 1B or a text-only export (model_type gemma3_text)",
}


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def family_of(config) -> Family:
    """The :class:`Family` of ``config``.

    Raises:
        UnsupportedArchitectureError: unknown family or a variant the loop cannot run exactly.
    """
    family = FAMILIES.get(config.model_type)
    if config.model_type in REFUSED:
        reason = REFUSED[config.model_type]
        raise UnsupportedArchitectureError(
            f"architecture '{config.model_type}' is refused: {reason}. Supported: {', '.join(supported_families())}"
        )
    if family is None:
        raise UnsupportedArchitectureError(
            f"architecture '{config.model_type}' is not supported by the engine's layer loop. "
            f"Supported: {', '.join(supported_families())}"
        )
    reason = family.refuse(config) if family.refuse is not None else None
    if reason:
        raise UnsupportedArchitectureError(
            f"architecture '{config.model_type}': {reason}. Supported: {', '.join(supported_families())}"
        )
    return family


def attention_implementation_for(model_type: str, requested: str) -> str:
    """The attention implementation to load ``model_type`` with: ``eager`` for families whose
    attention transformers only runs eagerly (soft-capping, sinks), else ``requested``."""
    family = FAMILIES.get(model_type)
    return "eager" if family is not None and family.needs_eager else requested


@dataclass
class ModelParts:
    """The modules of one loaded model that the loop calls, and how to call them."""

    family: Family
    embed_tokens: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    rotary_emb: torch.nn.Module | None
    lm_head: torch.nn.Module
    layer_types: list[str]  # per layer: "full_attention" | "sliding_attention" | ...
    rotary_per_layer_type: bool  # rotary_emb(x, positions, layer_type) (Gemma 3)
    cache_keyword: str  # the decoder layer's cache argument: cache | past_key_values | layer_past
    layer_kwargs: dict = field(default_factory=dict)  # further arguments every layer call takes
    embedding_multiplier: float = 1.0
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The family's transform of the LM head's output (scale, soft-cap); identity for most."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


def _first_attribute(owner: torch.nn.Module, names: tuple[str, ...], what: str, model_type: str):
    for name in names:
        module = getattr(owner, name, None)
        if module is not None:
            return module
    raise UnsupportedArchitectureError(
        f"architecture '{model_type}': no {what} found (looked for {', '.join(names)} on {type(owner).__name__})"
    )


def cache_keyword(layer: torch.nn.Module) -> str:
    """Name of a decoder layer's cache argument, read from its forward signature."""
    parameters = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "layer_past"):
        if name in parameters:
            return name
    raise UnsupportedArchitectureError(
        f"{type(layer).__name__}.forward takes no cache argument (looked for cache, past_key_values, layer_past)"
    )


def model_parts(model: torch.nn.Module) -> ModelParts:
    """Find the modules of an HF ``*ForCausalLM`` that the Backbone's loop calls.

    Raises:
        UnsupportedArchitectureError: unsupported family, or a module the loop needs is missing.
    """
    config = model.config
    family = family_of(config)
    inner = model.base_model
    layers = _first_attribute(inner, ("layers", "h"), "decoder layers", config.model_type)
    rotary = getattr(inner, "rotary_emb", None)
    config_types = getattr(config, "layer_types", None)
    logit_divisor = getattr(config, family.logit_divisor_key) if family.logit_divisor_key else 1.0
    return ModelParts(
        family=family,
        embed_tokens=inner.get_input_embeddings(),
        layers=layers,
        norm=_first_attribute(
            inner, ("norm", "final_layernorm", "final_layer_norm", "ln_f"), "final norm", config.model_type
        ),
        rotary_emb=rotary,
        lm_head=model.get_output_embeddings(),
        layer_types=list(config_types) if config_types else ["full_attention"] * len(layers),
        rotary_per_layer_type=rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters,
        cache_keyword=cache_keyword(layers[0]),
        # Falcon's layer takes its (unused without ALiBi) position bias as a required argument
        layer_kwargs={"alibi": None} if "alibi" in inspect.signature(layers[0].forward).parameters else {},
        embedding_multiplier=float(
            getattr(config, family.embedding_multiplier_key) if family.embedding_multiplier_key else 1.0
        ),
        logit_scale=float(getattr(config, family.logit_scale_key) if family.logit_scale_key else 1.0) / logit_divisor,
        final_logit_softcapping=getattr(config, "final_logit_softcapping", None),
    )


@dataclass(frozen=True)
class CacheGeometry:
    """Per-layer cache entry shape: ``heads`` × (``key_dim``, ``value_dim``)."""

    heads: int
    key_dim: int
    value_dim: int


def cache_geometry(config, family: Family) -> CacheGeometry:
    """What one decoder layer writes into the cache per token."""
    if family.mla:  # the compressed KV latent and the shared rotary key, as one head each
        return CacheGeometry(1, config.kv_lora_rank, config.qk_rope_head_dim)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if family.name == "falcon":
        kv_heads = config.num_kv_heads if config.new_decoder_architecture else 1 if config.multi_query else heads
    else:
        kv_heads = (getattr(config, family.kv_heads_key, None) if family.kv_heads_key else None) or heads
    return CacheGeometry(kv_heads, head_dim, head_dim)


def sliding_windows(config, layer_types: list[str]) -> list[int | None]:
    """Per layer, the sliding-window length its attention uses (None = full attention).

    Configs with ``layer_types`` window only their ``sliding_attention`` layers; older ones
    (Mistral, Mixtral, Starcoder2, Phi-3) window every layer when ``sliding_window`` is set.
    """
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    if getattr(config, "layer_types", None):
        return [window if kind == "sliding_attention" else None for kind in layer_types]
    return [window] * len(layer_types)
