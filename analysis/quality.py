"""Quality next to speed, and the lossless audit, from run directories.

Quality table — one row per (model, task, method, group) of the speed table (groups of a
single-group task collapse into ``overall``): speedup, τ, lossless rate and token match rate
(agreement with AR, for lossy methods) from the speed table,
then every quality metric the records carry (the mean over the records that report it, as in
``Summary.quality``) and, for methods, ``Δ <metric>`` = method mean − AR mean over the same
(run, sample, turn) pairs. Runs with ``gen.num_samples`` n > 1 (sample ids ``<problem>#<i>``) also
get the aggregates over each problem's samples, :func:`decodebench.records.sample_aggregates` (the
summary's, one definition): unbiased ``pass@k`` for k in 1, 10, 100 up to n (code tasks, Chen et al.,
2021) and ``<metric> maj@n`` by majority vote over the samples' answers (GSM8K), with their Δ.

Lossless audit — per (model, task, method, dtype) over the records the runner audited (lossless
methods under greedy decoding): audited records, lossless rate, diverged records, the earliest
first-divergence position and up to five ``sample:turn@position`` examples. A divergence in a
float32 run is a bug in the method (flagged ``BUG``); in float16/bfloat16 runs exactness is only
guaranteed in fp32 (noted).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from decodebench.records import sample_aggregates

KEYS = ["model", "task", "method", "group"]
# speed next to quality (with the bootstrap intervals of the speed table); agreement with AR next to Δ quality
SPEED_COLUMNS = ["speedup", "speedup_lo", "speedup_hi", "tau", "tau_lo", "tau_hi", "lossless_rate", "token_match_rate"]
BASELINE_SUFFIX = " (baseline)"
OVERALL = "overall"
AUDIT_COLUMNS = [
    "model",
    "task",
    "method",
    "dtype",
    "audited",
    "lossless_rate",
    "diverged",
    "first_divergence",
    "examples",
    "verdict",
]
HALF_DTYPES = ("float16", "bfloat16")


def _metric_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (record, metric) with its value; records without quality are dropped.
    ``record`` is the record's position in ``frame`` (for the aggregates over samples)."""
    rows = []
    for position, record in enumerate(frame.to_dict("records")):
        quality = record.get("quality")
        if not isinstance(quality, dict) or record.get("error"):
            continue
        for metric, value in quality.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                rows.append(
                    {
                        **{
                            k: record[k]
                            for k in ("model", "task", "method", "role", "group", "run_dir", "sample_id", "turn")
                        },
                        "metric": metric,
                        "value": float(value),
                        "record": position,
                    }
                )
    columns = ["model", "task", "method", "role", "group", "run_dir", "sample_id", "turn", "metric", "value"]
    return pd.DataFrame(rows, columns=[*columns, "record"])


def _over_samples(metrics: pd.DataFrame, records: pd.DataFrame) -> dict[str, float]:
    """:func:`sample_aggregates` of the records behind ``metrics`` (pass@k, maj@n; {} for one sample)."""
    return sample_aggregates(records.iloc[sorted(set(metrics["record"]))])


def _means(frame: pd.DataFrame, records: pd.DataFrame) -> dict[str, float]:
    means = frame.groupby("metric", sort=False)["value"].mean().to_dict()
    return {**means, **_over_samples(frame, records)}


def _deltas(method: pd.DataFrame, baseline: pd.DataFrame, records: pd.DataFrame) -> dict[str, float]:
    """Method mean − AR mean per metric over the (run, sample, turn) pairs both scored; method −
    AR of the same runs for the aggregates over samples both have."""
    keys = ["run_dir", "sample_id", "turn", "metric"]
    paired = method.merge(baseline[keys + ["value"]], on=keys, suffixes=("", "_ar"))
    deltas = {
        f"Δ {metric}": float((group["value"] - group["value_ar"]).mean())
        for metric, group in paired.groupby("metric", sort=False)
    }
    paired_runs = baseline[baseline["run_dir"].isin(set(method["run_dir"]))]  # the baseline of the same runs
    method_k, baseline_k = _over_samples(method, records), _over_samples(paired_runs, records)
    deltas.update({f"Δ {metric}": method_k[metric] - baseline_k[metric] for metric in method_k if metric in baseline_k})
    return deltas


def quality_table(records: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Quality metrics and their delta vs AR next to speedup, τ and lossless rate.

    Args:
        records: :func:`decodebench.analysis.report.load_records` output.
        speed: :func:`decodebench.analysis.report.report_table` of the same records.

    Returns:
        One row per (model, task, method, group) that has quality metrics; empty when no record
        carries any.
    """
    records = records.reset_index(drop=True)
    metrics = _metric_rows(records)
    if metrics.empty:
        return pd.DataFrame(columns=KEYS + SPEED_COLUMNS)
    rows, metric_names = [], []
    for (model, task), frame in metrics.groupby(["model", "task"], sort=False):
        groups = list(dict.fromkeys(frame["group"]))
        wanted = [OVERALL] if len(groups) == 1 else [*groups, OVERALL]
        baseline = frame[frame["role"] == "baseline"]
        labelled = [(f"{m}{BASELINE_SUFFIX}", f, True) for m, f in baseline.groupby("method", sort=False)]
        labelled += [(m, f, False) for m, f in frame[frame["role"] != "baseline"].groupby("method", sort=False)]
        for label, method_frame, is_baseline in labelled:
            for group in wanted:
                in_group = method_frame if group == OVERALL else method_frame[method_frame["group"] == group]
                if in_group.empty:
                    continue
                values = _means(in_group, records)
                if not is_baseline:
                    base_group = baseline if group == OVERALL else baseline[baseline["group"] == group]
                    values.update(_deltas(in_group, base_group, records))
                metric_names += [m for m in values if m not in metric_names]
                rows.append({"model": model, "task": task, "method": label, "group": group, **values})
    table = pd.DataFrame(rows)
    speed_columns = [c for c in SPEED_COLUMNS if c in speed.columns]  # agreement only with lossy methods
    table = table.merge(speed[KEYS + speed_columns], on=KEYS, how="left")
    ordered = [m for m in metric_names if not m.startswith("Δ ")]
    columns = [c for m in ordered for c in (m, f"Δ {m}") if c in table.columns]
    return table[KEYS + speed_columns + columns]


def _dtype(run_dir: str) -> str:
    path = Path(run_dir) / "config.yaml"
    config = (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}
    return str(config.get("dtype", "unknown"))


def _position(value: Any) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else str(int(value))


def lossless_audit(records: pd.DataFrame) -> pd.DataFrame:
    """The audit table (see the module docstring); empty when no record was audited."""
    if "lossless" not in records.columns:
        return pd.DataFrame(columns=AUDIT_COLUMNS)
    audited = records[records["lossless"].notna() & (records["role"] != "baseline")]
    if audited.empty:
        return pd.DataFrame(columns=AUDIT_COLUMNS)
    audited = audited.assign(dtype=[_dtype(run_dir) for run_dir in audited["run_dir"]])
    rows = []
    for (model, task, method, dtype), frame in audited.groupby(["model", "task", "method", "dtype"], sort=False):
        diverged = frame[frame["lossless"] == False]  # noqa: E712 (pandas element-wise comparison)
        positions = diverged.get("first_divergence", pd.Series(dtype=float)).dropna()
        first: int | None = int(positions.min()) if not positions.empty else None
        examples = ", ".join(
            f"{r['sample_id']}:{int(r['turn'])}@{_position(r.get('first_divergence'))}"
            for r in diverged.sort_values("first_divergence", na_position="last").head(5).to_dict("records")
        )
        if diverged.empty:
            verdict = "ok"
        elif dtype in HALF_DTYPES:
            verdict = f"note: {dtype} run; exactness is only guaranteed in float32"
        elif dtype == "float32":
            verdict = "BUG: a lossless method diverged from AR under float32 greedy decoding"
        else:
            verdict = "diverged; dtype unknown (no config.yaml)"
        rows.append(
            {
                "model": model,
                "task": task,
                "method": method,
                "dtype": dtype,
                "audited": len(frame),
                "lossless_rate": float((frame["lossless"] == True).mean()),  # noqa: E712
                "diverged": len(diverged),
                "first_divergence": first,
                "examples": examples,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=AUDIT_COLUMNS)


def violations(audit: pd.DataFrame) -> list[str]:
    """One message per audit row flagged as a bug (fp32 divergence of a lossless method)."""
    return [
        f"LOSSLESS VIOLATION: {row['method']} on {row['task']} ({row['model']}, {row['dtype']}): "
        f"{row['diverged']} of {row['audited']} records differ from AR, first at token "
        f"{_position(row['first_divergence'])} ({row['examples']})"
        for row in audit.to_dict("records")
        if str(row["verdict"]).startswith("BUG")
    ]


TITLES = {
    "quality": "Quality (mean per record; Δ = method − AR on the same samples)",
    "audit": "Lossless audit (greedy; lossless methods vs AR token ids)",
}


def render_section(name: str, table: pd.DataFrame, fmt: str, render: Callable[[pd.DataFrame, str], str]) -> str:
    """A titled quality or audit table in ``fmt`` (md | latex | csv; csv has no title).

    Args:
        name: ``quality`` or ``audit``.
        table: :func:`quality_table` or :func:`lossless_audit` output.
        fmt: output format.
        render: the report's table renderer (used for everything but the LaTeX audit table,
            which has no speedup column to highlight).
    """
    if fmt == "csv":
        return render(table, fmt)
    if fmt == "latex":
        if name == "audit":
            styler = table.style.hide(axis="index").format(precision=2, na_rep="-", escape="latex")
            body = styler.format_index(escape="latex", axis=1).to_latex(hrules=True)
        else:
            body = render(table, fmt)
        return f"% {TITLES[name]}\n{body}"
    return f"**{TITLES[name]}**\n\n{render(table, fmt)}"


def quality_sections(records: pd.DataFrame, speed: pd.DataFrame) -> dict[str, Any]:
    """``{"quality": DataFrame, "audit": DataFrame, "violations": [messages]}`` for the report."""
    audit = lossless_audit(records)
    return {"quality": quality_table(records, speed), "audit": audit, "violations": violations(audit)}
