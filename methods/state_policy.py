"""State policies for drafters that learn while decoding (matrices, tries, pools).

A stateful method's ``Params`` carries ``state``, one of:

* ``per_prompt`` — learned state is cleared at the start of every generation (``begin``);
* ``per_task`` — state is kept across all prompts of the run (cleared only by ``reset_state``);
* ``persistent`` — as ``per_task``, and the state is also loaded from
  ``<cache_dir>/state/<method>-<model key>.pt`` in ``setup`` and written back in ``finish``, so
  it carries over from one run to the next.

:class:`StatefulDrafter` implements the policy once; a subclass supplies four small hooks:
``_clear_state`` (the empty state), ``_state_dict`` / ``_load_state_dict`` (a snapshot made only
of tensors, numbers and strings, so ``torch.load(weights_only=True)`` can read it) and optionally
``_end_generation`` (flush per-generation buffers before the state is read).
"""

from __future__ import annotations

import abc
import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from decodebench.config import check, default_cache_dir
from decodebench.engine.backbone import Backbone
from decodebench.engine.drafting import Drafter

log = logging.getLogger("decodebench")

STATE_POLICIES = ("per_prompt", "per_task", "persistent")
STATE_FORMAT = 1  # bump when a method's snapshot layout changes


def check_state_policy(value: str) -> None:
    """Validate a ``method.params.state`` value (raises ConfigValueError naming the choices)."""
    check(value in STATE_POLICIES, "method.params.state", value, " | ".join(STATE_POLICIES))


def model_key(backbone: Backbone) -> str:
    """A filename-safe key for the target model, e.g. ``smollm2-135m-llama-v49152-h576-l30``.

    The key names the checkpoint (last path component of ``_name_or_path``, or the model type)
    and the shapes that learned state depends on, so two different models never share a file.
    """
    config = backbone.config
    name = Path(str(getattr(config, "_name_or_path", "") or "")).name or config.model_type
    key = f"{name}-{config.model_type}-v{config.vocab_size}-h{config.hidden_size}-l{backbone.num_layers}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def state_path(cache_dir: str | None, method: str, backbone: Backbone) -> Path:
    """``<cache_dir>/state/<method>-<model key>.pt`` (``cache_dir`` None = the default cache)."""
    root = Path(cache_dir or default_cache_dir()).expanduser()
    return root / "state" / f"{method}-{model_key(backbone)}.pt"


class StatefulDrafter(Drafter, abc.ABC):
    """A drafter whose learned state follows ``params.state`` (see the module docstring).

    Subclasses set ``state_name`` (the file prefix, normally the method's registry name) and
    implement the hooks below; they call ``super().setup`` / ``super().begin`` when overriding.
    """

    state_name = "stateful"

    def __init__(self, params: Any):
        self.params = params
        self.state_file: Path | None = None
        self._initial: dict[str, Any] | None = None  # snapshot taken at setup

    # -- hooks -------------------------------------------------------------------------------
    @abc.abstractmethod
    def _clear_state(self) -> None:
        """Make the learned state empty (the state before any prompt was seen)."""

    @abc.abstractmethod
    def _state_dict(self) -> dict[str, Any]:
        """Snapshot of the learned state: tensors, numbers and strings only."""

    @abc.abstractmethod
    def _load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore a snapshot; return False (leaving the state empty) if it does not fit."""

    def _end_generation(self) -> None:
        """Fold what the last generation left pending into the state (default: nothing)."""

    # -- Drafter API -------------------------------------------------------------------------
    def setup(self, backbone: Backbone, cache_dir: str | None = None) -> None:
        """Start from the empty state, or from the saved one under ``persistent``."""
        self._clear_state()
        if self.params.state == "persistent":
            self.state_file = state_path(cache_dir, self.state_name, backbone)
            self._load_file(self.state_file)
        self._initial = copy.deepcopy(self._state_dict())

    def reset_state(self) -> None:
        """Return to the state ``setup`` left (the runner calls this after warm-up)."""
        self._clear_state()
        if self._initial is not None:
            self._load_state_dict(copy.deepcopy(self._initial))

    def begin(self, prompt_ids: list[int]) -> None:
        """Close the previous generation; ``per_prompt`` starts every prompt from empty."""
        self._end_generation()
        if self.params.state == "per_prompt":
            self._clear_state()

    def finish(self) -> None:
        """Close the last generation; ``persistent`` writes the state back to its file."""
        self._end_generation()
        if self.params.state == "persistent" and self.state_file is not None:
            self._save_file(self.state_file)

    # -- files -------------------------------------------------------------------------------
    def _load_file(self, path: Path) -> None:
        if not path.is_file():
            log.info("%s: no saved state at %s, starting empty", self.state_name, path)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT or not self._load_state_dict(state):
            log.warning("%s: saved state %s does not fit these parameters; starting empty", self.state_name, path)
            self._clear_state()

    def _save_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"format": STATE_FORMAT, **self._state_dict()}, partial)
        os.replace(partial, path)  # atomic: a killed run never leaves a torn state file
