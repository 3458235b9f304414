"""Shared pytest fixtures. Sections are owned by different parts of the project; keep each
self-contained."""

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub (this machine has no network; CI must not depend on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --- tasks / data (owner: tasks/) -------------------------------------------------------------
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Benchmark data folder: $DECODEBENCH_DATA, else <repo>/../shared/data; skip if neither holds Spec-Bench."""
    path = Path(os.environ.get("DECODEBENCH_DATA") or SHARED_DATA_DIR)
    if not (path / "spec_bench" / "question.jsonl").is_file():
        pytest.skip(f"benchmark data not found in {path} (set DECODEBENCH_DATA)")
    return path
# --- end tasks / data -------------------------------------------------------------------------
