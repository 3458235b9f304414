"""Loaders for the published drafter checkpoints, by local folder or hub id (``method.params.checkpoint``).

* Medusa (``FasterDecoding/medusa-vicuna-7b-v1.3`` and siblings): ``config.json`` with
  ``medusa_num_heads``, ``medusa_num_layers``, ``base_model_name_or_path``; weights
  ``medusa_lm_head.safetensors`` (or ``.pt``) with keys ``{i}.{j}.linear.weight/bias`` (residual
  block ``j`` of head ``i``) and ``{i}.{num_layers}.weight`` (the head's Linear to the vocabulary).
* EAGLE / EAGLE-2 (``yuhuili/EAGLE-Vicuna-7B-v1.3``, ``yuhuili/EAGLE-LLaMA3-Instruct-8B``): a
  LlamaConfig ``config.json`` (``hidden_size``, ``vocab_size``, ``num_hidden_layers: 1``, ``bias``)
  and ``model.safetensors`` or ``pytorch_model.bin`` with ``fc.weight`` (+ ``fc.bias``),
  ``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
  ``layers.0.post_attention_layernorm.weight`` and the target's ``embed_tokens.weight``.

A checkpoint made for another target (hidden size or vocabulary) is refused with both shapes named.
Checkpoints written by ``decodebench-train`` (``config.json`` with ``network``) load directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from decodebench.engine.backbone import Backbone
from decodebench.methods.eagle_net import EagleNet
from decodebench.registry import DecodeBenchError


def resolve_checkpoint(spec: str) -> Path:
    """A local folder, else a hub id downloaded into the Hugging Face cache."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists() or spec.count("/") != 1:
        raise DecodeBenchError(f"method.params.checkpoint: {spec!r} is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec))
    except Exception as error:  # offline, unknown repo, no permission
        raise DecodeBenchError(f"method.params.checkpoint: cannot download {spec!r} from the hub ({error})") from error


def _read_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.is_file():
        raise DecodeBenchError(f"drafter checkpoint {directory} has no config.json")
    return json.loads(file.read_text())


def _read_weights(directory: Path, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    for name in names:
        file = directory / name
        if file.is_file():
            if file.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
    raise DecodeBenchError(f"drafter checkpoint {directory} holds none of {', '.join(names)}")


def _check_shape(directory: Path, what: str, stored: int, backbone: Backbone, key: str) -> None:
    actual = int(getattr(backbone.config, key))
    if int(stored) != actual:
        raise DecodeBenchError(
            f"{what} checkpoint {directory} does not match the target: its {key} is {stored}, the target's is {actual}"
        )


def load_heads(heads_class, backbone: Backbone, directory: Path):
    """Medusa / Hydra heads from a ``decodebench-train`` checkpoint or a published Medusa one."""
    from decodebench.methods.medusa_heads import MedusaHeads

    directory = resolve_checkpoint(str(directory))
    config = _read_config(directory)
    if "network" in config:
        if config["network"] != heads_class.network:
            raise DecodeBenchError(
                f"checkpoint {directory} holds a {config['network']} drafter, not {heads_class.network}"
            )
        return heads_class.load(backbone, directory)
    if heads_class is MedusaHeads and "medusa_num_heads" in config:
        return load_published_medusa(backbone, directory, config)
    raise DecodeBenchError(
        f"checkpoint {directory}: unknown layout for {heads_class.network} (config keys: {', '.join(sorted(config))})"
    )


def load_published_medusa(backbone: Backbone, directory: Path, config: dict | None = None):
    from decodebench.methods.medusa_heads import MedusaHeads

    config = config or _read_config(directory)
    heads, layers = int(config["medusa_num_heads"]), int(config.get("medusa_num_layers", 1))
    state = _read_weights(directory, ("medusa_lm_head.safetensors", "medusa_lm_head.pt"))
    output = state.get(f"0.{layers}.weight")
    if output is None:
        raise DecodeBenchError(
            f"Medusa checkpoint {directory}: no '0.{layers}.weight' for "
            f"medusa_num_layers={layers} (keys: {', '.join(sorted(state)[:6])}, ...)"
        )
    _check_shape(directory, "Medusa", output.shape[1], backbone, "hidden_size")
    _check_shape(directory, "Medusa", output.shape[0], backbone, "vocab_size")
    net = MedusaHeads(backbone, MedusaHeads.Params(num_heads=heads, num_layers=layers))
    missing, unexpected = net.load_state_dict({f"heads.{k}": v for k, v in state.items()}, strict=False)
    if missing or unexpected:
        raise DecodeBenchError(
            f"Medusa checkpoint {directory} does not fit medusa_num_heads={heads}, "
            f"medusa_num_layers={layers}: missing {missing}, unexpected {unexpected}"
        )
    return net.eval()


def load_eagle_checkpoint(backbone: Backbone, directory: Path) -> EagleNet:
    """EAGLE weights from a ``decodebench-train`` checkpoint or a published EAGLE / EAGLE-2 one."""
    from decodebench.methods.eagle import load_eagle

    directory = resolve_checkpoint(str(directory))
    config = _read_config(directory)
    if "network" in config:
        return load_eagle(backbone, directory)
    _check_shape(directory, "EAGLE", config.get("hidden_size", -1), backbone, "hidden_size")
    _check_shape(directory, "EAGLE", config.get("vocab_size", -1), backbone, "vocab_size")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise DecodeBenchError(
            f"EAGLE checkpoint {directory}: num_hidden_layers={config['num_hidden_layers']}, "
            "EAGLE-1/2 drafters have one layer"
        )
    state = _read_weights(directory, ("model.safetensors", "pytorch_model.bin"))
    embedding = state.pop("embed_tokens.weight", None)
    if embedding is not None and tuple(embedding.shape) != tuple(backbone.embed_tokens.weight.shape):
        raise DecodeBenchError(
            f"EAGLE checkpoint {directory}: embed_tokens {tuple(embedding.shape)} does not match "
            f"the target's {tuple(backbone.embed_tokens.weight.shape)}"
        )
    net = EagleNet(backbone, EagleNet.Params(bias=bool(config.get("bias", True))))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise DecodeBenchError(
            f"EAGLE checkpoint {directory} does not fit this target's layer: missing {missing}, unexpected {unexpected}"
        )
    return net.eval()


# -- EAGLE-3 -----------------------------------------------------------------------------------------
# yuhuili/EAGLE3-* (e.g. EAGLE3-LLaMA3.1-Instruct-8B): a LlamaConfig-style config.json with
# ``hidden_size``, ``vocab_size`` (the target's), ``draft_vocab_size``, ``num_hidden_layers: 1``
# (``target_hidden_size`` when the drafter is narrower than the target); weights
# (``model.safetensors`` / ``pytorch_model.bin``): ``fc.weight`` (h × 3h), ``midlayer.*`` (q/k/v over
# 2h), ``norm.weight``, ``lm_head.weight`` (draft vocabulary × h), ``d2t`` / ``t2d`` (absent when the
# draft vocabulary is the full one), sometimes the target's ``embed_tokens.weight``. The fused
# layers are the reference's fixed [2, L // 2, L - 3].
def load_eagle3_checkpoint(backbone: Backbone, directory: Path):
    """EAGLE-3 weights from a ``decodebench-train`` checkpoint or a published EAGLE-3 one."""
    from decodebench.methods.draft_heads import DraftVocab, check_target_shape
    from decodebench.methods.eagle3_net import Eagle3Net

    directory = resolve_checkpoint(str(directory))
    config = _read_config(directory)
    if "network" in config:
        if config["network"] != Eagle3Net.network:
            raise DecodeBenchError(f"checkpoint {directory} holds a {config['network']} drafter, not eagle3")
        check_target_shape(config, backbone, directory)
        state = _read_weights(directory, ("model.safetensors",))
        params = Eagle3Net.Params(**config.get("params", {}))
    else:
        _check_shape(directory, "EAGLE-3", config.get("hidden_size", -1), backbone, "hidden_size")
        _check_shape(directory, "EAGLE-3", config.get("vocab_size", -1), backbone, "vocab_size")
        target_hidden = config.get("target_hidden_size")
        if target_hidden is not None and int(target_hidden) != int(config["hidden_size"]):
            raise DecodeBenchError(
                f"EAGLE-3 checkpoint {directory}: target_hidden_size {target_hidden} differs from the drafter's "
                f"hidden_size {config['hidden_size']}; drafters narrower than their target are not supported"
            )
        if int(config.get("num_hidden_layers", 1)) != 1:
            raise DecodeBenchError(
                f"EAGLE-3 checkpoint {directory}: num_hidden_layers={config['num_hidden_layers']}, "
                "EAGLE-3 drafters have one layer"
            )
        state = _read_weights(directory, ("model.safetensors", "pytorch_model.bin"))
        embedding = state.pop("embed_tokens.weight", None)
        if embedding is not None and tuple(embedding.shape) != tuple(backbone.embed_tokens.weight.shape):
            raise DecodeBenchError(
                f"EAGLE-3 checkpoint {directory}: embed_tokens {tuple(embedding.shape)} does not match "
                f"the target's {tuple(backbone.embed_tokens.weight.shape)}"
            )
        params = Eagle3Net.Params(draft_vocab_size=int(config.get("draft_vocab_size", config["vocab_size"])))
    if "lm_head.weight" not in state:
        raise DecodeBenchError(f"EAGLE-3 checkpoint {directory} has no lm_head.weight")
    draft_size = int(state["lm_head.weight"].shape[0])
    if "d2t" in state:
        vocab = DraftVocab.from_maps(state["d2t"], state["t2d"])
        if vocab.size != draft_size or vocab.target_size != backbone.config.vocab_size:
            raise DecodeBenchError(
                f"EAGLE-3 checkpoint {directory}: d2t / t2d cover {vocab.size} of {vocab.target_size} tokens, "
                f"lm_head has {draft_size} rows and the target {backbone.config.vocab_size} tokens"
            )
    elif draft_size == backbone.config.vocab_size:
        vocab = None
    else:
        raise DecodeBenchError(
            f"EAGLE-3 checkpoint {directory}: lm_head has {draft_size} rows but no d2t / t2d maps to the "
            f"target's {backbone.config.vocab_size} tokens"
        )
    net = Eagle3Net(backbone, params, vocab)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in ("d2t", "t2d") or vocab is not None]
    if missing or unexpected:
        raise DecodeBenchError(
            f"EAGLE-3 checkpoint {directory} does not fit this target: missing {missing}, unexpected {unexpected}"
        )
    return net.eval()
