"""Uncertainty of the aggregated numbers: a seeded bootstrap over prompts, and latency percentiles.

Bootstrap (:func:`bootstrap_interval`): prompts (``sample_id``; all turns of a prompt together;
with ``gen.num_samples`` > 1 the problem, all its samples together: ``records.problem_totals``) are drawn with replacement, :data:`BOOTSTRAP_SAMPLES` times, from a generator seeded with
:data:`BOOTSTRAP_SEED`, so a report is reproducible to the last digit. Each ratio metric of
:data:`decodebench.records.RATIOS` is recomputed on every draw from the per-prompt totals
(:func:`decodebench.records.prompt_totals`) — the same numerator and denominator as the point
estimate. With several repeats (run dirs of one configuration) the same draw of prompts applies
to every repeat and the statistic is the mean over repeats, as for the point estimate; the 95 %
interval is the 2.5th and 97.5th percentile of the draws (percentile bootstrap).

It captures how much the number depends on WHICH prompts were measured (acceptance varies widely
from prompt to prompt); run-to-run timing noise is what the std over repeats shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from decodebench.records import RATIOS

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
LATENCY_PERCENTILES = (50, 95, 99)


def bootstrap_intervals(
    units: Sequence[pd.DataFrame],
    metrics: Sequence[str],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``metrics`` over prompts (module docstring); one draw of
    prompts serves every metric.

    Args:
        units: one frame of per-prompt totals per repeat (``prompt_totals``, indexed by sample_id).
        metrics: names in :data:`decodebench.records.RATIOS`.
        samples: number of bootstrap draws.
        seed: seed of the draws (the same seed gives the same intervals).
        confidence: coverage of the interval (0.95 = the 2.5th..97.5th percentiles).

    Returns:
        metric -> (low, high); (nan, nan) when no draw defines the metric (e.g. no AR partner).
    """
    prompts = list(dict.fromkeys(p for unit in units for p in unit.index))
    if not prompts:
        return {metric: (math.nan, math.nan) for metric in metrics}
    n = len(prompts)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n, size=(samples, n)) + n * np.arange(samples)[:, None]
    counts = np.bincount(drawn.ravel(), minlength=samples * n).reshape(samples, n).astype(float)
    aligned = [unit.reindex(prompts).fillna(0.0) for unit in units]
    tail = (1.0 - confidence) / 2.0
    intervals = {}
    for metric in metrics:
        numerator, denominator = RATIOS[metric]
        per_repeat = []
        for unit in aligned:
            top, bottom = counts @ unit[numerator].to_numpy(), counts @ unit[denominator].to_numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                per_repeat.append(np.where(bottom > 0, top / bottom, np.nan))
        stacked = np.vstack(per_repeat)
        defined = ~np.isnan(stacked).all(axis=0)
        if not defined.any():
            intervals[metric] = (math.nan, math.nan)
            continue
        low, high = np.quantile(np.nanmean(stacked[:, defined], axis=0), [tail, 1.0 - tail])
        intervals[metric] = (float(low), float(high))
    return intervals


def bootstrap_interval(
    units: Sequence[pd.DataFrame],
    metric: str,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The interval of one metric (:func:`bootstrap_intervals`)."""
    return bootstrap_intervals(units, [metric], samples, seed, confidence)[metric]


def ms_per_token(frame: pd.DataFrame) -> pd.Series:
    """Per-token decode latency of each successful record with > 1 new token, in ms:
    (wall − prefill) / (new tokens − 1) (the prefill emits the first token)."""
    ok = frame[frame["error"].isna() & (frame["new_tokens"] > 1)] if "error" in frame.columns else frame
    return 1e3 * (ok["wall_s"] - ok["prefill_s"].fillna(0.0)) / (ok["new_tokens"] - 1)


def latency_percentiles(frame: pd.DataFrame) -> dict[str, float]:
    """``latency_p50_ms`` / ``_p95_ms`` / ``_p99_ms`` of :func:`ms_per_token` over the records (NaN if none)."""
    values = ms_per_token(frame).to_numpy(dtype=float)
    return {
        f"latency_p{p}_ms": float(np.percentile(values, p)) if len(values) else math.nan for p in LATENCY_PERCENTILES
    }
