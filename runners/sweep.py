"""Sweep bookkeeping: a status file per cell, and the sweep's verdict once every cell returned.

Each cell of a multirun (one run directory) keeps ``status.json``: ``running`` from the moment it
starts, then ``complete`` or ``failed`` with the error. A cell killed outright (OOM killer, node
failure, ``scancel``) stays ``running``: the verdict calls it unfinished. Cells never stop the
sweep: a failed cell is recorded and the other cells go on, whatever the launcher (in-process,
``local_pool``, SLURM array).

:class:`SweepStatus` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``). In the
submitting process it gives the sweep an id (``$DECODEBENCH_SWEEP_ID``, inherited by every cell,
SLURM tasks included) so that cells left in the folder by an earlier sweep are not counted; after
the last cell it writes ``sweep.json``, logs every failed or unfinished cell and prints the
merged report of the complete ones. ``decodebench`` then exits with code 1 if a cell failed
(:func:`last_outcome`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from decodebench.runners.manifest import utc_now

log = logging.getLogger("decodebench")

STATUS_FILE = "status.json"
SWEEP_FILE = "sweep.json"
SWEEP_ID_ENV = "DECODEBENCH_SWEEP_ID"


@dataclass
class CellStatus:
    """One cell of a sweep, as its ``status.json`` says."""

    cell: str  # run directory relative to the sweep directory
    status: str  # running | complete | failed
    overrides: list[str] = field(default_factory=list)
    error: str | None = None  # "Type: message" of a failed cell
    host: str | None = None
    started: str | None = None
    finished: str | None = None
    sweep_id: str | None = None


def mark_cell(run_dir: Path, status: str, overrides: list[str], error: BaseException | None = None) -> None:
    """Write ``status.json`` of a cell (atomically; ``started`` is kept across updates)."""
    path = Path(run_dir) / STATUS_FILE
    previous = json.loads(path.read_text()) if path.exists() else {}
    started = previous.get("started") if status != "running" else utc_now()
    entry = CellStatus(
        cell=Path(run_dir).name,
        status=status,
        overrides=list(overrides),
        host=socket.gethostname(),
        started=started,
        finished=None if status == "running" else utc_now(),
        sweep_id=os.environ.get(SWEEP_ID_ENV),
        error=f"{type(error).__name__}: {error}" if error is not None else None,
    )
    data = asdict(entry)
    if error is not None:
        data["traceback"] = "".join(traceback.format_exception(error))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def read_cells(sweep_dir: Path, sweep_id: str | None = None) -> list[CellStatus]:
    """Cells below ``sweep_dir`` (those of sweep ``sweep_id`` when given), sorted by folder."""
    cells = []
    for path in sorted(Path(sweep_dir).rglob(STATUS_FILE)):
        data = json.loads(path.read_text())
        if sweep_id is not None and data.get("sweep_id") != sweep_id:
            continue
        data["cell"] = str(path.parent.relative_to(sweep_dir))
        cells.append(CellStatus(**{k: v for k, v in data.items() if k in CellStatus.__dataclass_fields__}))
    return cells


@dataclass
class SweepOutcome:
    sweep_dir: Path
    cells: list[CellStatus]

    def with_status(self, status: str) -> list[CellStatus]:
        return [c for c in self.cells if c.status == status]

    @property
    def ok(self) -> bool:
        """Every cell complete (a sweep whose cells never started is not ok)."""
        return bool(self.cells) and all(c.status == "complete" for c in self.cells)

    def describe(self) -> str:
        """One line for the sweep, one per failed or unfinished cell."""
        failed, running = self.with_status("failed"), self.with_status("running")
        lines = [
            f"sweep {self.sweep_dir}: {len(self.with_status('complete'))} of {len(self.cells)} cells complete"
            + (f", {len(failed)} failed" if failed else "")
            + (f", {len(running)} unfinished" if running else "")
        ]
        lines += [f"  FAILED {c.cell} [{' '.join(c.overrides)}] on {c.host}: {c.error}" for c in failed]
        lines += [
            f"  UNFINISHED {c.cell} [{' '.join(c.overrides)}] (killed? started {c.started} on {c.host})"
            for c in running
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sweep_dir": str(self.sweep_dir),
            "ok": self.ok,
            "finished": utc_now(),
            "counts": {s: len(self.with_status(s)) for s in ("complete", "failed", "running")},
            "cells": [asdict(c) for c in self.cells],
        }


_last_outcome: SweepOutcome | None = None


def last_outcome() -> SweepOutcome | None:
    """The verdict of the last sweep that finished in this process (None: no sweep ran)."""
    return _last_outcome


def merged_report(sweep_dir: Path, cells: list[CellStatus]) -> str | None:
    """Markdown report of the complete cells (shards merged); None when no cell has records."""
    from decodebench.analysis.merge import shard_problems
    from decodebench.analysis.report import load_records, render, report_table

    run_dirs = [
        Path(sweep_dir) / c.cell
        for c in cells
        if c.status == "complete" and (Path(sweep_dir) / c.cell / "records.jsonl").exists()
    ]
    if not run_dirs:
        return None
    for problem in shard_problems(run_dirs):
        log.warning("%s", problem)
    return render(report_table(load_records(run_dirs)), "md")


class SweepStatus(Callback):
    """Hydra callback: sweep id at the start, ``sweep.json`` + verdict + merged report at the end."""

    def __init__(self, print_report: bool = True) -> None:
        self.print_report = print_report
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex[:12]
        os.environ[SWEEP_ID_ENV] = self.sweep_id  # every cell process inherits it

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _last_outcome
        sweep_dir = Path(str(config.hydra.sweep.dir))
        outcome = SweepOutcome(sweep_dir, read_cells(sweep_dir, self.sweep_id))
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(outcome.to_dict(), indent=2) + "\n")
        _last_outcome = outcome
        if self.print_report:
            report = merged_report(sweep_dir, outcome.cells)
            if report:
                print(report)
        (log.info if outcome.ok else log.warning)("%s", outcome.describe())
