"""Run and sweep directories → one tidy DataFrame, joined with the AR baseline, then aggregated.

Tidy frame (:func:`load_frame`): one row per record (the :class:`~decodebench.records.Record`
fields) plus what the run directory says about it — ``method_name`` (registry name),
``lossless_method`` (the method claims losslessness), ``machine`` (node type from
``manifest.json``: device, CPU/GPU model, cores, threads; the host may differ), ``setting``
(a digest of what must be equal for two runs to decode the same prompts the same way: generation
settings, dtype, device), ``repeat`` (which repetition of a configuration the row belongs to) and
``run_dir``. Quality metrics are flattened into ``quality.<metric>`` columns next to the
``quality`` dict.

AR join (:func:`join_baseline`): every record gets ``baseline_index`` — the frame index of the AR
record that decoded the same (model, task, sample, turn, seed) on the same machine, and the AR
record's numbers as ``ar_*`` columns. The baseline of the record's OWN run dir is preferred (the
same-process baseline, or a shared baseline attached by :mod:`decodebench.analysis.merge`); only
otherwise an AR record of another run with the same ``machine`` and ``setting`` is used (a
dedicated ``method=ar`` run first). AR records are their own baseline (speedup 1.00).

Aggregation (:func:`aggregate`, the ONE aggregation the report, the paper tables, the plots and
the W&B table read): one row per (model, task, method, group) plus ``overall``; each metric is
computed per repeat with :func:`decodebench.records.summarize_frame` (the one definition) over the
joined rows, then reported as the mean over repeats with its standard deviation
(``<metric>_std``; NaN with a single repeat), with a seeded bootstrap interval over prompts
(``<metric>_lo`` / ``_hi``, :mod:`decodebench.analysis.uncertainty`). A repeat is one run dir, except that the shards
(``shard=i/n``) of one configuration and seed pool into one repeat. In-process baselines are
labelled ``"<method> (baseline)"`` as in :mod:`decodebench.analysis.report`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from decodebench.analysis.merge import WHERE_KEYS, node_type, read_config
from decodebench.analysis.report import BASELINE_SUFFIX, OVERALL, find_run_dirs, load_records
from decodebench.analysis.uncertainty import BOOTSTRAP_SEED, bootstrap_intervals, latency_percentiles
from decodebench.records import acceptance_by_position, problem_totals, prompt_totals, summarize_frame

KEYS = ["model", "task", "method", "group"]
JOIN_KEYS = ["model", "task", "sample_id", "turn", "seed"]
# Aggregated metrics (definitions: decodebench.records.Summary); quality.<metric> columns follow.
METRICS = [
    "speedup",
    "speedup_tps",
    "tau",
    "mean_accepted_tokens",
    "alpha",
    "alpha_per_token",
    "tokens_per_s",
    "lossless_rate",
    "token_match_rate",
    "first_divergence",
    "drafted_per_step",
    "verified_per_step",
    "prefill_share",
    "draft_share",
    "verify_share",
    "overhead_share",
]
# Metrics with a bootstrap interval over prompts (<metric>_lo, <metric>_hi)
CI_METRICS = ["speedup", "speedup_tps", "tau", "mean_accepted_tokens"]
QUALITY_PREFIX = "quality."
LIST_COLUMNS = ["accepted_lengths", "drafted_lengths", "draft_depths", "emitted_lengths", "tree_sizes", "output_ids"]
AR_COLUMNS = ["wall_s", "new_tokens", "prefill_s", "verify_s", "steps"]
PathLike = str | Path


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_info(run_dir: PathLike) -> dict[str, Any]:
    """Run-level columns of one run dir, from ``config.yaml`` and ``manifest.json`` (both optional)."""
    config = read_config(Path(run_dir))
    method = config.get("method") or {}
    node = node_type(Path(run_dir))
    machine = "unknown" if node is None else "/".join("-" if v is None else str(v) for v in node)
    family = _digest({k: v for k, v in config.items() if k not in WHERE_KEYS + ("shard",)})
    return {
        "run_dir": str(run_dir),
        "method_name": method.get("name"),
        "lossless_method": method.get("lossless"),
        "machine": machine,
        "setting": _digest({k: config.get(k) for k in ("gen", "dtype", "device")}),
        # shards of one configuration and seed are one repeat; any other run dir is its own
        "repeat": f"{family}/seed{config.get('seed')}" if config.get("shard") else str(run_dir),
        "dtype": config.get("dtype"),
        "temperature": (config.get("gen") or {}).get("temperature"),
    }


def _clean(frame: pd.DataFrame) -> pd.DataFrame:
    """Stable dtypes: lists or None in list columns, nullable bool/int for the audit columns."""
    frame = frame.copy()
    for column in LIST_COLUMNS:
        if column in frame.columns:
            frame[column] = [v if isinstance(v, list) else None for v in frame[column]]
    if "lossless" in frame.columns:
        frame["lossless"] = pd.array([None if _missing(v) else bool(v) for v in frame["lossless"]], dtype="boolean")
    if "first_divergence" in frame.columns:
        frame["first_divergence"] = pd.array(
            [None if _missing(v) else int(v) for v in frame["first_divergence"]], dtype="Int64"
        )
    if "quality" in frame.columns:
        frame["quality"] = [v if isinstance(v, dict) else None for v in frame["quality"]]
        metrics = list(dict.fromkeys(m for q in frame["quality"] if q for m in q))
        for metric in metrics:
            frame[QUALITY_PREFIX + metric] = [
                float(q[metric]) if q and q.get(metric) is not None else math.nan for q in frame["quality"]
            ]
    return frame


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def load_frame(paths: Sequence[PathLike], imported: Sequence[pd.DataFrame] = ()) -> pd.DataFrame:
    """The tidy frame of every run dir at or below ``paths`` (plus ``imported`` record frames, e.g.
    Spec-Bench result files read by ``analysis.specbench.import_specbench``), joined with AR.

    Raises:
        DecodeBenchError: a path holds no records.jsonl, or no records at all.
    """
    run_dirs = [run_dir for path in paths for run_dir in find_run_dirs(path)]
    loaded = [load_records(run_dirs)] if run_dirs else []  # the report's reader: torn lines, shared baselines
    return frame_from_records(pd.concat([*loaded, *imported], ignore_index=True))


def frame_from_records(records: pd.DataFrame) -> pd.DataFrame:
    """The tidy, AR-joined frame of ``decodebench.analysis.report.load_records`` output."""
    info = pd.DataFrame([run_info(d) for d in dict.fromkeys(records["run_dir"])])
    frame = records.merge(info, on="run_dir", how="left")
    # an in-process (or attached shared) baseline is AR whatever its run measured
    frame.loc[frame["role"] == "baseline", ["method_name", "lossless_method"]] = ["ar", True]
    frame["method_name"] = frame["method_name"].fillna(frame["method"].str.split("[", regex=False).str[0])
    return join_baseline(_clean(frame))


def is_ar(frame: pd.DataFrame) -> pd.Series:
    """Rows that are AR measurements: in-process/shared baselines and ``method=ar`` runs."""
    return (frame["role"] == "baseline") | (frame["method_name"] == "ar")


def join_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``baseline_index``, ``baseline_run`` and ``ar_<field>`` columns (see the module docstring)."""
    frame = frame.copy()
    ok = frame["error"].isna() if "error" in frame.columns else pd.Series(True, index=frame.index)
    candidates = frame[is_ar(frame) & ok]
    # a dedicated method=ar run is preferred over another run's in-process baseline
    candidates = candidates.assign(_rank=(candidates["role"] == "baseline").astype(int)).sort_values(
        "_rank", kind="stable"
    )
    own_run = {
        tuple(k): i for k, i in zip(candidates[["run_dir", *JOIN_KEYS]].itertuples(index=False), candidates.index)
    }
    same_machine: dict[tuple, int] = {}
    for key, index in zip(candidates[[*JOIN_KEYS, "machine", "setting"]].itertuples(index=False), candidates.index):
        same_machine.setdefault(tuple(key), index)
    with_baseline = set(frame.loc[frame["role"] == "baseline", "run_dir"])
    matched: list[int | None] = []
    ar_rows = is_ar(frame)
    for index, row in zip(frame.index, frame.to_dict("records")):
        if ar_rows[index]:
            matched.append(index if ok[index] else None)
            continue
        key = tuple(row[k] for k in JOIN_KEYS)
        found = own_run.get((row["run_dir"], *key))
        if found is None and row["run_dir"] not in with_baseline:  # never another process's AR for a run
            # that measured its own (its failed baseline record means: no pair)
            found = same_machine.get((*key, row["machine"], row["setting"]))
        matched.append(found)
    frame["baseline_index"] = pd.array(matched, dtype="Int64")
    source = frame.reindex(frame["baseline_index"].astype("float").fillna(-1).astype(int))
    frame["baseline_run"] = source["run_dir"].to_numpy()
    for column in AR_COLUMNS:
        frame[f"ar_{column}"] = source[column].to_numpy(dtype=float, na_value=math.nan)
    return frame


# -- parquet ---------------------------------------------------------------------------------------


def save_parquet(frame: pd.DataFrame, path: PathLike) -> Path:
    """Write the tidy frame; the ``quality`` dict column is stored only as ``quality.<metric>`` columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=["quality"], errors="ignore").to_parquet(path, index=False)
    return path


def read_parquet(path: PathLike) -> pd.DataFrame:
    """Read a frame written by :func:`save_parquet`, with the ``quality`` dicts rebuilt."""
    frame = pd.read_parquet(path)
    metrics = [c for c in frame.columns if c.startswith(QUALITY_PREFIX)]
    frame["quality"] = [
        {m[len(QUALITY_PREFIX) :]: v for m, v in zip(metrics, values) if not _missing(v)} or None
        for values in frame[metrics].itertuples(index=False)
    ]
    for column in LIST_COLUMNS:
        if column in frame.columns:
            frame[column] = [None if v is None else [int(x) for x in v] for v in frame[column]]
    return frame


# -- aggregation -----------------------------------------------------------------------------------


def labelled(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows to aggregate, with the table label in ``method``: baselines as ``"ar (baseline)"``.

    A shared baseline copied into several consumer runs counts once (in its own run).
    """
    baseline = frame[frame["role"] == "baseline"]
    if "baseline_source" in frame.columns:
        baseline = baseline.assign(repeat=baseline["baseline_source"].fillna(baseline["repeat"]))
        baseline = baseline.drop_duplicates(subset=["repeat", "sample_id", "turn"])
    baseline = baseline.assign(method=baseline["method"] + BASELINE_SUFFIX)
    return pd.concat([baseline, frame[frame["role"] != "baseline"]])


def _cell(model: str, task: str, method: str, group: str, rows: pd.DataFrame, bootstrap_seed: int) -> dict[str, Any]:
    """One aggregate row: every metric per repeat (``summarize_frame``), mean ± std over repeats, the
    bootstrap interval over prompts of :data:`CI_METRICS`, pooled acceptance curves and latency percentiles."""
    units = [unit for _, unit in rows.groupby("repeat", sort=False)]
    totals = [prompt_totals(unit) for unit in units]
    summaries = [summarize_frame(unit, unit_totals) for unit, unit_totals in zip(units, totals)]
    per_position, conditional = (
        (summaries[0]["per_position_acceptance"], summaries[0]["conditional_acceptance"])
        if len(units) == 1
        else acceptance_by_position(rows)
    )
    row = {
        "model": model,
        "task": task,
        "method": method,
        "group": group,
        "method_name": rows["method_name"].iloc[0],
        "lossless_method": rows["lossless_method"].iloc[0],
        "repeats": len(units),
        "records": len(rows),
        "errors": int(rows["error"].notna().sum()) if "error" in rows.columns else 0,
        "per_position_acceptance": per_position,
        "conditional_acceptance": conditional,
    }
    names = METRICS + [QUALITY_PREFIX + m for m in dict.fromkeys(m for s in summaries for m in s["quality"])]
    for name in names:
        key = name[len(QUALITY_PREFIX) :] if name.startswith(QUALITY_PREFIX) else None
        values = pd.Series([s["quality"].get(key) if key else s.get(name) for s in summaries], dtype=float).dropna()
        row[name] = values.mean() if len(values) else math.nan
        row[f"{name}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
    intervals = bootstrap_intervals(
        [problem_totals(unit, unit_totals) for unit, unit_totals in zip(units, totals)],  # a problem's samples together
        [m for m in CI_METRICS if not math.isnan(row[m])],
        seed=bootstrap_seed,
    )
    for name in CI_METRICS:
        row[f"{name}_lo"], row[f"{name}_hi"] = intervals.get(name, (math.nan, math.nan))
    row.update(latency_percentiles(rows))
    return row


def aggregate(frame: pd.DataFrame, bootstrap_seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """THE aggregation of the analysis package (report, paper tables, plots and W&B all read it):
    one row per (model, task, method, group) plus ``overall`` (module docstring).

    Columns: KEYS, ``method_name``, ``lossless_method``, ``repeats``, ``records``, ``errors``;
    every metric of :data:`METRICS` and ``quality.<metric>`` as the mean over repeats with a
    ``<metric>_std`` partner (NaN with one repeat); ``<metric>_lo`` / ``_hi``: the seeded 95 %
    bootstrap interval over prompts of :data:`CI_METRICS` (``analysis/uncertainty.py``);
    ``latency_p50_ms`` / ``_p95_ms`` / ``_p99_ms`` (per-token decode latency over the records);
    ``per_position_acceptance`` and ``conditional_acceptance`` (pooled over all records of the row).
    """
    rows = []
    data = labelled(frame)
    groups = list(dict.fromkeys(frame["group"]))
    for (model, task, method), method_rows in data.groupby(["model", "task", "method"], sort=False):
        for group in [*groups, OVERALL]:
            in_group = method_rows if group == OVERALL else method_rows[method_rows["group"] == group]
            if not in_group.empty:
                rows.append(_cell(model, task, method, group, in_group, bootstrap_seed))
    table = pd.DataFrame(rows)
    for name in METRICS + [f"{m}_{suffix}" for m in CI_METRICS for suffix in ("lo", "hi")]:
        for column in (name, f"{name}_std") if name in METRICS else (name,):
            if column not in table.columns:
                table[column] = math.nan
    return table


def quality_metrics(table: pd.DataFrame) -> list[str]:
    """Quality metric names present in an aggregate table (without the ``quality.`` prefix)."""
    return [c[len(QUALITY_PREFIX) :] for c in table.columns if c.startswith(QUALITY_PREFIX) and not c.endswith("_std")]
