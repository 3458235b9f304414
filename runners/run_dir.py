"""A run directory on disk: ``config.yaml``, ``manifest.json``, ``records.jsonl``, ``summary.json``.

Records are appended one line at a time and flushed, so a killed run loses at most the record
being written; a torn last line (no newline: the writer died mid-line) is dropped with a warning
when the directory is read back (resume). Anything else that does not read back as a record — a
corrupted line anywhere, a complete last line that does not parse — is an error naming the file
and line: never silently dropped. An append that fails (disk full, file too large) is undone (the
file is cut back to its last complete record) and raised as :class:`RecordsWriteError`.

``manifest.json`` carries ``config_schema``: a run dir written under another schema of the config
is not resumed (:func:`check_schema`).
"""

from __future__ import annotations

import dataclasses
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


# Version of the config layout a run dir's config.yaml / records.jsonl follow; raise it when a change
# makes old run dirs unresumable (renamed or re-meant keys). Run dirs from before it was recorded are 1.
CONFIG_SCHEMA = 1
REQUIRED_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(Record)
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
)


class CorruptRecordsError(DecodeBenchError, json.JSONDecodeError):
    """A ``records.jsonl`` line does not read back as a record (the CLI exits with code 2)."""


class RecordsWriteError(DecodeBenchError, OSError):
    """Appending a record failed (disk full, file too large); the file was cut back to its last
    complete record, so rerunning the same command resumes from there."""

    exit_code = 1


class SchemaMismatchError(DecodeBenchError):
    """The run dir was written under another config schema: its records are not resumed."""


def corrupt(path: Path, number: int, why: str, doc: str = "", pos: int = 0) -> CorruptRecordsError:
    return CorruptRecordsError(
        f"{path}:{number}: {why} (line {number} of {path.name}; records are never "
        "dropped silently: repair or remove the line, or start over with overwrite=true)",
        doc,
        pos,
    )


def numbered_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, JSON object)`` of every record line of a ``records.jsonl`` (none if missing).

    A torn last line — no trailing newline: the writer was killed mid-line — is dropped with a
    warning; any other line that is not a JSON object raises :class:`CorruptRecordsError` naming
    the file and the line.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise corrupt(path, number, f"not UTF-8 ({error.reason} at byte {error.start})") from error
        except json.JSONDecodeError as error:
            raise corrupt(path, number, f"not a JSON record ({error.msg})", error.doc, error.pos) from error
        if not isinstance(row, dict):
            raise corrupt(path, number, f"a JSON {type(row).__name__}, not a record object")
        rows.append((number, row))
    if torn.strip():
        log.warning(
            "%s: dropping torn last line %d (%d bytes, no newline: the writer stopped mid-line)",
            path,
            len(lines) + 1,
            len(torn),
        )
    return rows


def read_record_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a ``records.jsonl`` (:func:`numbered_rows`, without the line numbers)."""
    return [row for _, row in numbered_rows(path)]


def read_records(path: Path) -> list[Record]:
    """Records of a ``records.jsonl``; a torn last line is dropped, a line without a record's
    required fields is an error naming the line (:func:`numbered_rows`)."""
    records = []
    for number, row in numbered_rows(path):
        missing = [name for name in REQUIRED_FIELDS if name not in row]
        if missing:
            raise corrupt(path, number, f"a JSON object without the record fields {', '.join(missing)}")
        records.append(Record.from_dict(row))
    return records


def check_schema(manifest: dict[str, Any] | None, run_dir: Path) -> None:
    """Refuse to resume a run dir whose ``manifest.json`` has another ``config_schema``.

    Raises:
        SchemaMismatchError: with what was found, this version's schema and what to do.
    """
    if manifest is None:
        return
    found = manifest.get("config_schema", 1)
    if found != CONFIG_SCHEMA:
        age = "an older" if isinstance(found, int) and found < CONFIG_SCHEMA else "a newer or unknown"
        raise SchemaMismatchError(
            f"{run_dir} was written by {age} DecodeBench (config schema {found!r}; this version writes "
            f"{CONFIG_SCHEMA}): its records are not resumed or mixed with new ones. Use another run dir "
            f"(hydra.run.dir=...), or overwrite=true to discard them and start over"
        )


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
        try:
            tmp.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records))
        except OSError:
            tmp.unlink(missing_ok=True)  # the records file itself is untouched
            raise
        tmp.replace(self.path / RECORDS)

    def append_record(self, record: Record) -> None:
        """Append one record line and fsync it; on failure cut the file back and raise
        :class:`RecordsWriteError` (no torn or half-written line is left behind)."""
        path = self.path / RECORDS
        line = (json.dumps(record.to_dict()) + "\n").encode("utf-8")
        # unbuffered: no bytes are left in a buffer to be flushed after the file was cut back
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.lseek(descriptor, 0, os.SEEK_END)
            try:
                written = 0
                while written < len(line):
                    written += os.write(descriptor, line[written:])
                os.fsync(descriptor)
            except OSError as error:
                os.ftruncate(descriptor, size)  # shrinking needs no space
                raise RecordsWriteError(
                    error.errno,
                    f"cannot append a record to {path} ({error.strerror}: disk full or file too "
                    f"large?); the file is back at its last complete record ({size} bytes): free space and "
                    "rerun the same command to resume",
                ) from error
        finally:
            os.close(descriptor)

    def clear(self) -> None:
        for name in (RECORDS, SUMMARY):
            (self.path / name).unlink(missing_ok=True)
