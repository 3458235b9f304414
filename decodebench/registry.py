"""A small generic name → object registry with lazy ``"module:attr"`` entries.

Heavy optional dependencies are imported only when an entry is chosen. Unknown names raise
:class:`UnknownNameError`, which lists the valid names and a "did you mean" suggestion.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Generic, Iterable, TypeVar

T = TypeVar("T")


class DecodeBenchError(Exception):
    """Base class for user-facing errors; the CLI prints the message and exits with code 2."""

    exit_code = 2


class UnknownNameError(DecodeBenchError, KeyError):
    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(unknown_name_message(kind, name, self.valid))

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


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


class Registry(Generic[T]):
    """Maps names to objects or lazy ``"module:attr"`` strings."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Register ``entry`` under ``name``; usable as a decorator when ``entry`` is omitted."""

        def add(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"duplicate {self.kind} name '{name}'")
            self._entries[name] = obj
            return obj

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownNameError(self.kind, name, self._entries)
        entry = self._entries[name]
        if isinstance(entry, str):
            entry = import_entry(entry)
            self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def factory(self, name: str) -> Callable[..., T]:
        return self.get(name)  # type: ignore[return-value]
