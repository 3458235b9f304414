"""``requirements.lock`` (written by ``make lock``, installed exactly by ``make setup``): its hash and
how the installed packages differ from it — recorded in every run's manifest (``lock``).

``python -m decodebench.lockfile [LOCK]`` prints the differences (``make test-latest`` uses it to
show what moved upstream since the lock was written).
"""

from __future__ import annotations

import hashlib
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import decodebench

LOCK_FILE = "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)==([^\s;\\]+)", re.MULTILINE)


def default_lock_path() -> Path:
    """The lock next to the source tree this package runs from (an editable install)."""
    return Path(decodebench.__file__).resolve().parents[1] / LOCK_FILE


def read_pins(text: str) -> dict[str, str]:
    """``{name: version}`` of the ``name==version`` lines of a lock file."""
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(text)}


def drift(pins: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """Packages whose installed version is not the locked one: ``{name: {"locked", "installed"}}``."""
    moved = {}
    for name, locked in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != locked:
            moved[name] = {"locked": locked, "installed": installed}
    return moved


def lock_info(path: Path | None = None) -> dict[str, Any] | None:
    """``{"file", "sha256", "packages", "drift"}`` of the lock, or None without one (a wheel install)."""
    path = path or default_lock_path()
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    pins = read_pins(text)
    return {
        "file": str(path),
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
        "packages": len(pins),
        "drift": drift(pins),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = lock_info(Path(argv[0]) if argv else None)
    if info is None:
        print("no lock file", file=sys.stderr)
        return 2
    print(
        f"{info['file']}: {info['packages']} packages, sha256 {info['sha256'][:16]}; "
        f"{len(info['drift'])} installed differently"
    )
    for name, versions in info["drift"].items():
        print(f"  {name:<28} locked {versions['locked']:<14} installed {versions['installed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
