"""A run directory on disk: ``config.yaml``, ``manifest.json``, ``records.jsonl``, ``summary.json``.

Records are appended one line at a time and flushed, so a killed run loses at most the record
being written; a torn last line is dropped when the directory is read back (resume).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from decodebench.records import Record
from decodebench.registry import DecodeBenchError

log = logging.getLogger("decodebench")

CONFIG, MANIFEST, RECORDS, SUMMARY = "config.yaml", "manifest.json", "records.jsonl", "summary.json"
LATENCY_CURVE = "latency_curve.json"  # the machine's stored verify-latency curve (decodebench-profile)


class CorruptRecordsError(DecodeBenchError, json.JSONDecodeError):
    """A ``records.jsonl`` line other than the last does not parse (the CLI exits with code 2)."""


def read_record_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``records.jsonl`` (none if it is missing).

    A torn LAST line (writer killed mid-line) is dropped with a warning; an unparseable line
    anywhere else is corruption: :class:`CorruptRecordsError` names the file and line.
    """
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((number for number, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == last:
                log.warning("%s: dropping torn last line %d", path, number + 1)
                break
            raise CorruptRecordsError(f"{path}:{number + 1}: not a JSON record ({error.msg})", error.doc,
                                      error.pos) from error
    return rows


def read_records(path: Path) -> list[Record]:
    """Records of a ``records.jsonl``; a torn last line is dropped (:func:`read_record_rows`)."""
    return [Record.from_dict(row) for row in read_record_rows(path)]


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.path / name)  # atomic: readers never see half a file

    def write_config(self, resolved: dict[str, Any]) -> None:
        tmp = self.path / f".{CONFIG}.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(self.path / CONFIG)  # atomic, like every file a reader may meet half-written

    def read_json(self, name: str) -> Any:
        path = self.path / name
        return json.loads(path.read_text()) if path.exists() else None

    def existing_records(self) -> list[Record]:
        return read_records(self.path / RECORDS)

    def rewrite_records(self, records: list[Record]) -> None:
        """Rewrite records.jsonl without a torn tail before appending to it again."""
        tmp = self.path / f".{RECORDS}.tmp"
        tmp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
        tmp.replace(self.path / RECORDS)

    def append_record(self, record: Record) -> None:
        with open(self.path / RECORDS, "a") as handle:
            handle.write(json.dumps(record.to_dict()) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def clear(self) -> None:
        for name in (RECORDS, SUMMARY):
            (self.path / name).unlink(missing_ok=True)
