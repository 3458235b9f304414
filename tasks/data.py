"""Find a task's data file and read its JSON-lines rows.

Lookup order: the config's ``data_dir``, the ``DECODEBENCH_DATA`` environment variable, then
``<cache_dir>/data/``. A file found nowhere is downloaded from the task's URL (when one is
configured) into ``<cache_dir>/data/<relative_path>``; otherwise one error message lists every
place looked and how to provide the file.

Rows are read with ``datasets.load_dataset("json", ...)``, except for files whose columns mix
value types (see :func:`load_jsonl_records`).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional, Union

from decodebench.registry import DecodeBenchError

DATA_ENV_VAR = "DECODEBENCH_DATA"
DOWNLOAD_TIMEOUT_S = 60

PathLike = str | Path


class DataFileNotFoundError(DecodeBenchError, FileNotFoundError):
    pass


def candidate_paths(relative_path: str, data_dir: Optional[PathLike],
                    cache_dir: PathLike) -> list[tuple[str, Optional[Path]]]:
    """Return ``(source, path)`` for every place searched, in order; path is None when unset."""
    env_dir = os.environ.get(DATA_ENV_VAR)
    return [
        ("data_dir", Path(data_dir) / relative_path if data_dir else None),
        (DATA_ENV_VAR, Path(env_dir) / relative_path if env_dir else None),
        ("cache", Path(cache_dir) / "data" / relative_path),
    ]


def resolve_data_file(relative_path: str, data_dir: Optional[PathLike], cache_dir: PathLike,
                      url: Optional[str] = None) -> Path:
    """Locate ``relative_path`` (or an absolute path), downloading it from ``url`` if needed.

    Args:
        relative_path: path of the file below a data folder, e.g. ``spec_bench/question.jsonl``;
            an absolute path is used as is.
        data_dir: the config's ``data_dir`` (searched first), or None.
        cache_dir: the DecodeBench cache; downloads land in ``<cache_dir>/data/``.
        url: where the file can be fetched from (online users), or None.

    Returns:
        The path of an existing file.

    Raises:
        DataFileNotFoundError: the file is nowhere and could not be downloaded.
    """
    if Path(relative_path).is_absolute():
        if Path(relative_path).is_file():
            return Path(relative_path)
        raise DataFileNotFoundError(f"data file not found: {relative_path}")
    places = candidate_paths(relative_path, data_dir, cache_dir)
    for _, path in places:
        if path is not None and path.is_file():
            return path
    download_problem = None
    if url:
        target = Path(cache_dir) / "data" / relative_path
        try:
            return download(url, target)
        except (urllib.error.URLError, OSError) as error:
            download_problem = f"downloading {url} failed: {error}"
    looked = "; ".join(f"{path} ({source})" if path else f"{source} not set" for source, path in places)
    how = (f"set data_dir=DIR or the environment variable {DATA_ENV_VAR}=DIR to a folder that "
           f"holds {relative_path}")
    how += f", or download {url} to {places[-1][1]}" if url else ", or set task.url to a download URL"
    message = f"data file '{relative_path}' not found. Looked in: {looked}. To fix: {how}."
    raise DataFileNotFoundError(f"{message} ({download_problem})" if download_problem else message)


def download(url: str, target: Path) -> Path:
    """Fetch ``url`` into ``target`` atomically (a partial download never looks complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
        shutil.copyfileobj(response, out)
    partial.replace(target)
    return target


def load_jsonl_records(path: PathLike, cache_dir: PathLike) -> list[dict[str, Any]]:
    """Read a ``.jsonl`` or ``.jsonl.gz`` file into a list of row dicts, in file order.

    Reading goes through ``datasets`` (cached under ``<cache_dir>/datasets``). Rows lacking a key
    get None for it. When a column mixes value types (Spec-Bench's ``reference`` holds strings for
    some rows and lists of strings for RAG rows), datasets 5.x stores it with its ``Json`` feature,
    whose round trip is lossy: a string that parses as JSON (``"12000"``) comes back as a number.
    Such files are re-read with the ``json`` module so values keep their types.
    """
    import datasets

    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train",
                                        cache_dir=str(Path(cache_dir) / "datasets"))
    # datasets 5.x fails on a bad line with DatasetGenerationError, on an empty file with a bare
    # StopIteration and on a blank one with ValueError ("corresponds to no data").
    except (datasets.exceptions.DatasetsError, StopIteration, ValueError) as error:
        reason = "no rows" if isinstance(error, StopIteration) else error.__cause__ or error
        raise DecodeBenchError(f"cannot read JSON lines from {path}: {reason}") from error
    if not _has_json_feature(dataset.features.to_dict()):
        return dataset.to_list()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        rows = [json.loads(line) for line in lines if line.strip()]
    return [{column: row.get(column) for column in dataset.column_names} for row in rows]


def _has_json_feature(feature: Any) -> bool:
    """True if a serialised ``datasets.Features`` tree contains a ``Json`` (mixed-type) feature."""
    if isinstance(feature, dict):
        return feature.get("_type") == "Json" or any(_has_json_feature(v) for v in feature.values())
    if isinstance(feature, list):
        return any(_has_json_feature(v) for v in feature)
    return False
