"""Cost model: predicted speedup from τ, the draft/verify counts and the verify-latency curve.

The verify-latency curve ``T(k)`` (seconds of one target forward of ``k`` new tokens on top of a
context; ``decodebench-profile``) says what a speculative step costs relative to a plain AR step.
For a method's records, decode phase only (the prefill is the same for AR and the method)::

    predicted speedup = tokens per step / (T(k_step)/T(1) + draft cost share)
                      = Σ decode tokens · T(1) / Σ_steps [T(tree_size) + draft time]

with ``tokens per step`` = emitted decode tokens / decode steps, ``T(k_step)/T(1)`` the mean curve
ratio at each step's tree size (Record.tree_sizes: tokens in the target forward, root included) and
``draft cost share`` = draft time per step / T(1). ``T(1)`` is the AR step time measured in the
same run (Σ AR verify time / Σ AR decode steps of the joined baseline records), else the curve's
own ``T(1)``. Curve ratios between measured block sizes are interpolated linearly, beyond the
largest one extrapolated from the last two points.

Next to it the measured time is split into prefill / draft / verify / overhead (= wall − the three:
sampling, bookkeeping, Python) and ``predicted verify s`` (Σ T1 · ratio) can be compared with the
measured verify time: a gap there means the curve (context length, threads, machine) does not
describe the run; a gap between predicted and measured decode speedup that the verify columns do
not explain is overhead.

Curves: ``--curve PATH`` (a JSON file, or a folder such as ``$DECODEBENCH_CACHE/profiles`` searched
for the curve of each run's model, device and thread count) wins; else a curve saved in the run
dir (``latency_curve.json``, or ``verify_curve.json``) is used. Two formats are read: the
profiler's ``{"model", "backend", "device", "threads", "context", "k": [...], "ms": [...],
"ratio": [...]}`` and the older ``benchmarks/profile_verify.py`` one, ``{"model", "context",
"threads", "hardware": {...}, "seconds": {"k": s}}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from decodebench.analysis.frame import is_ar, labelled, read_config
from decodebench.analysis.report import OVERALL
from decodebench.records import summarize_frame
from decodebench.registry import DecodeBenchError

RUN_CURVE_FILES = ("latency_curve.json", "verify_curve.json")
# The prediction next to the measured speedup and time split: what the paper's cost table shows.
PREDICTION_METRICS = [
    "tokens_per_step",
    "verify_ratio",
    "draft_share",
    "predicted_speedup",
    "measured_decode_speedup",
    "measured_speedup",
    "prefill_frac",
    "draft_frac",
    "verify_frac",
    "overhead_frac",
]
COLUMNS = ["model", "task", "method", "group", *PREDICTION_METRICS, "predicted_verify_s", "verify_s", "t1_ms", "curve"]


@dataclass
class LatencyCurve:
    """Verify latency per block size: ``ratio[i]`` = T(k[i]) / T(1); ``ms`` when measured in ms."""

    k: list[int]
    ratio: list[float]
    ms: list[float] | None = None
    model: str | None = None
    device: str | None = None
    threads: int | None = None
    context: int | None = None
    backend: str | None = None
    source: str = ""  # the file it was read from
    extra: dict[str, Any] = field(default_factory=dict)

    def ratio_at(self, k: float) -> float:
        """T(k)/T(1), linear between measured sizes, extrapolated beyond the largest (never < 0)."""
        ks, ratios = np.asarray(self.k, dtype=float), np.asarray(self.ratio, dtype=float)
        if len(ks) == 1 or k <= ks[-1]:
            return float(np.interp(k, ks, ratios))
        slope = (ratios[-1] - ratios[-2]) / (ks[-1] - ks[-2])
        return max(0.0, float(ratios[-1] + slope * (k - ks[-1])))

    @property
    def t1_s(self) -> float | None:
        """Seconds of a 1-token forward on the profiled machine (None without absolute times)."""
        if not self.ms or 1 not in self.k:
            return None
        return self.ms[self.k.index(1)] / 1e3


def parse_curve(data: dict[str, Any], source: str = "") -> LatencyCurve:
    """A :class:`LatencyCurve` from either JSON format (module docstring).

    Raises:
        DecodeBenchError: neither format, or an empty curve.
    """
    if "k" in data:
        ks = [int(k) for k in data["k"]]
        ms = [float(v) for v in data["ms"]] if data.get("ms") else None
        if data.get("ratio"):
            ratios = [float(v) for v in data["ratio"]]
        elif ms and 1 in ks:
            ratios = [v / ms[ks.index(1)] for v in ms]
        else:
            raise DecodeBenchError(f"{source}: a curve needs 'ratio', or 'ms' with k=1")
        device, extra = data.get("device"), {}
    elif "seconds" in data:  # benchmarks/profile_verify.py
        seconds = sorted((int(k), float(v)) for k, v in data["seconds"].items())
        ks = [k for k, _ in seconds]
        ms = [v * 1e3 for _, v in seconds]
        if 1 not in ks:
            raise DecodeBenchError(f"{source}: the 'seconds' curve has no k=1")
        ratios = [v / ms[ks.index(1)] for v in ms]
        device, extra = (data.get("hardware") or {}).get("device"), {"hardware": data.get("hardware")}
    else:
        raise DecodeBenchError(f"{source}: not a verify-latency curve (expected 'k'/'ratio' or 'seconds')")
    if not ks:
        raise DecodeBenchError(f"{source}: empty verify-latency curve")
    order = sorted(range(len(ks)), key=ks.__getitem__)
    return LatencyCurve(
        k=[ks[i] for i in order],
        ratio=[ratios[i] for i in order],
        ms=[ms[i] for i in order] if ms else None,
        model=data.get("model"),
        device=device,
        threads=data.get("threads"),
        context=data.get("context"),
        backend=data.get("backend"),
        source=source,
        extra=extra,
    )


def load_curve(path: str | Path) -> LatencyCurve:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DecodeBenchError(f"cannot read verify-latency curve {path}: {error}") from error
    return parse_curve(data, str(path))


def _matches(curve: LatencyCurve, config: dict[str, Any], threads: int | None) -> bool:
    model = (config.get("model") or {}).get("name")
    device = str(config.get("device") or "cpu")
    return (
        (curve.model in (None, model))
        and (curve.device in (None, device) or device.startswith(str(curve.device)))
        and (threads is None or curve.threads in (None, threads))
    )


def curve_for_run(run_dir: str | Path, option: str | Path | None = None) -> LatencyCurve | None:
    """The curve that describes ``run_dir``: ``option`` (file, or folder searched by model/device/
    threads) first, else one saved in the run dir; None when there is none."""
    run_dir = Path(run_dir)
    if option is not None and Path(option).is_file():
        return load_curve(option)
    if option is not None and Path(option).is_dir():
        config = read_config(run_dir)
        manifest_path = run_dir / "manifest.json"
        threads = json.loads(manifest_path.read_text()).get("threads") if manifest_path.exists() else None
        for path in sorted(Path(option).glob("*.json")):
            try:
                curve = load_curve(path)
            except DecodeBenchError:
                continue
            if _matches(curve, config, threads):
                return curve
    for name in RUN_CURVE_FILES:
        if (run_dir / name).is_file():
            return load_curve(run_dir / name)
    return None


def _ar_step_s(frame: pd.DataFrame) -> dict[str, float]:
    """Measured AR step time per run dir: Σ verify time / Σ decode steps of its AR records."""
    ar = frame[is_ar(frame) & frame["error"].isna() & (frame["steps"] > 1)]
    sums = ar.groupby("run_dir")[["verify_s", "steps"]].sum()
    decode_steps = sums["steps"] - ar.groupby("run_dir").size()
    return (sums["verify_s"] / decode_steps).dropna().to_dict()


def _sizes(row: dict[str, Any]) -> list[int]:
    """Per decode step tokens in the target forward (tree_sizes; drafted + 1 for old records)."""
    if isinstance(row.get("tree_sizes"), list) and row["tree_sizes"]:
        return row["tree_sizes"]
    if isinstance(row.get("drafted_lengths"), list):
        return [d + 1 for d in row["drafted_lengths"]]
    return []


def _nan(value: Any) -> float:
    """A summary value as a float, NaN where it is missing."""
    return math.nan if value is None or pd.isna(value) else float(value)


def predict(rows: pd.DataFrame, curves: dict[str, LatencyCurve | None], t1: dict[str, float]) -> dict[str, Any]:
    """Cost-model numbers of one set of method records (module docstring); NaN where unknown."""
    tokens = steps = verify_units = draft_units = 0.0
    ar_tokens_s = method_s = predicted_verify = 0.0
    used = []
    for row in rows[rows["error"].isna()].to_dict("records"):
        curve, sizes = curves.get(row["run_dir"]), _sizes(row)
        step_s = t1.get(row["run_dir"]) or (curve.t1_s if curve else None)
        if curve is None or not sizes or not step_s:
            continue
        used.append(Path(curve.source).name)
        ratio = sum(curve.ratio_at(k) for k in sizes)
        draft_s = 0.0 if pd.isna(row.get("draft_s")) else float(row["draft_s"])
        tokens += row["new_tokens"] - 1  # the prefill emits the first token
        steps += len(sizes)
        verify_units += ratio
        draft_units += draft_s / step_s
        ar_tokens_s += (row["new_tokens"] - 1) * step_s
        method_s += ratio * step_s + draft_s
        predicted_verify += ratio * step_s
    if not steps:
        return {"curve": None}
    return {
        "tokens_per_step": tokens / steps,
        "verify_ratio": verify_units / steps,
        "draft_share": draft_units / steps,
        "predicted_speedup": ar_tokens_s / method_s if method_s else math.nan,
        "predicted_verify_s": predicted_verify,
        "curve": ", ".join(dict.fromkeys(used)),
    }


def measured(rows: pd.DataFrame) -> dict[str, Any]:
    """Measured time split of the records and their speedup over the joined AR, pooled over the rows
    (the definitions of ``records.summarize_frame``), and the decode-phase speedup (prefill excluded)."""
    summary = summarize_frame(rows)
    paired = rows[rows["error"].isna() & rows["ar_wall_s"].notna()]
    decode = (paired["wall_s"] - paired["prefill_s"].fillna(0.0)).sum()
    ar_decode = (paired["ar_wall_s"] - paired["ar_prefill_s"].fillna(0.0)).sum()
    return {
        "measured_speedup": _nan(summary["speedup"]),
        "measured_decode_speedup": ar_decode / decode if len(paired) and decode else math.nan,
        "prefill_frac": _nan(summary["prefill_share"]),
        "draft_frac": _nan(summary["draft_share"]),
        "verify_frac": _nan(summary["verify_share"]),
        "overhead_frac": _nan(summary["overhead_share"]),
        "verify_s": summary["verify_s"],
    }


def curves_for(frame: pd.DataFrame, option: str | Path | None = None) -> dict[str, LatencyCurve | None]:
    return {run_dir: curve_for_run(run_dir, option) for run_dir in dict.fromkeys(frame["run_dir"])}


def cost_table(frame: pd.DataFrame, curves: dict[str, LatencyCurve | None], by_group: bool = False) -> pd.DataFrame:
    """One row per (model, task, method[, group]) plus ``overall``: predicted next to measured.

    Args:
        frame: :func:`decodebench.analysis.frame.load_frame` output.
        curves: run dir → curve (:func:`curves_for`); runs without one get no prediction.
        by_group: also one row per category group (else ``overall`` only).
    """
    t1 = _ar_step_s(frame)
    rows = []
    data = labelled(frame)
    groups = list(dict.fromkeys(frame["group"])) if by_group else []
    for (model, task, method), method_rows in data.groupby(["model", "task", "method"], sort=False):
        for group in [*groups, OVERALL]:
            in_group = method_rows if group == OVERALL else method_rows[method_rows["group"] == group]
            if in_group.empty:
                continue
            values = {**measured(in_group), **predict(in_group, curves, t1)}
            step = [t1[d] for d in dict.fromkeys(in_group["run_dir"]) if d in t1]
            values["t1_ms"] = 1e3 * sum(step) / len(step) if step else math.nan
            rows.append({"model": model, "task": task, "method": method, "group": group, **values})
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    order = {key: i for i, key in enumerate(dict.fromkeys(zip(frame["model"], frame["task"])))}
    position = [order[key] for key in zip(table["model"], table["task"])]
    return table.iloc[sorted(range(len(table)), key=position.__getitem__)].reset_index(drop=True)
