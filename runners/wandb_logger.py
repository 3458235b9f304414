"""Weights & Biases logging of one finished run (``logger=wandb``).

Logged per run: the resolved config; every record as rows of a ``wandb.Table``
(``records_table``); the summary metrics of ``summary.json`` under the same names (speedup,
speedup_tps, tau, mean_accepted_tokens, alpha, alpha_per_token, tokens_per_s, lossless_rate,
``quality/<metric>``, counts; the baseline's under ``baseline/``); the run's report per category
group (``report_table``: the analysis package's one aggregation, with bootstrap intervals) and a bar plot of
speedup per group (``speedup_by_group``). Runs are
grouped by sweep (the sweep directory's name unless ``logger.group`` says otherwise) and tagged
with method, task and model.

Offline by default: files go to ``<run dir>/wandb/offline-run-*`` and ``wandb sync <that dir>``
uploads them later. ``WANDB_MODE=online`` (or ``logger.mode=online``) logs live.

The run directory stays the source of truth; W&B gets a copy after the run has finished, so a
logging failure never touches the measurements (it is reported as a warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from decodebench.config import LoggerConfig
from decodebench.records import Record

log = logging.getLogger("decodebench")

# Record fields logged as table columns (lists such as per-step lengths and ids stay in records.jsonl).
RECORD_COLUMNS = (
    "method",
    "role",
    "sample_id",
    "category",
    "group",
    "turn",
    "seed",
    "prompt_tokens",
    "new_tokens",
    "wall_s",
    "prefill_s",
    "draft_s",
    "verify_s",
    "steps",
    "drafted",
    "accepted",
    "stop_reason",
    "output_sha",
    "lossless",
    "first_divergence",
    "error",
)
SUMMARY_METRICS = (
    "speedup",
    "speedup_tps",
    "tau",
    "mean_accepted_tokens",
    "alpha",
    "alpha_per_token",
    "tokens_per_s",
    "lossless_rate",
    "records",
    "errors",
    "new_tokens",
    "wall_s",
)


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """Flat W&B summary from a ``summary.json`` dict; null metrics are left out (W&B drops them)."""
    metrics = {name: summary.get(name) for name in SUMMARY_METRICS}
    metrics.update({f"quality/{name}": value for name, value in (summary.get("quality") or {}).items()})
    for name in SUMMARY_METRICS:
        metrics[f"baseline/{name}"] = (summary.get("baseline") or {}).get(name)
    return {name: value for name, value in metrics.items() if value is not None}


def record_rows(records: list[Record]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-record table (``tokens_per_s`` added, one row per record)."""
    columns = [*RECORD_COLUMNS, "tokens_per_s"]
    rows = [[getattr(record, name) for name in RECORD_COLUMNS] + [record.tokens_per_s] for record in records]
    return columns, rows


def log_run(
    cfg: LoggerConfig,
    run_dir: Path,
    resolved_config: dict[str, Any],
    records: list[Record],
    summary: dict[str, Any],
    tags: list[str],
) -> Path | None:
    """Log one finished run to W&B; returns the W&B run folder (None when logging failed).

    Args:
        cfg: the ``logger`` config (``name`` must be ``wandb``).
        run_dir: the DecodeBench run directory (W&B's files go below it unless ``cfg.dir`` is set).
        resolved_config: the run's resolved config, logged as the W&B config.
        records: every record of the run (method and baseline).
        summary: the contents of ``summary.json``.
        tags: method / task / model tags (``cfg.tags`` are added).
    """
    try:
        import wandb
    except ImportError:  # a dependency of the package; only a broken install gets here
        log.warning("logger=wandb but wandb is not installed: pip install wandb")
        return None
    from decodebench.analysis.report import report_table

    mode = os.environ.get("WANDB_MODE") or cfg.mode
    folder = Path(cfg.dir) if cfg.dir else Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        run = wandb.init(
            mode=mode,
            dir=str(folder),
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            name=Path(run_dir).name,
            tags=sorted(set(tags) | set(cfg.tags)),
            config=resolved_config,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", silent=True),
        )
        columns, rows = record_rows(records)
        run.log({"records_table": wandb.Table(columns=columns, data=rows)})
        frame = report_table(records_frame(records, run_dir))
        report = wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))
        run.log({"report_table": report})
        method_rows = frame[~frame["method"].str.endswith(" (baseline)")]
        bars = wandb.Table(
            columns=["group", "speedup"],
            data=[[g, s] for g, s in zip(method_rows["group"], method_rows["speedup"]) if s is not None and s == s],
        )
        run.log({"speedup_by_group": wandb.plot.bar(bars, "group", "speedup", title="speedup by group")})
        run.summary.update(summary_metrics(summary))
        location = Path(run.dir).parent
        run.finish()
    except Exception as error:  # never lose a finished run to a logging problem
        log.warning("W&B logging failed for %s: %s", run_dir, error)
        return None
    log.info(
        "W&B run (%s) in %s%s",
        mode,
        location,
        "; upload with: wandb sync " + str(location) if mode == "offline" else "",
    )
    return location


def records_frame(records: list[Record], run_dir: Path):
    """Records as the report's DataFrame (one row per record, ``run_dir`` added)."""
    import pandas as pd

    return pd.DataFrame([{**record.to_dict(), "run_dir": str(run_dir)} for record in records])
