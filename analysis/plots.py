"""Paper figures (PNG + PDF) from the aggregate frame, the tidy frame and the cost table.

matplotlib's object API (``Figure``, no pyplot): nothing global is touched and no display is
needed (the Agg canvas renders PNG, the PDF backend PDF). Defaults aim at a paper column: axis
labels with units, a light grid, the legend outside the data area, 200 dpi PNG.

Each plotting function returns the :class:`FigureFile` it wrote, or None when the data has
nothing to show (e.g. no per-position acceptance for AR-only runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from decodebench.analysis.frame import QUALITY_PREFIX, quality_metrics
from decodebench.analysis.report import BASELINE_SUFFIX, OVERALL
from decodebench.analysis.tables import GROUP_NAMES, is_reference

DPI = 200
WIDTH = 6.4  # inches; the legend goes to the right of this


@dataclass
class FigureFile:
    name: str  # file stem, e.g. "speedup_by_group_spec_bench_smollm2-135m"
    title: str
    caption: str
    png: Path
    pdf: Path


def _save(fig: Figure, out_dir: Path, name: str, title: str, caption: str) -> FigureFile:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    fig.savefig(png, dpi=DPI, bbox_inches="tight")
    fig.savefig(pdf, bbox_inches="tight")
    return FigureFile(name, title, caption, png, pdf)


def _figure(height: float = 3.6) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(WIDTH, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.set_axisbelow(True)
    return fig, ax


def _legend_outside(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize="small", **kwargs)


def _rows(agg: pd.DataFrame, model: str, task: str) -> pd.DataFrame:
    return agg[(agg["model"] == model) & (agg["task"] == task)]


def _methods(rows: pd.DataFrame, with_baseline: bool = False) -> list[str]:
    methods = list(dict.fromkeys(rows["method"]))
    return methods if with_baseline else [m for m in methods if not is_reference(m)]


def speedup_by_group(agg: pd.DataFrame, model: str, task: str, out_dir: Path, name: str) -> Optional[FigureFile]:
    """Grouped bars: one group of bars per category group (+ overall), one bar per method, ± std."""
    rows = _rows(agg, model, task)
    methods = _methods(rows)
    groups = [g for g in dict.fromkeys(rows["group"]) if g != OVERALL] + [OVERALL]
    if len(groups) == 2:
        groups = [OVERALL]
    if not methods or rows["speedup"].isna().all():
        return None
    fig, ax = _figure()
    width = 0.8 / len(methods)
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        by_group = rows[rows["method"] == method].set_index("group")
        values = [by_group["speedup"].get(g, math.nan) for g in groups]
        errors = [by_group["speedup_std"].get(g, math.nan) for g in groups]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, yerr=np.nan_to_num(errors), label=method,
               capsize=2, error_kw={"linewidth": 0.8})
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="AR (1.00×)")
    ax.set_xticks(x, [GROUP_NAMES.get(g, g) for g in groups], rotation=20 if len(groups) > 4 else 0)
    ax.set_ylabel("Speedup over AR (×, wall time)")
    ax.set_title(f"Speedup per category group — {task}, {model}", fontsize="medium")
    _legend_outside(ax)
    return _save(fig, out_dir, name, "Speedup per category group",
                 "Σ AR wall time / Σ method wall time per category group; error bars: std over repeats.")


def tau_vs_speedup(agg: pd.DataFrame, cost: Optional[pd.DataFrame], model: str, task: str, out_dir: Path,
                   name: str) -> Optional[FigureFile]:
    """Measured (τ, speedup) per method, the cost model's prediction, and iso-cost lines.

    A method whose every step costs ``c`` AR steps (verify ratio + draft share) lies on the line
    speedup = τ / c; the cost model's predicted point (hollow) is joined to the measured one.
    """
    rows = _rows(agg, model, task)
    rows = rows[(rows["group"] == OVERALL) & ~rows["method"].map(is_reference).astype(bool)]
    rows = rows[rows["tau"].notna() & rows["speedup"].notna()]
    if rows.empty:
        return None
    fig, ax = _figure()
    top = max(2.0, float(rows["tau"].max()) * 1.1)
    taus = np.linspace(1.0, top, 50)
    for c in (1.0, 1.5, 2.0, 3.0, 4.0):
        ax.plot(taus, taus / c, color="grey", linewidth=0.7, linestyle=":")
        ax.annotate(f"c={c:g}", (top, top / c), fontsize="x-small", color="grey", ha="right", va="bottom")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    predicted = {}
    if cost is not None and not cost.empty:
        chosen = cost[(cost["model"] == model) & (cost["task"] == task) & (cost["group"] == OVERALL)]
        predicted = chosen.set_index("method")["predicted_speedup"].dropna().to_dict()
    colors = iter(f"C{i}" for i in range(100))
    for row in rows.to_dict("records"):
        color = next(colors)
        ax.errorbar(row["tau"], row["speedup"], xerr=np.nan_to_num(row.get("tau_std", math.nan)),
                    yerr=np.nan_to_num(row.get("speedup_std", math.nan)), fmt="o", color=color, label=row["method"],
                    capsize=2)
        if row["method"] in predicted:
            ax.plot([row["tau"]] * 2, [row["speedup"], predicted[row["method"]]], color=color, linewidth=0.8)
            ax.plot(row["tau"], predicted[row["method"]], "o", markerfacecolor="none", color=color)
    if predicted:
        ax.plot([], [], "o", markerfacecolor="none", color="black", label="cost model")
    ax.plot([], [], ":", color="grey", label="speedup = τ / c")
    ax.set_xlabel("τ (tokens per target forward)")
    ax.set_ylabel("Speedup over AR (×)")
    ax.set_title(f"τ vs speedup — {task}, {model}", fontsize="medium")
    _legend_outside(ax)
    return _save(fig, out_dir, name, "τ vs speedup with the cost model",
                 "Filled: measured; hollow: cost-model prediction (decode phase) from the verify-latency curve; "
                 "dotted: a step costing c AR steps gives speedup τ/c.")


def acceptance_curves(agg: pd.DataFrame, model: str, task: str, out_dir: Path, name: str) -> Optional[FigureFile]:
    """P(draft token i accepted | drafted beyond i) per method (pooled over all records)."""
    rows = _rows(agg, model, task)
    rows = rows[(rows["group"] == OVERALL) & ~rows["method"].map(is_reference).astype(bool)]
    curves = {r["method"]: r["per_position_acceptance"] for r in rows.to_dict("records")
              if isinstance(r["per_position_acceptance"], (list, np.ndarray)) and len(r["per_position_acceptance"])}
    if not curves:
        return None
    fig, ax = _figure()
    for method, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", markersize=3, label=method)
    ax.set_xlabel("Draft position")
    ax.set_ylabel("Acceptance probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Per-position acceptance — {task}, {model}", fontsize="medium")
    _legend_outside(ax)
    return _save(fig, out_dir, name, "Per-position acceptance",
                 "P(draft token i accepted | a draft longer than i was proposed), pooled over records.")


def pareto(agg: pd.DataFrame, model: str, task: str, out_dir: Path, name: str,
           metric: Optional[str] = None) -> Optional[FigureFile]:
    """Speed vs quality: lossy methods filled, lossless hollow (reference), and the Pareto front."""
    rows = _rows(agg, model, task)
    rows = rows[rows["group"] == OVERALL]
    metrics = [m for m in quality_metrics(rows) if rows[QUALITY_PREFIX + m].notna().any()]
    metric = metric if metric in metrics else (metrics[0] if metrics else None)
    if metric is None or rows["speedup"].isna().all():
        return None
    column = QUALITY_PREFIX + metric
    points = rows[rows[column].notna() & rows["speedup"].notna()]
    lossy = points["lossless_method"].astype("boolean").fillna(False) == False  # noqa: E712
    fig, ax = _figure()
    for row, is_lossy, color in zip(points.to_dict("records"), lossy, (f"C{i}" for i in range(100))):
        ax.plot(row["speedup"], row[column], "o", color=color, markerfacecolor=color if is_lossy else "none",
                label=row["method"] + ("" if is_lossy else " (lossless)"))
    front = points.sort_values("speedup", ascending=False)
    best, kept = -math.inf, []
    for row in front.to_dict("records"):
        if row[column] > best:
            best = row[column]
            kept.append((row["speedup"], row[column]))
    if len(kept) > 1:
        xs, ys = zip(*sorted(kept))
        ax.step(xs, ys, where="post", color="black", linewidth=0.8, linestyle="--", label="Pareto front")
    ax.set_xlabel("Speedup over AR (×)")
    ax.set_ylabel(metric)
    ax.set_title(f"Speed vs quality ({metric}) — {task}, {model}", fontsize="medium")
    _legend_outside(ax)
    caption = "Filled: lossy methods; hollow: lossless methods (reference)." if lossy.any() else \
        "No lossy method in these runs: every point is a lossless method (quality differs only by sampling)."
    return _save(fig, out_dir, name, f"Speed-quality trade-off ({metric})", caption)


def latency_distribution(frame: pd.DataFrame, model: str, task: str, out_dir: Path,
                         name: str) -> Optional[FigureFile]:
    """Per-token decode latency per record (ms/token, prefill excluded), one box per method."""
    rows = frame[(frame["model"] == model) & (frame["task"] == task) & frame["error"].isna()
                 & (frame["new_tokens"] > 1)]
    if rows.empty:
        return None
    rows = rows.assign(label=np.where(rows["role"] == "baseline", rows["method"] + BASELINE_SUFFIX, rows["method"]),
                       ms=1e3 * (rows["wall_s"] - rows["prefill_s"].fillna(0.0)) / (rows["new_tokens"] - 1))
    labels = list(dict.fromkeys(rows.sort_values("role", key=lambda r: r != "baseline", kind="stable")["label"]))
    data = [rows.loc[rows["label"] == label, "ms"].to_numpy() for label in labels]
    fig, ax = _figure(height=0.45 * len(labels) + 1.4)
    ax.boxplot(data, orientation="horizontal", tick_labels=labels, showfliers=True, flierprops={"markersize": 2})
    ax.invert_yaxis()
    ax.set_xlabel("Decode latency per token (ms/token, prefill excluded)")
    ax.set_title(f"Per-token latency — {task}, {model}", fontsize="medium")
    return _save(fig, out_dir, name, "Per-token latency distribution",
                 "One value per record: (wall − prefill) / (new tokens − 1); box: quartiles, whiskers: 1.5 IQR.")
