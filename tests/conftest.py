"""Shared pytest fixtures. Sections are owned by different parts of the project; keep each
self-contained."""

import os
from pathlib import Path

import pytest

# Tests never reach the Hugging Face hub (this machine has no network; CI must not depend on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Runs composed in tests use the eager engine (engine.backend=auto would compile the embedded model,
# minutes per run); tests/test_backends.py exercises every backend explicitly.
os.environ.setdefault("DECODEBENCH_ENGINE_BACKEND", "eager")


def pytest_configure(config):
    """Under pytest-xdist (make test: PYTEST_WORKERS processes) each worker uses one torch thread, and
    so do the runs it starts (``threads: null`` is torch's default, OMP_NUM_THREADS): workers of N
    threads each on N cores oversubscribe them, and OpenMP spin-waits make that 10-50x slower."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("MKL_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)


# The longest test files, longest first (seconds of one worker, make test under load average 4.5 on
# the 2-core Xeon, 2026-12-05). With --dist loadfile a file runs whole on one worker, and the workers
# take files in collection order (make test passes --no-loadscope-reorder): long files first, so the
# run does not end with one worker alone on a long file. A file missing here only runs later.
LONGEST_FILES = [
    "test_backends.py",  # 535 s
    "test_faults_slurm.py",  # 416 s (one test: a SLURM array killed and resumed)
    "test_cli.py",  # 393 s
    "test_faults.py",  # 262 s
    "test_method_lade.py",  # 240 s
    "test_training_pipeline.py",  # 223 s
    "test_method_token_recycling.py",  # 219 s
    "test_method_aded.py",  # 210 s
    "test_method_suffix.py",  # 200 s
    "test_slurm.py",  # 176 s
    "test_first_use_curve.py",  # 172 s
    "test_method_clover_hidden_transfer.py",  # 168 s
    "test_method_fspad.py",  # ~200 s under load (the embedded-model test trains a drafter)
    "test_speed_bench.py",  # 160 s
    "test_resume.py",  # 152 s
    "test_method_lookahead.py",  # 147 s
    "test_own_model.py",  # 121 s
    "test_method_swift.py",  # 99 s
    "test_sweeps.py",  # 73 s
]


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist: the LONGEST_FILES first, in that order; the rest keep collection order."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# --- fixed verify-latency curves for the tiny test models -------------------------------------
# A tiny model's step takes ~1 ms, so a curve measured for it is noise: under load a first-use
# measurement inside an unrelated run (a CLI or SLURM test) can be refused as implausible
# (T(2)/T(1) < 0.5) and fail that test, and every engine change (a new engine revision) makes the
# stored ones stale. Runs on the default cache read these fixed curves instead; the first-use
# measurement itself is tested on its own caches (tests/test_first_use_curve.py).
TINY_CURVE_MODELS = ("tiny-llama", "tiny-qwen2")
TINY_CURVE_RATIOS = {1: 1.0, 2: 1.1, 3: 1.15, 4: 1.2, 6: 1.3, 8: 1.4, 12: 1.7, 16: 2.0}


@pytest.fixture(scope="session", autouse=True)
def fixed_tiny_model_curves():
    import json

    import torch

    from decodebench.config import default_cache_dir
    from decodebench.engine.profile import profile_path
    from decodebench.engine.revision import engine_revision

    ks = list(TINY_CURVE_RATIOS)
    for model in TINY_CURVE_MODELS:
        for backend in ("eager", "tuned"):
            for threads in {1, 2, torch.get_num_threads()}:
                path = profile_path(model, backend, "cpu", default_cache_dir(), threads)
                path.parent.mkdir(parents=True, exist_ok=True)
                curve = {
                    "model": model,
                    "backend": backend,
                    "device": "cpu",
                    "threads": threads,
                    "context": 175,
                    "k": ks,
                    "ms": [TINY_CURVE_RATIOS[k] for k in ks],
                    "ratio": [TINY_CURVE_RATIOS[k] for k in ks],
                    "seconds": {str(k): TINY_CURVE_RATIOS[k] / 1000 for k in ks},
                    "repeats": 5,
                    "checked": True,
                    "measured_by": "tests/conftest.py (fixed)",
                    "engine_revision": engine_revision(),
                }
                # atomically: pytest-xdist workers write the same files while others read them
                partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                partial.write_text(json.dumps(curve, indent=2))
                os.replace(partial, path)


# --- shared test scaffolding (tests/helpers.py) -----------------------------------------------
# test modules `from helpers import ...`: pyproject.toml puts tests/ on the path (pythonpath)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def backbone(request):
    """helpers.tiny_backbone for each architecture (a module's own ``backbone`` fixture overrides it)."""
    from helpers import tiny_backbone

    return tiny_backbone(request.param)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    """helpers.tiny_pair ``(target, draft)`` for each architecture (a module's own ``pair`` overrides it)."""
    from helpers import tiny_pair

    return tiny_pair(request.param)


@pytest.fixture(scope="module")
def ar_outputs(backbone):
    """AR's greedy ids (48 new tokens) for every helpers.repeating_prompts() prompt, once per model."""
    from decodebench.config import MethodConfig
    from decodebench.methods import build_method

    from helpers import decode, repeating_prompts

    ar = build_method(MethodConfig())
    ar.setup(backbone)
    return [decode(backbone, ar, prompt).new_ids for prompt in repeating_prompts()]


@pytest.fixture
def one_thread():
    """Tiny models are dispatch-bound: one thread is fastest and avoids OpenMP spin-waits, which
    make these tests 10x slower on a busy 2-core machine. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- end shared test scaffolding --------------------------------------------------------------


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


# --- analysis (owner: analysis/) --------------------------------------------------------------
# A small synthetic sweep written with the runner's own writer (RunDirectory), so the paper tables,
# plots and cost model are tested on exact, deterministic numbers. See tests/test_analysis_frame.py
# for the numbers each run dir is built to give.
CURVE = {
    "model": "tiny",
    "backend": "engine",
    "device": "cpu",
    "threads": 2,
    "context": 200,
    "k": [1, 2, 3, 4],
    "ms": [100.0, 120.0, 150.0, 200.0],
    "ratio": [1.0, 1.2, 1.5, 2.0],
}


def _analysis_run(
    root: Path,
    name: str,
    records: list,
    method: str,
    lossless: bool = True,
    seed: int = 0,
    cpu: str = "TestCPU",
    shard=None,
    curve=None,
    baseline: str = "ar",
) -> Path:
    from decodebench.runners.run_dir import MANIFEST, RunDirectory

    run = RunDirectory(root / name)
    run.write_config(
        {
            "model": {"name": "tiny"},
            "method": {"name": method, "lossless": lossless},
            "task": {"name": "spec_bench"},
            "gen": {"temperature": 0.0, "max_new_tokens": 8},
            "seed": seed,
            "device": "cpu",
            "dtype": "float32",
            "threads": 2,
            "shard": shard,
            "baseline": baseline,
            "run_dir": str(root / name),
        }
    )
    run.write_json(
        MANIFEST,
        {
            "git": {"sha": "0123456789abcdef", "dirty": False},
            "threads": 2,
            "seed": seed,
            "hardware": {"hostname": "h", "cpu": cpu, "cpu_count": 2, "device": "cpu", "gpu": None},
        },
    )
    for record in records:
        run.append_record(record)
    if curve is not None:
        run.write_json("latency_curve.json", curve)
    return run.path


def _analysis_record(method: str, role: str, sample_id: str, group: str, seed: int = 0, **fields):
    from decodebench.records import Record

    return Record(
        method=method,
        role=role,
        task="spec_bench",
        model="tiny",
        sample_id=sample_id,
        category=group,
        group=group,
        turn=0,
        seed=seed,
        **fields,
    )


def analysis_ar(
    method: str, role: str, sample_id: str, group: str, seed: int = 0, wall_s: float = 1.0, quality: float = 1.0
):
    """AR: 9 tokens in 9 forwards (8 decode steps of 0.1 s), wall 1.0 s, prefill 0.1 s."""
    return _analysis_record(
        method,
        role,
        sample_id,
        group,
        seed,
        prompt_tokens=20,
        new_tokens=9,
        wall_s=wall_s,
        prefill_s=0.1,
        draft_s=0.0,
        verify_s=0.8,
        steps=9,
        drafted=0,
        accepted=0,
        drafted_lengths=[0] * 8,
        accepted_lengths=[0] * 8,
        tree_sizes=[1] * 8,
        output_ids=list(range(9)),
        quality={"exact_match": quality},
    )


def analysis_method(
    method: str, sample_id: str, group: str, seed: int = 0, wall_s: float = 0.5, quality: float = 1.0, lossless=True
):
    """4 decode steps of a 3-token tree (2 drafted, 1 accepted): 9 tokens in 5 forwards."""
    return _analysis_record(
        method,
        "method",
        sample_id,
        group,
        seed,
        prompt_tokens=20,
        new_tokens=9,
        wall_s=wall_s,
        prefill_s=0.1,
        draft_s=0.04,
        verify_s=0.3,
        steps=5,
        drafted=8,
        accepted=4,
        drafted_lengths=[2] * 4,
        accepted_lengths=[1] * 4,
        tree_sizes=[3] * 4,
        output_ids=list(range(9)),
        lossless=lossless,
        quality={"exact_match": quality},
    )


@pytest.fixture
def analysis_builders():
    """The builders above, for tests that write their own run dirs (conftest is not importable)."""
    from types import SimpleNamespace

    return SimpleNamespace(run=_analysis_run, ar=analysis_ar, method=analysis_method, curve=CURVE)


@pytest.fixture
def analysis_sweep(tmp_path) -> Path:
    """sweep/pld_s0, pld_s1: pld (lossless) with in-process AR, walls 0.5 / 0.4 s (speedup 2.0 / 2.5),
    its own latency curve in pld_s0; sweep/skip: a lossy method (exact_match 0.5 vs AR 1.0), walls 0.25 s;
    sweep/ar: a dedicated method=ar run; sweep/pld_nobase: pld without a baseline (joins sweep/ar);
    sweep/other_machine: pld without a baseline on another CPU (joins nothing)."""
    root = tmp_path / "sweep"
    samples = [("81", "mt_bench"), ("401", "qa")]
    for seed, wall in ((0, 0.5), (1, 0.4)):
        records = [
            r
            for sid, group in samples
            for r in (
                analysis_ar("ar", "baseline", sid, group, seed),
                analysis_method("pld[cpu]", sid, group, seed, wall),
            )
        ]
        _analysis_run(root, f"pld_s{seed}", records, "pld", seed=seed, curve=CURVE if seed == 0 else None)
    records = [
        r
        for sid, group in samples
        for r in (
            analysis_ar("ar", "baseline", sid, group),
            analysis_method("skip", sid, group, wall_s=0.25, quality=0.5, lossless=None),
        )
    ]
    _analysis_run(root, "skip", records, "skip", lossless=False)
    _analysis_run(root, "ar", [analysis_ar("ar", "method", sid, group, wall_s=0.8) for sid, group in samples], "ar")
    _analysis_run(
        root,
        "pld_nobase",
        [analysis_method("pld[paper]", sid, group, wall_s=0.4) for sid, group in samples],
        "pld",
        baseline="none",
    )
    _analysis_run(
        root,
        "other_machine",
        [analysis_method("pld[gpu]", sid, group) for sid, group in samples],
        "pld",
        cpu="OtherCPU",
        baseline="none",
    )
    return root


# --- end analysis -----------------------------------------------------------------------------
