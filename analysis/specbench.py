"""Spec-Bench interop: export runs as Spec-Bench result files, import Spec-Bench result files.

Spec-Bench's result layout (``evaluation/eval.py`` writes it, ``evaluation/speed.py`` reads it):
one JSON object per question and line::

    {"question_id": 81, "category": "writing", "answer_id": "...", "model_id": "...",
     "choices": [{"index": 0, "turns": [answer per turn], "decoding_steps": [per turn],
                  "new_tokens": [per turn], "wall_time": [seconds per turn],
                  "accept_lengths": [tokens emitted per decoding step, all turns in order]}],
     "tstamp": 1700000000.0}

``speed.py`` computes, per category group, speed = Σ new_tokens / Σ wall_time of each question
(``choices[0]``), speedup = mean question speed / mean baseline question speed, and "#Mean
accepted tokens" = the mean of every ``accept_lengths`` entry. DecodeBench's ``speedup_tps`` and
``mean_accepted_tokens`` (:class:`decodebench.records.Summary`) are those definitions. ``speed.py``
counts the BASELINE's tokens by re-tokenizing its answer text (``len(tokenizer(turn).input_ids)
- 1``: drops the EOS token, and for tokenizers without a BOS token one more), where DecodeBench
counts emitted ids; ``decodebench-report --convention specbench`` does the same recount
(:func:`recount_baseline_tokens`, the catalogue model's tokenizer or ``--tokenizer-path``), so it
prints what ``speed.py`` prints on the export.

Export (:func:`export_specbench`, ``decodebench-report DIR --export-specbench OUT``): per repeat
(run dir) and method, ``OUT/<run>/<model>-<method>.jsonl`` and the AR records it was paired with
as ``OUT/<run>/<model>-<method>.baseline.jsonl``, so ``speed.py --file-path X.jsonl --base-path
X.baseline.jsonl`` compares exactly the pairs the report compares. Questions with a failed turn
or a turn without an AR partner are left out (and counted). ``decoding_steps`` = decode steps
after prefill (= ``len`` of the turn's ``accept_lengths``); ``accept_lengths`` = the record's
``emitted_lengths``.

Import (:func:`import_specbench`, ``decodebench-report [DIR] --import-specbench METHOD BASE``):
a Spec-Bench method file and its baseline file become records (role ``method`` / ``baseline``)
of one pseudo run labelled ``<model_id> [Spec-Bench import]``, model = the baseline's
``model_id``; they go through the same aggregation as DecodeBench's runs and appear in the report
and the paper tables beside them. A question's ``accept_lengths`` are split over its turns by
``decoding_steps`` when those add up, else all given to its first turn (per-question totals,
which every speed metric uses, are the same either way); baseline tokens are ``new_tokens`` as
written (no re-tokenization).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from decodebench.analysis.frame import labelled
from decodebench.records import Record
from decodebench.registry import DecodeBenchError
from decodebench.tasks.spec_bench import GROUP_OF_CATEGORY

PathLike = str | Path
IMPORT_LABEL = " [Spec-Bench import]"


@dataclass
class ExportedFile:
    """One exported method file with its baseline file and what was left out."""

    method: str
    path: Path
    baseline_path: Path
    questions: int
    left_out: int  # questions with a failed or unpaired turn


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


def _question_id(sample_id: str) -> int | str:
    return int(sample_id) if str(sample_id).isdigit() else str(sample_id)


def _int_list(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) or hasattr(value, "tolist") else []


def _emitted(row: dict[str, Any]) -> list[int]:
    """Tokens emitted per decode step (``emitted_lengths``; older records: accepted + 1, the last step
    what is left of new_tokens − 1)."""
    emitted = _int_list(row.get("emitted_lengths"))
    if emitted or pd.isna(row.get("steps")):
        return emitted
    steps = int(row["steps"]) - 1
    emitted = [a + 1 for a in _int_list(row.get("accepted_lengths"))[:steps]] or [1] * steps
    if emitted:
        emitted[-1] = int(row["new_tokens"]) - 1 - sum(emitted[:-1])
    return emitted


def _answer_line(rows: list[dict[str, Any]], model_id: str) -> dict[str, Any]:
    """One question's line: ``rows`` are its turns in order."""
    first = rows[0]
    accepts = [n for row in rows for n in _emitted(row)]
    return {
        "question_id": _question_id(first["sample_id"]),
        "category": first["category"],
        "answer_id": hashlib.sha256(f"{first['run_dir']}::{model_id}::{first['sample_id']}".encode()).hexdigest()[:22],
        "model_id": model_id,
        "choices": [
            {
                "index": 0,
                "turns": [row.get("output_text") or "" for row in rows],
                "decoding_steps": [len(_emitted(row)) for row in rows],
                "new_tokens": [int(row["new_tokens"]) for row in rows],
                "wall_time": [float(row["wall_s"]) for row in rows],
                "accept_lengths": accepts,
            }
        ],
        "tstamp": time.time(),
    }


def export_specbench(frame: pd.DataFrame, out: PathLike) -> list[ExportedFile]:
    """Write every method of the tidy, AR-joined ``frame`` (``analysis.frame.load_frame``) in
    Spec-Bench's result layout (module docstring); returns what was written.

    Raises:
        DecodeBenchError: nothing to export (no method record with an AR partner).
    """
    out = Path(out)
    data = labelled(frame)
    methods = data[(data["role"] != "baseline") & ~data["method"].str.endswith(IMPORT_LABEL)]
    written = []
    for (model, method, _repeat), rows in methods.groupby(["model", "method", "repeat"], sort=False):
        folder = out / _slug(Path(str(rows["run_dir"].iloc[0])).name)
        model_id = f"{model}-{method}"
        method_lines, base_lines, left_out = [], [], 0
        for _, turns in rows.sort_values("turn", kind="stable").groupby("sample_id", sort=False):
            ok = turns["error"].isna().all() and turns["baseline_index"].notna().all()
            if not ok:
                left_out += 1
                continue
            records = turns.to_dict("records")
            base = [frame.loc[int(i)].to_dict() for i in turns["baseline_index"]]
            method_lines.append(_answer_line(records, model_id))
            base_lines.append(_answer_line(base, f"{model}-ar"))
        if not method_lines:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_slug(model_id)}.jsonl"
        baseline_path = folder / f"{_slug(model_id)}.baseline.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in method_lines), encoding="utf-8")
        baseline_path.write_text("".join(json.dumps(line) + "\n" for line in base_lines), encoding="utf-8")
        written.append(ExportedFile(method, path, baseline_path, len(method_lines), left_out))
    if not written:
        raise DecodeBenchError("nothing to export in Spec-Bench's layout: no method record with an AR baseline")
    return written


def speed_py_count(tokenizer: Any, text: str) -> int:
    """Tokens of one answer as ``speed.py`` counts the baseline's: ``len(tokenizer(turn).input_ids) - 1``."""
    return len(tokenizer(text).input_ids) - 1


def tokenizer_for(model: str, tokenizer_path: PathLike | None, cache_dir: PathLike | None = None) -> Any:
    """``tokenizer_path`` (a folder or hub id, like speed.py's ``--tokenizer-path``) when given, else
    the catalogue model's tokenizer.

    Raises:
        DecodeBenchError: no tokenizer_path and ``model`` is not in the catalogue (e.g. imported files).
    """
    if tokenizer_path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_path))
    from decodebench.models.loading import available_models
    from decodebench.tasks.speed_bench import context_tokenizer

    if model not in available_models():
        raise DecodeBenchError(
            f"--convention specbench recounts the baseline's tokens from its answer text as "
            f"Spec-Bench's speed.py does: model '{model}' is not in the catalogue, give "
            "--tokenizer-path (the tokenizer speed.py would use)"
        )
    from decodebench.config import default_cache_dir

    return context_tokenizer(model, cache_dir or default_cache_dir())


def recount_baseline_tokens(frame: pd.DataFrame, tokenizer_path: PathLike | None = None) -> pd.DataFrame:
    """``frame`` with ``ar_counted_tokens``: each row's AR partner's answer recounted as ``speed.py``
    counts the baseline (:func:`speed_py_count`), so ``speedup_tps`` is what speed.py prints."""
    frame = frame.copy()
    tokenizers: dict[str, Any] = {}
    counts = []
    for model, index in zip(frame["model"], frame["baseline_index"]):
        if pd.isna(index):
            counts.append(float("nan"))
            continue
        if model not in tokenizers:
            tokenizers[model] = tokenizer_for(model, tokenizer_path)
        counts.append(float(speed_py_count(tokenizers[model], frame.at[int(index), "output_text"] or "")))
    frame["ar_counted_tokens"] = counts
    return frame


def _read_answers(path: Path) -> list[dict[str, Any]]:
    try:
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise DecodeBenchError(f"cannot read Spec-Bench result file {path}: {error}") from error
    for number, line in enumerate(lines, 1):
        choice = (line.get("choices") or [None])[0]
        if not isinstance(choice, dict) or not {"new_tokens", "wall_time"} <= set(choice) or "question_id" not in line:
            raise DecodeBenchError(
                f"{path}:{number}: not a Spec-Bench answer (needs question_id and choices[0] with "
                "new_tokens and wall_time)"
            )
    if not lines:
        raise DecodeBenchError(f"{path}: no answers")
    return lines


def _turn_accepts(choice: dict[str, Any]) -> list[list[int]]:
    accepts = _int_list(choice.get("accept_lengths"))
    turns = len(choice["new_tokens"])
    steps = _int_list(choice.get("decoding_steps"))
    if len(steps) == turns and sum(steps) == len(accepts):
        bounds = [sum(steps[:i]) for i in range(turns + 1)]
        return [accepts[bounds[i] : bounds[i + 1]] for i in range(turns)]
    return [accepts] + [[] for _ in range(turns - 1)]


def _records(lines: list[dict[str, Any]], role: str, method: str, model: str) -> list[Record]:
    records = []
    for line in lines:
        choice = line["choices"][0]
        category = str(line.get("category"))
        for turn, (tokens, wall, accepts) in enumerate(
            zip(choice["new_tokens"], choice["wall_time"], _turn_accepts(choice))
        ):
            steps = len(accepts) + 1 if accepts else int(tokens)  # AR files carry no accept lengths
            records.append(
                Record(
                    method=method,
                    role=role,
                    task="spec_bench",
                    model=model,
                    sample_id=str(line["question_id"]),
                    category=category,
                    group=GROUP_OF_CATEGORY.get(category, category),
                    turn=turn,
                    seed=0,
                    new_tokens=int(tokens),
                    wall_s=float(wall),
                    steps=steps,
                    emitted_lengths=accepts or None,
                    accepted_lengths=[a - 1 for a in accepts] or None,
                    output_text=(choice.get("turns") or [None] * (turn + 1))[turn],
                )
            )
    return records


def import_specbench(method_file: PathLike, base_file: PathLike, label: str | None = None) -> pd.DataFrame:
    """Records of a Spec-Bench method file and its baseline file, as :func:`report.load_records`
    rows (``run_dir`` = the method file), labelled as imported (module docstring).

    Raises:
        DecodeBenchError: a file is missing or not in Spec-Bench's layout.
    """
    method_lines, base_lines = _read_answers(Path(method_file)), _read_answers(Path(base_file))
    model = str(base_lines[0].get("model_id") or Path(base_file).stem)
    method = (label or str(method_lines[0].get("model_id") or Path(method_file).stem)) + IMPORT_LABEL
    records = _records(base_lines, "baseline", str(base_lines[0].get("model_id") or "baseline"), model)
    records += _records(method_lines, "method", method, model)
    return pd.DataFrame([{**r.to_dict(), "run_dir": str(Path(method_file))} for r in records])
