"""Package layout (the rest of the metadata is in pyproject.toml).

The design card keeps the sub-packages in top-level folders (``engine/``, ``methods/``, ...); each
installs as ``decodebench.<folder>`` under the ONE import name, never as a generic top-level module.
``PACKAGE_ROOTS`` maps each import name to its folder, written once; every folder below a root that
holds an ``__init__.py`` is a package, found by walking the roots (a new sub-package such as
``engine/kernels/`` cannot be left out of the wheel; tests/test_packaging.py checks the wheel).
"""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
PACKAGE_ROOTS = {
    "decodebench": "decodebench",
    "decodebench.engine": "engine",
    "decodebench.methods": "methods",
    "decodebench.models": "models",
    "decodebench.tasks": "tasks",
    "decodebench.runners": "runners",
    "decodebench.analysis": "analysis",
    "decodebench.training": "training",
    "decodebench.conf": "conf",
}


def find_packages_under_roots() -> list[str]:
    """Every package below each root: the root's import name + the dotted path of each folder
    holding an ``__init__.py``."""
    packages = []
    for name, folder in PACKAGE_ROOTS.items():
        root = HERE / folder
        for init in sorted(root.rglob("__init__.py")):
            relative = init.parent.relative_to(root).parts
            packages.append(".".join((name, *relative)))
    return sorted(packages)


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
    setup(packages=find_packages_under_roots(), package_dir=PACKAGE_ROOTS)
