"""What every trained head-based drafter (EAGLE, Medusa, Hydra) shares: the draft vocabulary, the
checkpoint layout in the DecodeBench cache, and the error for a missing checkpoint.

Checkpoints live in ``<cache>/drafters/<model>/<network>/``: ``model.safetensors`` (weights),
``config.json`` (the network's ``Params`` and the target's shape) and ``manifest.json`` (how it
was trained: corpus, tokens, steps, time, held-out agreement, git sha). ``decodebench-train``
writes them (:mod:`decodebench.training`); methods read them in ``setup``.

Draft vocabulary (EAGLE-3's reduced head): a drafter may predict over the ``N`` most frequent target
tokens of its training corpus only. ``d2t[i]`` is the offset from draft id ``i`` to its target id
(target = i + d2t[i]) and ``t2d`` marks the target ids inside the draft vocabulary, as in the
published EAGLE-3 checkpoints. A smaller head makes each draft forward cheaper (on this CPU the
49k-token LM head is ~20 % of a target step); a target token outside it can never be drafted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from decodebench.config import default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.registry import DecodeBenchError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MANIFEST_FILE = "manifest.json"


class MissingCheckpointError(DecodeBenchError):
    """A trained-drafter method found no checkpoint; the message is the command that trains it."""


@dataclass
class DraftVocab:
    """The draft head's vocabulary: ``ids[i]`` = target id of draft id ``i`` (most frequent first)."""

    ids: torch.Tensor  # (N,) int64 target ids
    target_size: int  # the target's vocabulary size

    @classmethod
    def most_frequent(cls, token_counts: torch.Tensor, size: int) -> DraftVocab:
        """The ``size`` most frequent tokens of ``token_counts`` (``(V,)`` counts over a corpus)."""
        if not 1 <= size <= token_counts.shape[0]:
            raise DecodeBenchError(f"draft_vocab_size must be in [1, {token_counts.shape[0]}], got {size}")
        order = torch.argsort(token_counts, descending=True, stable=True)
        return cls(ids=order[:size].clone().long(), target_size=int(token_counts.shape[0]))

    @classmethod
    def from_maps(cls, d2t: torch.Tensor, t2d: torch.Tensor) -> DraftVocab:
        """From EAGLE-3's ``d2t`` (offsets) and ``t2d`` (bool mask over the target vocabulary)."""
        ids = torch.arange(d2t.shape[0], dtype=torch.long) + d2t.long()
        if int(t2d.sum()) != d2t.shape[0] or not bool(t2d[ids].all()):
            raise DecodeBenchError("draft vocabulary maps d2t and t2d disagree")
        return cls(ids=ids, target_size=int(t2d.shape[0]))

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def d2t(self) -> torch.Tensor:
        return self.ids - torch.arange(self.size, dtype=torch.long)

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.target_size, dtype=torch.bool)
        mask[self.ids] = True
        return mask

    def draft_index(self) -> torch.Tensor:
        """``(V,)`` draft id of each target id, -1 outside the draft vocabulary (training labels)."""
        index = torch.full((self.target_size,), -1, dtype=torch.long)
        index[self.ids] = torch.arange(self.size, dtype=torch.long)
        return index


def model_key(backbone: Backbone) -> str:
    """A model's folder name in the cache: its catalogue name, else its directory's name (catalogue
    models live in ``<cache>/models/<name>``), else a fingerprint of its shape (random tiny models)."""
    if getattr(backbone, "model_name", None):
        return backbone.model_name
    config = backbone.config
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name
    if name:
        return name
    return f"{config.model_type}-h{config.hidden_size}-l{config.num_hidden_layers}-v{config.vocab_size}"


def checkpoint_dir(cache_dir: str | None, model_name: str, network: str) -> Path:
    """``<cache>/drafters/<model>/<network>/``."""
    return Path(cache_dir or default_cache_dir()).expanduser() / "drafters" / model_name / network


def train_command(network: str, model_name: str) -> str:
    return f"decodebench-train drafter={network} model={model_name}"


def require_checkpoint(directory: Path, method: str, network: str, model_name: str) -> Path:
    """``directory`` if it holds a checkpoint, else :class:`MissingCheckpointError` naming the command."""
    if not (directory / WEIGHTS_FILE).is_file():
        raise MissingCheckpointError(
            f"method '{method}' needs a trained {network} drafter for model '{model_name}', and there is none "
            f"at {directory}. Train it with: {train_command(network, model_name)}"
        )
    return directory


def save_checkpoint(
    directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any], manifest: dict[str, Any] | None = None
) -> Path:
    """Write weights (safetensors), ``config.json`` and, when given, ``manifest.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if manifest is not None:
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def load_checkpoint(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return load_file(str(directory / WEIGHTS_FILE)), json.loads((directory / CONFIG_FILE).read_text())


def check_target_shape(config: dict[str, Any], backbone: Backbone, where: Path) -> None:
    """A checkpoint trained for another target (hidden size, vocabulary) is an error, never used."""
    for key, actual in (("hidden_size", backbone.config.hidden_size), ("vocab_size", backbone.config.vocab_size)):
        stored = config.get(key)
        if stored is not None and int(stored) != int(actual):
            raise DecodeBenchError(
                f"drafter checkpoint {where} was made for a target with {key}={stored}, this target has {key}={actual}"
            )
