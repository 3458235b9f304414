"""A non-editable install puts everything under the ONE import name ``decodebench``."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def installed_modules_expected() -> list[str]:
    """``decodebench/<path>`` in the wheel for every module of every package folder of the checkout:
    ``decodebench/x.py`` stays, ``<folder>/x.py`` becomes ``decodebench/<folder>/x.py``."""
    expected = []
    for init in ROOT.rglob("__init__.py"):
        folder = init.parent.relative_to(ROOT)
        if folder.parts[0] in ("tests", ".venv", "build") or folder.parts[0].startswith("."):
            continue
        inside = folder if folder.parts[0] == "decodebench" else Path("decodebench", folder)
        expected += [(inside / module.name).as_posix() for module in init.parent.glob("*.py")]
    return expected


def test_package_discovery_finds_every_package_folder(tmp_path):
    """setup.py walks its roots: a new sub-package (here a scratch ``engine/kernels/``) is found."""
    import runpy

    layout = runpy.run_path(str(ROOT / "setup.py"), run_name="layout")
    packages = layout["find_packages_under_roots"]()
    assert {"decodebench", "decodebench.engine", "decodebench.models", "decodebench.conf"} <= set(packages)
    folders = {
        init.parent.relative_to(ROOT).as_posix()
        for init in ROOT.rglob("__init__.py")
        if not init.relative_to(ROOT).parts[0].startswith((".", "tests", "build"))
    }
    assert len(packages) == len(folders), (packages, folders)
    scratch = tmp_path / "checkout"  # a new sub-package in a scratch tree, found without editing setup.py
    for folder in ("engine", "engine/kernels"):
        (scratch / folder).mkdir(parents=True)
        (scratch / folder / "__init__.py").write_text("")
    layout["find_packages_under_roots"].__globals__["HERE"] = scratch
    assert layout["find_packages_under_roots"]() == ["decodebench.engine", "decodebench.engine.kernels"]


@pytest.mark.slow
def test_wheel_installs_only_decodebench_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next(dist.glob("decodebench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"decodebench", wheel.name.split("-py")[0] + ".dist-info"}
    for expected in (
        "decodebench/engine/backbone.py",
        "decodebench/methods/pld.py",
        "decodebench/tasks/spec_bench.py",
        "decodebench/conf/config.yaml",
        "decodebench/conf/method/pld.yaml",
        "decodebench/conf/experiment/bench.yaml",
    ):
        assert expected in names
    # every folder of the checkout with an __init__.py (tests aside) is in the wheel, with all its modules
    assert set(installed_modules_expected()) <= set(names), set(installed_modules_expected()) - set(names)

    # a fresh venv with the wheel; dependencies come from this environment's site-packages
    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    dependency_dirs = [p for p in sys.path if p.endswith("site-packages")] or [sysconfig.get_paths()["purelib"]]
    (fresh_site / "deps.pth").write_text("\n".join(dependency_dirs) + "\n")
    check = (
        "import importlib.util, decodebench, decodebench.methods.pld, decodebench.engine.backbone\n"
        f"assert decodebench.__file__.startswith({str(fresh_site)!r}), decodebench.__file__\n"
        "for generic in ('methods', 'tasks', 'runners', 'analysis', 'engine', 'conf'):\n"
        "    assert importlib.util.find_spec(generic) is None, generic\n"
    )
    subprocess.run([str(python), "-c", check], check=True, cwd=tmp_path)
    composed = subprocess.run(
        [str(python), "-m", "decodebench.cli", "method=pld", "--cfg", "job"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert "impl: decodebench.methods.pld:PromptLookupDrafter" in composed.stdout
