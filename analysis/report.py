"""Report tables from run directories: records.jsonl → DataFrame → speedup / τ / α table.

Rows are keyed by (model, task, method label, category group) over every run directory given (a
sweep holds one method per run dir, each with its own same-process AR baseline). Every number
comes from :func:`decodebench.analysis.frame.aggregate` — the one aggregation the paper tables,
plots and W&B also read — with the definitions of :func:`decodebench.records.summarize_frame`; a
method's records are paired with the baseline records of the SAME run directory (else a
dedicated AR run on the same machine and settings), so speedups never mix machines or processes.
Run dirs of one method label are repeats: metrics are means over them. Speedup and τ carry a
seeded 95 % bootstrap interval over prompts (``speedup 95% CI``; :mod:`decodebench.analysis.uncertainty`).
``--convention specbench`` shows Spec-Bench's speedup and mean accepted tokens instead, with the
baseline's tokens recounted from its answer text as Spec-Bench's ``speed.py`` does.

The baseline appears as ``"<method> (baseline)"`` rows (speedup 1.00, τ 1.00, its tokens/s).

Sweeps: the shards of one configuration (``shard=i/n``) pool into one row per group; incomplete or
overlapping shard families are reported on stderr. Runs with ``baseline=shared`` are paired with
the AR run of the same ``baseline_key`` and node type (:mod:`decodebench.analysis.merge`).

Quality and the lossless audit (:mod:`decodebench.analysis.quality`) follow the speed table in md
and LaTeX output (``--table`` picks one); a lossless method whose float32 greedy output differs from
AR is reported on stderr as a LOSSLESS VIOLATION.

CLI::

    decodebench-report results/sweep [more dirs] [--format md|latex|csv] [--layout long|wide]
                       [--table speed|quality|audit|stats|latency|cost|all] [--curve CURVE]
                       [--convention decodebench|specbench] [--import-specbench METHOD BASE ...]
    decodebench-report results/sweep --paper paper/ [--curve CURVE]   # every table and figure + index.md
    decodebench-report results/sweep --export-specbench OUT            # Spec-Bench result files
    (:mod:`decodebench.analysis.specbench`)

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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from decodebench.analysis.merge import attach_shared_baselines, shard_problems
from decodebench.analysis.quality import quality_sections, render_section
from decodebench.registry import DecodeBenchError
from decodebench.runners.run_dir import RECORDS as RECORDS_FILE
from decodebench.runners.run_dir import read_record_rows

log = logging.getLogger(__name__)

OVERALL = "overall"
BASELINE_SUFFIX = " (baseline)"
KEYS = ["model", "task", "method", "group"]
# token_match_rate / first_divergence: agreement of lossy methods with AR under greedy decoding
# (decodebench.records defines both); the columns are left out when no record has them
AGREEMENT = ["token_match_rate", "first_divergence"]
METRICS = ["speedup", "speedup_tps", "tau", "alpha", "tokens_per_s", "lossless_rate", *AGREEMENT]
COUNTS = ["records", "errors"]
# convention -> (speed metrics of the table, those shown with their bootstrap interval)
CONVENTIONS = {
    "decodebench": (["speedup", "speedup_tps", "tau"], ["speedup", "tau"]),
    "specbench": (["speedup_tps", "mean_accepted_tokens"], ["speedup_tps", "mean_accepted_tokens"]),
}
CI_LABEL = "95% CI"
LATENCY_COLUMNS = ["latency_p50_ms", "latency_p95_ms", "latency_p99_ms"]
THROUGHPUT_TITLE = "Throughput by batch size (speedup vs AR at the same batch size; latency per sequence, s)"
LATENCY_TITLE = "Per-token decode latency (ms/token, prefill excluded; percentiles over records)"
WIDE_METRICS = ["speedup", "tau"]  # Spec-Bench's main table: speedup and τ per group
FORMATS = ("md", "latex", "csv")
TABLES = ("speed", "quality", "audit", "stats", "latency", "cost", "throughput", "all")
STATS_TITLE = "Method statistics (Drafter.request_stats, mean per generation)"
LAYOUTS = ("long", "wide")


def find_run_dirs(path: str | Path) -> list[Path]:
    """Run directories (folders holding ``records.jsonl``) at or below ``path``, sorted.

    Raises:
        DecodeBenchError: ``path`` holds no records.jsonl at any depth.
    """
    run_dirs = sorted({records.parent for records in Path(path).rglob(RECORDS_FILE)})
    if not run_dirs:
        raise DecodeBenchError(
            f"no {RECORDS_FILE} found in '{path}' (expected a run directory or a "
            "sweep directory containing run directories)"
        )
    return run_dirs


def load_records(run_dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One row per record of every run dir (the :class:`Record` fields plus ``run_dir``).

    Raises:
        DecodeBenchError: no records at all.
    """
    rows = [
        {**row, "run_dir": str(run_dir)}
        for run_dir in run_dirs
        for row in read_record_rows(Path(run_dir) / RECORDS_FILE)
    ]
    if not rows:
        raise DecodeBenchError(f"no records in {', '.join(map(str, run_dirs))}")
    return attach_shared_baselines(pd.DataFrame(rows))


def report_table(records: pd.DataFrame, convention: str = "decodebench") -> pd.DataFrame:
    """Long table: one row per (model, task, method, group) plus an ``overall`` group per method.

    ``records`` is :func:`load_records` output (joined with AR here) or an already joined tidy
    frame; the numbers come from :func:`decodebench.analysis.frame.aggregate` (the one
    aggregation) through :func:`speed_table`.
    """
    from decodebench.analysis.frame import aggregate, frame_from_records

    check_convention(convention)
    frame = records if "baseline_index" in records.columns else frame_from_records(records)
    return speed_table(aggregate(frame), convention)


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise DecodeBenchError(f"unknown convention '{convention}' (valid: {', '.join(CONVENTIONS)})")


def speed_table(agg: pd.DataFrame, convention: str = "decodebench") -> pd.DataFrame:
    """The speed table's columns of an aggregate (``frame.aggregate``): model, task, method, group,
    the convention's speed metrics each followed by its 95 % bootstrap interval over prompts
    (``<metric>_lo``, ``<metric>_hi``), alpha, tokens_per_s, lossless_rate (+ agreement columns
    for lossy methods), records, errors. Metrics are means over repeats.

    Conventions (:data:`CONVENTIONS`): ``decodebench`` = speedup (Σ AR wall / Σ method wall),
    speedup_tps (Spec-Bench's), tau (tokens per target forward); ``specbench`` = Spec-Bench's
    speedup (speedup_tps: mean prompt tokens/s ratio) and mean accepted tokens, as its
    ``evaluation/speed.py`` prints them. Baseline rows come first within each (model, task).
    """
    check_convention(convention)
    speed, with_ci = CONVENTIONS[convention]
    columns = KEYS + [c for m in speed for c in ((m, f"{m}_lo", f"{m}_hi") if m in with_ci else (m,))]
    columns += [m for m in METRICS if m not in speed and m not in ("speedup_tps", "tau")] + COUNTS
    table = agg[columns].copy()
    return table.drop(columns=[c for c in AGREEMENT if table[c].isna().all()])


def latency_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Per-token decode latency percentiles per (model, task, method) (overall rows of the aggregate)."""
    rows = agg[agg["group"] == OVERALL]
    return rows[["model", "task", "method", *LATENCY_COLUMNS, "records"]].reset_index(drop=True)


def ci_text(low: float, high: float) -> str | None:
    """An interval as ``[low, high]`` with the table's 2 decimals (None when undefined)."""
    return None if pd.isna(low) or pd.isna(high) else f"[{low:.2f}, {high:.2f}]"


def with_ci_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Long table for reading: each ``<m>_lo`` / ``<m>_hi`` pair becomes one ``<m> 95% CI`` column."""
    table = table.copy()
    for column in [c for c in table.columns if isinstance(c, str) and c.endswith("_lo")]:
        metric = column[:-3]
        if f"{metric}_hi" in table.columns:
            position = table.columns.get_loc(column)
            text = [ci_text(lo, hi) for lo, hi in zip(table[column], table[f"{metric}_hi"])]
            table = table.drop(columns=[column, f"{metric}_hi"])
            table.insert(position, f"{metric} {CI_LABEL}", text)
    return table


def wide_table(table: pd.DataFrame) -> pd.DataFrame:
    """Spec-Bench layout: one row per (model, task, method); a (speedup, tau) block per group (with
    their intervals; the ``specbench`` convention's speedup_tps and mean accepted tokens instead)."""
    main = WIDE_METRICS if "speedup" in table.columns else ["speedup_tps", "mean_accepted_tokens"]
    metrics = [c for m in main for c in (m, f"{m}_lo", f"{m}_hi") if c in table.columns]
    wide = table.pivot(index=["model", "task", "method"], columns="group", values=metrics)
    wide = wide.swaplevel(axis=1)
    groups = list(dict.fromkeys(table["group"]))
    wide = wide.reindex(columns=[(g, m) for g in groups for m in metrics])
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
        speedup_columns = [c for c in table.columns if c[1] in ("speedup", "speedup_tps")]
        if any(c[1] == "speedup" for c in speedup_columns):
            speedup_columns = [c for c in speedup_columns if c[1] == "speedup"]
    elif "group" in table.columns:
        speedup_columns = [c for c in ("speedup", "speedup_tps") if c in table.columns][:1]
        keys = keys + [table["group"]]
    else:  # not a speed table (e.g. latency)
        return mask
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

    Numbers have 2 decimals; missing values show as "-" (empty in csv). Bootstrap intervals
    (``<m>_lo`` / ``<m>_hi``) read ``[low, high]`` in one ``<m> 95% CI`` column (csv keeps both
    numbers). LaTeX bolds the best non-baseline speedup per group.
    """
    if fmt == "csv":
        return _flat_columns(table).to_csv(index=False, float_format="%.2f")
    if fmt == "md":
        from tabulate import tabulate

        flat = with_ci_columns(_flat_columns(table))
        flat = flat.astype(object).where(flat.notna().to_numpy(), None)
        return tabulate(flat, headers="keys", tablefmt="pipe", floatfmt=".2f", missingval="-", showindex=False) + "\n"
    if fmt == "latex":
        if not isinstance(table.columns, pd.MultiIndex):
            table = with_ci_columns(table)
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
        ["model", "task", "method"], sort=False
    ):
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


def _cost_section(records: pd.DataFrame, curve: Path | None, fmt: str, explicit: bool) -> list[str]:
    """The cost model's table (analysis/cost_model.py), or nothing when no run has a curve."""
    from decodebench.analysis.cost_model import COLUMNS, cost_table, curve_for_run
    from decodebench.analysis.frame import frame_from_records

    curves = {run_dir: curve_for_run(run_dir, curve) for run_dir in dict.fromkeys(records["run_dir"])}
    if not any(curves.values()):
        if explicit:
            print(
                "decodebench-report: no verify-latency curve (--curve, or latency_curve.json in a run dir): "
                "no cost model",
                file=sys.stderr,
            )
        return []
    table = cost_table(frame_from_records(records), curves).drop(columns=["group"])
    title = "Cost model: predicted vs measured speedup (decode phase; fractions of the method's wall time)"
    body = render(table[[c for c in COLUMNS if c in table.columns]], fmt)
    return [_titled(body, title, fmt)]


def _titled(body: str, title: str, fmt: str) -> str:
    return body if fmt == "csv" else f"% {title}\n{body}" if fmt == "latex" else f"**{title}**\n\n{body}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="decodebench-report", description="Speedup / τ / α tables from DecodeBench run directories."
    )
    parser.add_argument("dirs", nargs="*", type=Path, help="run directories or sweep directories")
    parser.add_argument("--format", choices=FORMATS, default="md")
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="long",
        help="long: one row per method × group; wide: groups as column blocks",
    )
    parser.add_argument("--output", type=Path, help="write here instead of stdout")
    parser.add_argument(
        "--table",
        choices=TABLES,
        help="which tables (default: all for md/latex, speed for csv); quality = quality "
        "metrics and Δ vs AR next to speedup/τ/lossless rate; audit = lossless audit; "
        "stats = method counters (exit layers, skipped layers/FFN blocks); latency = "
        "per-token latency p50/p95/p99; throughput = tokens/s, speedup vs AR at the same batch size, "
        "per-sequence latency p50/p95 and peak RSS per gen.batch_size (not part of all)",
    )
    parser.add_argument(
        "--convention",
        choices=tuple(CONVENTIONS),
        default="decodebench",
        help="speed columns: decodebench (speedup = Σ AR wall / Σ wall, τ per target forward) or "
        "specbench (Spec-Bench speed.py's speedup and mean accepted tokens)",
    )
    parser.add_argument(
        "--tokenizer-path",
        type=Path,
        help="with --convention specbench: the tokenizer that recounts the baseline's answers (as "
        "speed.py's --tokenizer-path); default: the catalogue model's",
    )
    parser.add_argument(
        "--curve",
        type=Path,
        help="verify-latency curve JSON (decodebench-profile), or a folder of them, for the cost "
        "model; default: latency_curve.json in each run dir",
    )
    parser.add_argument(
        "--paper",
        type=Path,
        metavar="OUT",
        help="write every table (md, tex, csv) and figure (png, pdf) with an index.md into OUT",
    )
    parser.add_argument(
        "--export-specbench",
        type=Path,
        metavar="OUT",
        help="write every method (and the AR records it was paired with) as Spec-Bench result "
        "files under OUT (evaluation/speed.py reads them)",
    )
    parser.add_argument(
        "--import-specbench",
        nargs=2,
        action="append",
        type=Path,
        metavar=("METHOD", "BASE"),
        default=[],
        help="add a Spec-Bench result file and its baseline file (labelled '[Spec-Bench import]'); repeatable",
    )
    args = parser.parse_args(argv)
    from decodebench.analysis.frame import aggregate, frame_from_records  # frame.py imports this module
    from decodebench.analysis.specbench import export_specbench, import_specbench, recount_baseline_tokens

    try:
        if not args.dirs and not args.import_specbench:
            raise DecodeBenchError("give run or sweep directories, or --import-specbench METHOD BASE")
        imported = [import_specbench(method, base) for method, base in args.import_specbench]
        if args.paper:
            from decodebench.analysis.paper import write_paper  # matplotlib only when asked for

            paper = write_paper(args.dirs, args.paper, curve=args.curve, imported=imported)
            print(f"{paper.index} ({len(paper.tables)} tables, {len(paper.figures)} figures)")
            return 0
        run_dirs = [run_dir for path in args.dirs for run_dir in find_run_dirs(path)]
        for problem in shard_problems(run_dirs):
            print(f"decodebench-report: warning: {problem}", file=sys.stderr)
        records = pd.concat(([load_records(run_dirs)] if run_dirs else []) + imported, ignore_index=True)
        frame = frame_from_records(records)
        if args.export_specbench:
            for exported in export_specbench(frame, args.export_specbench):
                print(
                    f"{exported.method}: {exported.questions} questions ({exported.left_out} left out) -> "
                    f"python evaluation/speed.py --file-path {exported.path} --base-path {exported.baseline_path} "
                    "--tokenizer-path <model>"
                )
            return 0
        if args.convention == "specbench":  # speed.py's baseline token count (analysis/specbench.py)
            frame = recount_baseline_tokens(frame, args.tokenizer_path)
        agg = aggregate(frame)
        table = speed_table(agg, args.convention)
        which = args.table or ("speed" if args.format == "csv" else "all")
        parts = (
            [render(wide_table(table) if args.layout == "wide" else table, args.format)]
            if which in ("speed", "all")
            else []
        )
        sections = quality_sections(records, speed_table(agg))  # analysis/quality.py
        for message in sections["violations"]:
            print(f"decodebench-report: {message}", file=sys.stderr)
        parts += [
            render_section(name, sections[name], args.format, render)
            for name in ("quality", "audit")
            if which in (name, "all") and not sections[name].empty
        ]
        if which in ("stats", "all"):
            parts += _stats_section(records, args.format)
        if which in ("latency", "all"):
            parts += [_titled(render(latency_table(agg), args.format), LATENCY_TITLE, args.format)]
        if which in ("cost", "all"):
            parts += _cost_section(records, args.curve, args.format, explicit=which == "cost")
        if which == "throughput":  # analysis/throughput.py
            from decodebench.analysis.throughput import throughput_table

            parts += [_titled(render(throughput_table(frame), args.format), THROUGHPUT_TITLE, args.format)]
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
