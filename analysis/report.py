"""Report tables from run directories: records.jsonl → DataFrame → speedup / τ / α table.

Rows are keyed by (model, task, method label, category group), pooled over every run directory
given (a sweep holds one method per run dir, each with its own same-process AR baseline). Every
number comes from :func:`decodebench.records.summarize`; a method's records are paired with the
baseline records of the SAME run directory (and group), so speedups never mix machines or
processes. Runs of one method label that differ in other parameters are pooled: report such
runs with separate invocations.

The baseline appears as ``"<method> (baseline)"`` rows (speedup 1.00, τ 1.00, its tokens/s).

CLI::

    decodebench-report results/sweep [more dirs] [--format md|latex|csv] [--layout long|wide]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pandas as pd

from decodebench.records import Record, summarize
from decodebench.registry import DecodeBenchError

log = logging.getLogger(__name__)

RECORDS_FILE = "records.jsonl"
OVERALL = "overall"
BASELINE_SUFFIX = " (baseline)"
KEYS = ["model", "task", "method", "group"]
METRICS = ["speedup", "speedup_tps", "tau", "alpha", "tokens_per_s", "lossless_rate"]
COUNTS = ["records", "errors"]
WIDE_METRICS = ["speedup", "tau"]  # Spec-Bench's main table: speedup and τ per group
FORMATS = ("md", "latex", "csv")
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


def read_records_file(path: Path) -> list[dict[str, Any]]:
    """Parse one records.jsonl; a torn LAST line (writer killed mid-line) is skipped with a warning."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise DecodeBenchError(f"{path}:{number}: not a JSON record ({error})") from error
            log.warning("%s: skipping torn last line %d", path, number)
    return rows


def load_records(run_dirs: Sequence[Union[str, Path]]) -> pd.DataFrame:
    """One row per record of every run dir (the :class:`Record` fields plus ``run_dir``).

    Raises:
        DecodeBenchError: no records at all.
    """
    rows = [{**row, "run_dir": str(run_dir)}
            for run_dir in run_dirs for row in read_records_file(Path(run_dir) / RECORDS_FILE)]
    if not rows:
        raise DecodeBenchError(f"no records in {', '.join(map(str, run_dirs))}")
    return pd.DataFrame(rows)


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
        methods = frame[frame["role"] != "baseline"]
        for label, method_frame, is_baseline in (
            *((f"{m}{BASELINE_SUFFIX}", f, True) for m, f in baseline.groupby("method", sort=False)),
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
    return pd.DataFrame(rows, columns=KEYS + METRICS + COUNTS)


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="decodebench-report",
                                     description="Speedup / τ / α tables from DecodeBench run directories.")
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument("--layout", choices=LAYOUTS, default="long",
                        help="long: one row per method × group; wide: groups as column blocks")
    parser.add_argument("--output", type=Path, help="write here instead of stdout")
    args = parser.parse_args(argv)
    try:
        run_dirs = [run_dir for path in args.dirs for run_dir in find_run_dirs(path)]
        table = report_table(load_records(run_dirs))
        text = render(wide_table(table) if args.layout == "wide" else table, args.format)
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
