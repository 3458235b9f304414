"""A run directory on disk: ``config.yaml``, ``manifest.json``, ``records.jsonl``, ``summary.json``.

Records are appended one line at a time and flushed, so a killed run loses at most the record
being written; a torn last line is dropped when the directory is read back (resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from decodebench.records import Record

CONFIG, MANIFEST, RECORDS, SUMMARY = "config.yaml", "manifest.json", "records.jsonl", "summary.json"


def read_records(path: Path) -> list[Record]:
    """Records of a ``records.jsonl``; a torn (unparseable) last line is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(Record.from_dict(json.loads(line)))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break  # torn by a kill mid-write
            raise
    return records


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_json(self, name: str, data: Any) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        tmp.replace(self.path / name)  # atomic: readers never see half a file

    def write_config(self, resolved: dict[str, Any]) -> None:
        (self.path / CONFIG).write_text(yaml.safe_dump(resolved, sort_keys=False))

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
