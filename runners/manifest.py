"""Provenance for every run: code version, library versions, hardware, threads, seed, times."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import decodebench
from decodebench.lockfile import lock_info

PACKAGES = ("torch", "transformers", "hydra-core", "datasets", "pandas", "decodebench")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def git_info() -> dict[str, Any]:
    """Commit and dirty flag of the DecodeBench source tree (null when not a git checkout)."""
    source = Path(decodebench.__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "gpu": None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


# Keys that do not change what a run measures: they stay out of the resume hash.
NOT_HASHED = ("run_dir", "progress", "overwrite", "logger")


def config_hash(resolved_config: dict[str, Any]) -> str:
    """Hash of the resolved config minus where-it-runs keys (used to decide if a run can resume)."""
    relevant = {k: v for k, v in resolved_config.items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slurm_info() -> dict[str, Any] | None:
    """The SLURM job this run belongs to (None outside SLURM); ``restart_count`` > 0 after a requeue."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    names = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "partition": "SLURM_JOB_PARTITION",
        "nodelist": "SLURM_JOB_NODELIST",
        "cpus_per_task": "SLURM_CPUS_PER_TASK",
        "restart_count": "SLURM_RESTART_COUNT",
    }
    return {key: os.environ.get(name) for key, name in names.items()}


def build_manifest(resolved_config: dict[str, Any], device: str, seed: int, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "decodebench": decodebench.__version__,
        "git": git_info(),
        "versions": versions(),
        "lock": lock_info(),  # requirements.lock's sha256 and the installed packages that differ from it
        "hardware": hardware(device),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "config_hash": config_hash(resolved_config),
        "command": sys.argv,
        "slurm": slurm_info(),
        "started": utc_now(),
        "finished": None,
        **extra,
    }
