"""Names of models given by id (``model=hf model.id=...``), without importing torch or transformers."""

from __future__ import annotations

from pathlib import Path


def is_local_model_dir(model_id: str) -> bool:
    """True when ``model_id`` names an existing local directory (else it is taken as a hub id)."""
    return Path(model_id).expanduser().is_dir()


def looks_like_path(model_id: str) -> bool:
    """Ids that can only be meant as paths (absolute, ``./``, ``../``, ``~``): never a hub id."""
    return model_id.startswith(("/", "./", "../", "~", ".\\")) or model_id in (".", "..") or "\\" in model_id


def model_name_from_id(model_id: str | None) -> str:
    """The run's model name for ``model.id``: a local directory's name, or the hub id's last part
    (``Qwen/Qwen2.5-0.5B-Instruct`` -> ``Qwen2.5-0.5B-Instruct``); ``hf`` while no id is given."""
    if not model_id:
        return "hf"
    text = str(model_id).rstrip("/")
    if is_local_model_dir(text):
        return Path(text).expanduser().resolve().name
    return text.rsplit("/", 1)[-1] or "hf"
