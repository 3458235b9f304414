"""Report tables from run directories: records.jsonl → DataFrame → speedup / τ / α table.

Rows are keyed by (model, task, method label, category group), pooled over every run directory
given (a sweep holds one method per run dir, each with its own same-process AR baseline). Every
number comes from :func:`decodebench.records.summarize`; a method's records are paired with the
baseline records of the SAME run directory (and group), so speedups never mix machines or
processes. Runs of one method label that differ in other parameters are pooled: report such
runs with separate invocations.

The baseline appears as ``"<method> (baseline)"`` rows (speedup 1.00, τ 1.00, its tokens/s).

Sweeps: the shards of one configuration (``shard=i/n``) pool into one row per group; incomplete or
overlapping shard families are reported on stderr. Runs with ``baseline=shared`` are paired with
the AR run of the same ``baseline_key`` and node type (:mod:`decodebench.analysis.merge`).

Quality and the lossless audit (:mod:`decodebench.analysis.quality`) follow the speed table in md
and LaTeX output (``--table`` picks one); a lossless method whose float32 greedy output differs from
AR is reported on stderr as a LOSSLESS VIOLATION.

CLI::

    decodebench-report results/sweep [more dirs] [--format md|latex|csv] [--layout long|wide]
                       [--table speed|quality|audit|stats|cost|all] [--curve CURVE]
    decodebench-report results/sweep --paper paper/ [--curve CURVE]   # every table and figure + index.md

``--table stats`` (part of ``all`` when records carry ``method_stats``) lists each method's own
counters, averaged per generation: the exit layers DEL chose, SkipDecode's layer fraction,
FFN-SkipLLM's skipped share, SWIFT's skip set size.

``--table cost`` (part of ``all`` when a verify-latency curve is found: ``--curve``, or
``latency_curve.json`` in a run dir) puts the cost model's predicted speedup next to the measured
one, with the draft / verify / overhead split (:mod:`decodebench.analysis.cost_model`). ``--paper``
writes the paper folder (:mod:`decodebench.analysis.paper`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import pandas as pd

from decodebench.analysis.merge import attach_shared_baselines, shard_problems
from decodebench.analysis.quality import quality_sections, render_section
from decodebench.records import Record, summarize
from decodebench.registry import DecodeBenchError
from decodebench.runners.run_dir import RECORDS as RECORDS_FILE, read_record_rows

log = logging.getLogger(__name__)

OVERALL = "overall"
BASELINE_SUFFIX = " (baseline)"
KEYS = ["model", "task", "method", "group"]
# token_match_rate / first_divergence: agreement of lossy methods with AR under greedy decoding
# (decodebench.records defines both); the columns are left out when no record has them
AGREEMENT = ["token_match_rate", "first_divergence"]
METRICS = ["speedup", "speedup_tps", "tau", "alpha", "tokens_per_s", "lossless_rate", *AGREEMENT]
COUNTS = ["records", "errors"]
WIDE_METRICS = ["speedup", "tau"]  # Spec-Bench's main table: speedup and τ per group
FORMATS = ("md", "latex", "csv")
TABLES = ("speed", "quality", "audit", "stats", "cost", "all")
STATS_TITLE = "Method statistics (Drafter.request_stats, mean per generation)"
LAYOUTS = ("long", "wide")


def find_run_dirs(path: Union[str, Path]) -> list[Path]:
    """Run directories (folders holding ``records.jsonl``) at or below ``path``, sorted.

    Raises:
        DecodeBenchError: ``path`` holds no records.jsonl at any depth.
    """
    run_dirs = sorted({records.parent for records in Path(path).rglob(RECORDS_FILE)})
    if not run_dirs:
        raise DecodeBenchError(f"no {RECORDS_FILE} found in '{path}' (expected a run directory or a "
                               "sweep directory containing run directories)")
    return run_dirs


def load_records(run_dirs: Sequence[Union[str, Path]]) -> pd.DataFrame:
    """One row per record of every run dir (the :class:`Record` fields plus ``run_dir``).

    Raises:
        DecodeBenchError: no records at all.
    """
    rows = [{**row, "run_dir": str(run_dir)}
            for run_dir in run_dirs for row in read_record_rows(Path(run_dir) / RECORDS_FILE)]
    if not rows:
        raise DecodeBenchError(f"no records in {', '.join(map(str, run_dirs))}")
    return attach_shared_baselines(pd.DataFrame(rows))


def _records_of(frame: pd.DataFrame) -> list[Record]:
    """Rebuild Records from DataFrame rows; pairing keys are made unique per run dir.

    pandas turns missing numbers into NaN; they go back to None so ``summarize`` sees null
    metrics. ``sample_id`` gets the run dir as prefix because ``summarize`` pairs a method's
    records with baseline records by (sample_id, turn), which must stay within one run.
    """
    records = []
    for row in frame.to_dict("records"):
        clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
        record = Record.from_dict(clean)
        records.append(dataclasses.replace(record, sample_id=f"{row['run_dir']}::{record.sample_id}"))
    return records


def report_table(records: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (model, task, method, group) plus an ``overall`` group per method.

    Columns: model, task, method, group, speedup (Σ AR wall / Σ method wall), speedup_tps
    (Spec-Bench's ratio of mean tokens/s), tau, alpha, tokens_per_s, lossless_rate, records,
    errors. Baseline rows come first within each (model, task); groups keep data order.
    """
    groups = list(dict.fromkeys(records["group"]))
    rows = []
    for (model, task), frame in records.groupby(["model", "task"], sort=False):
        baseline = frame[frame["role"] == "baseline"]
        if "baseline_source" in frame.columns:  # a shared baseline counts once in its own rows
            own = baseline.assign(run_dir=baseline["baseline_source"].fillna(baseline["run_dir"]))
            baseline_rows = own.drop_duplicates(subset=["run_dir", "sample_id", "turn"])
        else:
            baseline_rows = baseline
        methods = frame[frame["role"] != "baseline"]
        for label, method_frame, is_baseline in (
            *((f"{m}{BASELINE_SUFFIX}", f, True) for m, f in baseline_rows.groupby("method", sort=False)),
            *((m, f, False) for m, f in methods.groupby("method", sort=False)),
        ):
            for group in [*groups, OVERALL]:
                in_group = method_frame if group == OVERALL else method_frame[method_frame["group"] == group]
                if in_group.empty:
                    continue
                base_group = baseline if group == OVERALL else baseline[baseline["group"] == group]
                reference = in_group if is_baseline else base_group
                summary = summarize(_records_of(in_group), _records_of(reference) or None)
                rows.append({"model": model, "task": task, "method": label, "group": group,
                             **{name: getattr(summary, name) for name in METRICS + COUNTS}})
    table = pd.DataFrame(rows, columns=KEYS + METRICS + COUNTS)
    return table.drop(columns=[c for c in AGREEMENT if table[c].isna().all()]).astype(
        {c: float for c in AGREEMENT if c in table and not table[c].isna().all()})


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spec-Bench layout: one row per (model, task, method); a (speedup, tau) block per group."""
    wide = table.pivot(index=["model", "task", "method"], columns="group", values=WIDE_METRICS)
    wide = wide.swaplevel(axis=1)
    groups = list(dict.fromkeys(table["group"]))
    wide = wide.reindex(columns=[(g, m) for g in groups for m in WIDE_METRICS])
    order = list(dict.fromkeys(zip(table["model"], table["task"], table["method"])))
    return wide.reindex(order).reset_index()


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return table[(name, "")] if isinstance(table.columns, pd.MultiIndex) else table[name]


def best_speedup_mask(table: pd.DataFrame) -> pd.DataFrame:
    """True where a speedup is the best of the non-baseline methods in its (model, task, group)."""
    mask = pd.DataFrame(False, index=table.index, columns=table.columns)
    candidate = ~_column(table, "method").str.endswith(BASELINE_SUFFIX)
    keys = [_column(table, "model"), _column(table, "task")]
    if isinstance(table.columns, pd.MultiIndex):
        speedup_columns = [c for c in table.columns if c[1] == "speedup"]
    else:
        speedup_columns, keys = ["speedup"], keys + [table["group"]]
    for column in speedup_columns:
        values = table[column].where(candidate).astype(float)
        best = values.groupby(keys).transform("max")
        mask[column] = candidate & (values == best)
    return mask


def _flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    if isinstance(table.columns, pd.MultiIndex):
        table = table.set_axis([" ".join(filter(None, c)) for c in table.columns], axis=1)
    return table


def render(table: pd.DataFrame, fmt: str) -> str:
    """Render a long or wide table as ``md`` (pipe table), ``latex`` (booktabs) or ``csv``.

    Numbers have 2 decimals; missing values show as "-" (empty in csv). LaTeX bolds the best
    non-baseline speedup per group.
    """
    if fmt == "csv":
        return _flat_columns(table).to_csv(index=False, float_format="%.2f")
    if fmt == "md":
        from tabulate import tabulate

        flat = _flat_columns(table).astype(object).where(table.notna().to_numpy(), None)
        return tabulate(flat, headers="keys", tablefmt="pipe", floatfmt=".2f", missingval="-",
                        showindex=False) + "\n"
    if fmt == "latex":
        mask = best_speedup_mask(table)
        styler = table.style.hide(axis="index")
        styler = styler.format(precision=2, na_rep="-", escape="latex").format_index(escape="latex", axis=1)
        styler = styler.apply(lambda _: mask.map(lambda best: "textbf: --rwrap;" if best else ""), axis=None)
        align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in table.columns)
        return styler.to_latex(hrules=True, multicol_align="c", column_format=align)
    raise DecodeBenchError(f"unknown format '{fmt}' (valid: {', '.join(FORMATS)})")


def method_stats_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, task, method): the mean of every ``method_stats`` counter over the
    records that report it (e.g. ``exit_layer`` for DEL, ``layer_fraction`` for SkipDecode,
    ``ffn_skipped`` for FFN-SkipLLM), with ``records``; empty when no record has any."""
    if "method_stats" not in records.columns:
        return pd.DataFrame()
    rows = []
    for (model, task, method), frame in records[records["role"] != "baseline"].groupby(
            ["model", "task", "method"], sort=False):
        stats = [s for s in frame["method_stats"] if isinstance(s, dict) and s]
        if stats:
            means = pd.DataFrame(stats).mean(numeric_only=True).to_dict()
            rows.append({"model": model, "task": task, "method": method, "records": len(stats), **means})
    return pd.DataFrame(rows)


def _stats_section(records: pd.DataFrame, fmt: str) -> list[str]:
    table = method_stats_table(records)
    if table.empty:
        return []
    if fmt == "csv":
        return [render(table, fmt)]
    if fmt == "latex":
        styler = table.style.hide(axis="index").format(precision=2, na_rep="-", escape="latex")
        return [f"% {STATS_TITLE}\n" + styler.format_index(escape="latex", axis=1).to_latex(hrules=True)]
    return [f"**{STATS_TITLE}**\n\n{render(table, fmt)}"]


def _cost_section(records: pd.DataFrame, curve: Optional[Path], fmt: str, explicit: bool) -> list[str]:
    """The cost model's table (analysis/cost_model.py), or nothing when no run has a curve."""
    from decodebench.analysis.cost_model import COLUMNS, cost_table, curve_for_run
    from decodebench.analysis.frame import frame_from_records

    curves = {run_dir: curve_for_run(run_dir, curve) for run_dir in dict.fromkeys(records["run_dir"])}
    if not any(curves.values()):
        if explicit:
            print("decodebench-report: no verify-latency curve (--curve, or latency_curve.json in a run dir): "
                  "no cost model", file=sys.stderr)
        return []
    table = cost_table(frame_from_records(records), curves).drop(columns=["group"])
    title = "Cost model: predicted vs measured speedup (decode phase; fractions of the method's wall time)"
    body = render(table[[c for c in COLUMNS if c in table.columns]], fmt)
    return [body if fmt == "csv" else f"% {title}\n{body}" if fmt == "latex" else f"**{title}**\n\n{body}"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="decodebench-report",
                                     description="Speedup / τ / α tables from DecodeBench run directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("--layout", choices=LAYOUTS, default="long",
                        help="long: one row per method × group; wide: groups as column blocks")
    parser.add_argument("--output", type=Path, help="write here instead of stdout")
    parser.add_argument("--table", choices=TABLES,
                        help="which tables (default: all for md/latex, speed for csv); quality = quality "
                             "metrics and Δ vs AR next to speedup/τ/lossless rate; audit = lossless audit; "
                             "stats = method counters (exit layers, skipped layers/FFN blocks)")
    parser.add_argument("--curve", type=Path,
                        help="verify-latency curve JSON (decodebench-profile), or a folder of them, for the cost "
                             "model; default: latency_curve.json in each run dir")
    parser.add_argument("--paper", type=Path, metavar="OUT",
                        help="write every table (md, tex, csv) and figure (png, pdf) with an index.md into OUT")
    args = parser.parse_args(argv)
    try:
        if args.paper:
            from decodebench.analysis.paper import write_paper  # matplotlib only when asked for

            paper = write_paper(args.dirs, args.paper, curve=args.curve)
            print(f"{paper.index} ({len(paper.tables)} tables, {len(paper.figures)} figures)")
            return 0
        run_dirs = [run_dir for path in args.dirs for run_dir in find_run_dirs(path)]
        for problem in shard_problems(run_dirs):
            print(f"decodebench-report: warning: {problem}", file=sys.stderr)
        records = load_records(run_dirs)
        table = report_table(records)
        which = args.table or ("speed" if args.format == "csv" else "all")
        parts = [render(wide_table(table) if args.layout == "wide" else table, args.format)] \
            if which in ("speed", "all") else []
        sections = quality_sections(records, table)  # analysis/quality.py
        for message in sections["violations"]:
            print(f"decodebench-report: {message}", file=sys.stderr)
        parts += [render_section(name, sections[name], args.format, render)
                  for name in ("quality", "audit") if which in (name, "all") and not sections[name].empty]
        if which in ("stats", "all"):
            parts += _stats_section(records, args.format)
        if which in ("cost", "all"):
            parts += _cost_section(records, args.curve, args.format, explicit=which == "cost")
        text = "\n".join(parts)
    except DecodeBenchError as error:
        print(f"decodebench-report: error: {error}", file=sys.stderr)
        return error.exit_code
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
