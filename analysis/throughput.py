"""Throughput mode: how a method's speedup changes with the batch size (``gen.batch_size``).

Speculation spends spare compute to save steps; batching spends the same spare compute, so a
method's speedup over AR shrinks as the batch grows and may cross below 1. Every number here is
against AR **at the same batch size** (the in-process baseline decodes the same batches), from the
tidy frame (:func:`decodebench.analysis.frame.load_frame`), one row per (model, task, method, batch):

* ``tokens_per_s`` — Σ new tokens / Σ wall time (in a batch each record holds its share of the
  batch's wall time, so this is the batch's throughput);
* ``speedup`` — Σ AR wall / Σ method wall over the records paired with their AR record;
* ``latency_p50_s`` / ``latency_p95_s`` — per-sequence latency (``Record.sequence_s``: from the
  batch's start until the sequence's last token; a lone sequence's wall time);
* ``batch_rows`` — mean rows of the batch each sequence was decoded in (``Record.batch_size``): below
  ``batch_size`` where the task has fewer prompts than B, in a run's last, smaller batch, and for
  multi-turn samples' later turns (decoded in their own batches);
* ``peak_rss_mb`` — the run's peak RSS (``manifest.json``; on Linux the high-water mark is reset
  when the run starts, :mod:`decodebench.engine.memory`, but a multirun process that ran other cells
  before still holds their heap: ``benchmarks/bench_batch.py`` runs each cell in its own process),
  largest over the cell's runs;
* ``tau`` / ``block`` — tokens per target forward and mean tokens per row in it (root, drafts, aux);
* ``lossless_rate`` — :class:`decodebench.records.Summary`'s: the share of audited records whose output
  equals AR's (empty for the AR rows and lossy methods);
* ``predicted`` (with a T(B, k) surface, :mod:`decodebench.engine.batch_curve`) — the cost model at
  batch size B: ``tau / (T(B, block) / T(B, 1))``, what the speedup would be if drafting, the
  harness and padding to the batch's longest block cost nothing (the C++ decoder layer packs padding out).

:func:`crossover` finds where a method's speedup falls below 1 (interpolated in log2 batch size);
:func:`speedup_vs_batch_figure` plots speedup vs batch size per method with it marked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from decodebench.analysis.frame import labelled
from decodebench.analysis.merge import read_config
from decodebench.analysis.plots import FigureFile, _figure, _legend_outside, _save
from decodebench.records import summarize_frame

KEYS = ["model", "task", "method", "batch_size"]
COLUMNS = [
    *KEYS,
    "batch_rows",
    "tokens_per_s",
    "speedup",
    "latency_p50_s",
    "latency_p95_s",
    "peak_rss_mb",
    "tau",
    "block",
    "lossless_rate",
    "records",
]
MB = 1024 * 1024


def _run_batch_size(run_dir: str) -> int:
    return int(((read_config(Path(run_dir)).get("gen") or {}).get("batch_size")) or 1)


def _peak_rss_mb(run_dir: str) -> float:
    path = Path(run_dir) / "manifest.json"
    memory = (json.loads(path.read_text()).get("memory") or {}) if path.exists() else {}
    peak = memory.get("peak_rss_bytes")
    return math.nan if peak is None else peak / MB


def throughput_table(frame: pd.DataFrame, surface: dict | None = None) -> pd.DataFrame:
    """One row per (model, task, method, batch size) of the tidy frame (see the module docstring);
    the configured ``gen.batch_size`` of each run dir is the batch size (a last, smaller batch of a
    run counts under it). With a T(B, k) ``surface`` a ``predicted`` column is added."""
    rows = labelled(frame)
    if "error" in rows.columns:
        rows = rows[rows["error"].isna()]
    runs = list(dict.fromkeys(rows["run_dir"]))
    batch = {run: _run_batch_size(run) for run in runs}
    rss = {run: _peak_rss_mb(run) for run in runs}
    actual = rows["batch_size"].fillna(1) if "batch_size" in rows else pd.Series(1.0, index=rows.index)
    rows = rows.assign(batch_rows=actual, batch_size=rows["run_dir"].map(batch))
    out = []
    for key, cell in rows.groupby(KEYS, sort=True):
        paired = cell[cell["ar_wall_s"].notna()]
        latency = cell["sequence_s"].fillna(cell["wall_s"]) if "sequence_s" in cell else cell["wall_s"]
        out.append(
            {
                **dict(zip(KEYS, key)),
                "batch_rows": float(cell["batch_rows"].mean()),
                "tokens_per_s": cell["new_tokens"].sum() / cell["wall_s"].sum(),
                "speedup": paired["ar_wall_s"].sum() / paired["wall_s"].sum() if len(paired) else math.nan,
                "latency_p50_s": float(np.percentile(latency, 50)),
                "latency_p95_s": float(np.percentile(latency, 95)),
                "peak_rss_mb": max((rss[r] for r in dict.fromkeys(cell["run_dir"])), default=math.nan),
                "tau": cell["new_tokens"].sum() / cell["steps"].sum(),
                "block": float(np.mean([t for sizes in cell["tree_sizes"].dropna() for t in sizes] or [1.0])),
                "lossless_rate": summarize_frame(cell)["lossless_rate"],
                "records": len(cell),
            }
        )
    table = pd.DataFrame(out, columns=COLUMNS)
    if surface is not None:
        from decodebench.engine.batch_curve import cost_ratio

        table["predicted"] = [
            row.tau / cost_ratio(surface, int(row.batch_size), max(1.0, row.block)) for row in table.itertuples()
        ]
    return table


def crossover(batch_sizes: list[int], speedups: list[float]) -> float | None:
    """The batch size where the speedup first falls from >= 1 to < 1, interpolated linearly in
    log2(batch size); None when it never does (always faster, or never faster)."""
    points = sorted((b, s) for b, s in zip(batch_sizes, speedups) if not math.isnan(s))
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if s0 >= 1.0 > s1:
            x0, x1 = math.log2(b0), math.log2(b1)
            return 2 ** (x0 + (s0 - 1.0) / (s0 - s1) * (x1 - x0))
    return None


def speedup_vs_batch_figure(table: pd.DataFrame, out_dir: Path, name: str = "speedup_vs_batch") -> FigureFile | None:
    """Speedup vs AR at the same batch size, per method (baseline rows left out), log2 batch axis,
    the break-even line at 1 and each method's crossover marked; None without method rows."""
    methods = table[~table["method"].str.endswith(" (baseline)")]
    if methods.empty:
        return None
    fig, ax = _figure()
    ax.axhline(1.0, color="0.4", linewidth=0.8, linestyle="--", label="AR (same batch size)")
    notes = []
    for method, rows in methods.groupby("method", sort=True):
        rows = rows.sort_values("batch_size")
        (line,) = ax.plot(rows["batch_size"], rows["speedup"], marker="o", label=method)
        point = crossover(rows["batch_size"].tolist(), rows["speedup"].tolist())
        if point is not None:
            ax.plot([point], [1.0], marker="x", markersize=10, color=line.get_color())
            ax.annotate(f"B≈{point:.1f}", (point, 1.0), textcoords="offset points", xytext=(4, 6), fontsize="small")
            notes.append(f"{method} at B≈{point:.1f}")
    ax.set_xscale("log", base=2)
    batch_sizes = sorted(methods["batch_size"].unique())
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size (gen.batch_size)")
    ax.set_ylabel("speedup vs AR at the same batch size (×)")
    _legend_outside(ax)
    caption = "Crossover (speedup falls below 1): " + ("; ".join(notes) if notes else "none in this range") + "."
    return _save(fig, out_dir, name, "Speedup vs batch size", caption)
