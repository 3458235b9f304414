"""Names → objects: lazy ``"module:attr"`` entries and the errors about names.

The registries are the config folders: a method is ``conf/method/<name>.yaml`` whose ``impl:
"module:attr"`` is imported (:func:`import_entry`) only when chosen, so heavy optional
dependencies load only then. Unknown names raise :class:`UnknownNameError`, which lists the valid
names and a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterable
from typing import Any


class DecodeBenchError(Exception):
    """Base class for user-facing errors; the CLI prints the message and exits with code 2."""

    exit_code = 2


class UnknownNameError(DecodeBenchError, KeyError):
    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(unknown_name_message(kind, name, self.valid))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigValueError(DecodeBenchError, ValueError):
    """A config value out of its allowed range (the CLI exits with code 2)."""


def check(condition: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigValueError` naming ``key`` and what is allowed unless ``condition``.
    (Here, not in config.py, so that modules the sandbox's own interpreter imports need no Hydra.)"""
    if not condition:
        raise ConfigValueError(f"invalid value for '{key}': {value!r} (allowed: {allowed})")


def unknown_name_message(kind: str, name: str, valid: Iterable[str], where: str = "") -> str:
    """``unknown method 'pldd'. Valid methods: ar, pld. Did you mean 'pld'?`` (``where`` is
    inserted after the name, e.g. ``" for method 'pld'"``)."""
    valid = sorted(valid)
    message = f"unknown {kind} '{name}'{where}. Valid {kind}s: {', '.join(valid) or '(none)'}"
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    if close:
        message += f". Did you mean '{close[0]}'?"
    return message


def import_entry(spec: str) -> Any:
    """Import ``"package.module:attr"`` and return the attribute."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module
