"""One folder with every table and figure of a paper, and an ``index.md`` that shows them.

``decodebench-report SWEEP --paper OUT [--curve CURVE]`` (or ``make paper SWEEP=... [OUT=...]``)
writes::

    OUT/index.md                      tables inline, figures embedded, provenance
    OUT/records.parquet               the tidy frame (analysis/frame.py), one row per record
    OUT/aggregate.csv                 mean ± std over repeats per (model, task, method, group)
    OUT/tables/{main,quality,cost}_<task>_<model>.{md,tex,csv}
    OUT/tables/audit.md               lossless audit (analysis/quality.py), when anything was audited
    OUT/figures/<figure>_<task>_<model>.{png,pdf}

One set of tables and figures per (model, task) found in the runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd

from decodebench.analysis import plots, tables
from decodebench.analysis.cost_model import cost_table, curves_for
from decodebench.analysis.frame import aggregate, load_frame, save_parquet
from decodebench.analysis.quality import lossless_audit
from decodebench.analysis.report import render

PathLike = str | Path


@dataclass
class Paper:
    """What :func:`write_paper` wrote (paths inside ``out``)."""

    out: Path
    index: Path
    parquet: Path
    tables: list[Path] = field(default_factory=list)
    figures: list[plots.FigureFile] = field(default_factory=list)


def slug(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def _write_table(table: tables.PaperTable, out: Path, name: str) -> list[Path]:
    paths = []
    for fmt, suffix in (("md", "md"), ("latex", "tex"), ("csv", "csv")):
        path = out / "tables" / f"{name}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tables.render(table, fmt), encoding="utf-8")
        paths.append(path)
    return paths


def _links(paths: list[Path], out: Path) -> str:
    return " · ".join(f"[{p.suffix[1:]}]({p.relative_to(out).as_posix()})" for p in paths)


def _table_section(table: Optional[tables.PaperTable], out: Path, name: str, paper: Paper) -> list[str]:
    if table is None:
        return []
    paths = _write_table(table, out, name)
    paper.tables += paths
    return [f"### {table.title}", "", tables.render_markdown(table), *[f"*{note}*" for note in table.notes], "",
            f"Files: {_links(paths, out)}", ""]


def _figure_section(figure: Optional[plots.FigureFile], out: Path, paper: Paper) -> list[str]:
    if figure is None:
        return []
    paper.figures.append(figure)
    png, pdf = figure.png.relative_to(out).as_posix(), figure.pdf.relative_to(out).as_posix()
    return [f"### {figure.title}", "", f"![{figure.title}]({png})", "", f"*{figure.caption}* ([pdf]({pdf}))", ""]


def _provenance(frame: pd.DataFrame, curves: dict) -> list[str]:
    lines = ["## Provenance", "", "| run dir | method | machine | git | curve |", "|:---|:---|:---|:---|:---|"]
    for run_dir, rows in frame.groupby("run_dir", sort=False):
        manifest_path = Path(run_dir) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        git = manifest.get("git") or {}
        sha = (git.get("sha") or "-")[:10] + (" (dirty)" if git.get("dirty") else "")
        curve = curves.get(run_dir)
        method = rows.loc[rows["role"] == "method", "method"]
        lines.append(f"| {run_dir} | {method.iloc[0] if len(method) else '-'} | {rows['machine'].iloc[0]} | {sha} | "
                     f"{curve.source if curve else '-'} |")
    return lines + [""]


def write_paper(paths: Sequence[PathLike], out: PathLike, curve: Optional[PathLike] = None) -> Paper:
    """Load ``paths`` (run or sweep dirs) and write the paper folder ``out`` (module docstring).

    Args:
        paths: run directories or sweep directories.
        out: the output folder (created; files in it are overwritten).
        curve: verify-latency curve file or folder for the cost model (else each run dir's own).

    Raises:
        DecodeBenchError: no records under ``paths``, or an unreadable curve.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = load_frame(paths)
    paper = Paper(out=out, index=out / "index.md", parquet=save_parquet(frame, out / "records.parquet"))
    agg = aggregate(frame)
    agg.assign(per_position_acceptance=agg["per_position_acceptance"].map(json.dumps)).to_csv(
        out / "aggregate.csv", index=False, float_format="%.6g")
    curves = curves_for(frame, curve)
    cost = cost_table(frame, curves)
    figures = out / "figures"

    runs = frame["run_dir"].nunique()
    lines = ["# DecodeBench paper tables and figures", "",
             f"{runs} run dir(s), {len(frame)} records ({int(frame['error'].notna().sum())} errors) from "
             f"{', '.join(f'`{p}`' for p in paths)}. Tidy records: [records.parquet](records.parquet); "
             "aggregates: [aggregate.csv](aggregate.csv).", ""]
    if not any(curves.values()):
        lines += ["*No verify-latency curve (pass `--curve`, or save `latency_curve.json` in the run dir): the "
                  "cost model's predictions are empty.*", ""]
    for (model, task), _ in agg.groupby(["model", "task"], sort=False):
        name = slug(task, model)
        lines += [f"## {task} — {model}", ""]
        lines += _table_section(tables.main_table(agg, model, task), out, f"main_{name}", paper)
        lines += _table_section(tables.quality_table(agg, model, task), out, f"quality_{name}", paper)
        lines += _table_section(tables.cost_table(cost, model, task), out, f"cost_{name}", paper)
        lines += _figure_section(plots.speedup_by_group(agg, model, task, figures, f"speedup_by_group_{name}"), out,
                                 paper)
        lines += _figure_section(plots.tau_vs_speedup(agg, cost, model, task, figures, f"tau_vs_speedup_{name}"),
                                 out, paper)
        lines += _figure_section(plots.acceptance_curves(agg, model, task, figures, f"acceptance_{name}"), out, paper)
        lines += _figure_section(plots.pareto(agg, model, task, figures, f"pareto_{name}"), out, paper)
        lines += _figure_section(plots.latency_distribution(frame, model, task, figures, f"latency_{name}"), out,
                                 paper)
    audit = lossless_audit(frame)
    if not audit.empty:
        path = out / "tables" / "audit.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(audit, "md"), encoding="utf-8")
        paper.tables.append(path)
        lines += ["## Lossless audit", "", render(audit, "md"), f"Files: {_links([path], out)}", ""]
    lines += _provenance(frame, curves)
    paper.index.write_text("\n".join(lines), encoding="utf-8")
    return paper
