"""Merging the run directories of a sweep: shards and shared baselines.

Shards: ``shard=i/n`` runs of one configuration hold disjoint slices of its samples. The report
pools records by (model, task, method), so shards merge by construction; :func:`shard_problems`
says when a family of shards is incomplete (a missing ``i``), duplicated, or mixed with an
unsharded run of the same configuration (samples counted twice).

Shared baselines: a run with ``baseline=shared`` measured no AR baseline itself. Its baseline is
the ``method=ar`` run of the same sweep with the same ``baseline_key`` that decoded the same
prompts (model, task, generation settings, seed, shard) on the same NODE TYPE (CPU model, GPU
model, device, core count, threads; the host may differ). :func:`attach_shared_baselines` copies
that run's records into the consumer as ``role=baseline`` rows (``baseline_source`` names the
origin), so the report pairs them exactly like in-process baselines, and audits greedy lossless
methods against them. No baseline from another node type is ever used: without a match the run's
speedup stays empty and a warning names it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

log = logging.getLogger(__name__)

# Keys that say where or how a run was executed, not what it measured.
WHERE_KEYS = ("run_dir", "progress", "overwrite", "logger", "data_dir", "cache_dir", "results_dir")
# What must be equal for an AR run to be another run's baseline (besides key and node type).
SAME_PROMPTS_KEYS = ("model", "task", "gen", "seed", "shard", "device", "dtype", "threads")


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def node_type(run_dir: Path) -> tuple | None:
    """Hardware fingerprint from ``manifest.json`` (host excluded: same node type, any node)."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    hardware = manifest.get("hardware") or {}
    return (
        hardware.get("cpu"),
        hardware.get("gpu"),
        hardware.get("device"),
        hardware.get("cpu_count"),
        manifest.get("threads"),
    )


def _digest(config: dict[str, Any], drop: tuple[str, ...]) -> str:
    kept = {k: v for k, v in config.items() if k not in drop}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_problems(run_dirs: list[Path]) -> list[str]:
    """Incomplete, duplicated or overlapping shard families among ``run_dirs`` (empty = fine)."""
    families: dict[str, list[tuple[str | None, Path]]] = {}
    for run_dir in run_dirs:
        config = read_config(run_dir)
        if config:
            families.setdefault(_digest(config, WHERE_KEYS + ("shard",)), []).append((config.get("shard"), run_dir))
    problems = []
    for members in families.values():
        shards = [s for s, _ in members if s is not None]
        if not shards:
            continue
        dirs = ", ".join(sorted(str(d) for _, d in members))
        if len(shards) < len(members):
            problems.append(f"sharded and unsharded runs of the same configuration are pooled: {dirs}")
        counts = {int(str(s).split("/")[1]) for s in shards}
        if len(counts) > 1:
            problems.append(f"shards of one configuration use different counts {sorted(counts)}: {dirs}")
            continue
        count = counts.pop()
        indices = [int(str(s).split("/")[0]) for s in shards]
        missing = sorted(set(range(count)) - set(indices))
        duplicated = sorted({i for i in indices if indices.count(i) > 1})
        if missing:
            problems.append(f"missing shard(s) {', '.join(f'{i}/{count}' for i in missing)} of: {dirs}")
        if duplicated:
            problems.append(f"duplicated shard(s) {', '.join(f'{i}/{count}' for i in duplicated)} in: {dirs}")
    return problems


def _first_divergence(ours: list[int], theirs: list[int]) -> int | None:
    if ours == theirs:
        return None
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))


def _audit(method_rows: pd.DataFrame, baseline_rows: pd.DataFrame) -> pd.DataFrame:
    """Lossless audit of greedy method rows against shared-baseline rows (same sample and turn)."""
    reference = {
        (r["sample_id"], r["turn"]): r["output_ids"]
        for _, r in baseline_rows.iterrows()
        if not isinstance(r.get("error"), str)
    }
    method_rows = method_rows.astype({"lossless": object, "first_divergence": object})
    for index, row in method_rows.iterrows():
        theirs = reference.get((row["sample_id"], row["turn"]))
        if theirs is None or isinstance(row.get("error"), str) or not isinstance(row["output_ids"], list):
            continue
        divergence = _first_divergence(row["output_ids"], theirs)
        method_rows.at[index, "lossless"] = divergence is None
        method_rows.at[index, "first_divergence"] = divergence
    return method_rows


def attach_shared_baselines(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the shared AR baseline's records to every ``baseline=shared`` run of ``frame``.

    Args:
        frame: one row per record with a ``run_dir`` column (see ``report.load_records``).

    Returns:
        ``frame`` plus ``role=baseline`` copies (column ``baseline_source`` = the AR run dir); the
        consumers' greedy lossless-method rows get ``lossless`` / ``first_divergence``.
    """
    run_dirs = list(dict.fromkeys(frame["run_dir"]))
    configs = {d: read_config(Path(d)) for d in run_dirs}
    consumers = [d for d in run_dirs if configs[d].get("baseline") == "shared"]
    if not consumers:
        return frame
    if "baseline_source" not in frame.columns:
        frame = frame.assign(baseline_source=None)
    providers = [d for d in run_dirs if (configs[d].get("method") or {}).get("name") == "ar"]
    added, audited = [], {}
    for consumer in consumers:
        config = configs[consumer]
        wanted = ({k: config.get(k) for k in SAME_PROMPTS_KEYS}, config.get("baseline_key"), node_type(Path(consumer)))
        match = next(
            (
                p
                for p in providers
                if (
                    {k: configs[p].get(k) for k in SAME_PROMPTS_KEYS},
                    configs[p].get("baseline_key"),
                    node_type(Path(p)),
                )
                == wanted
            ),
            None,
        )
        if match is None:
            log.warning(
                "%s: no method=ar run with baseline_key=%s on the same node type and prompts; its speedup stays empty",
                consumer,
                config.get("baseline_key"),
            )
            continue
        copies = frame[(frame["run_dir"] == match) & (frame["role"] == "method")].copy()
        copies["role"], copies["run_dir"], copies["baseline_source"] = "baseline", consumer, match
        added.append(copies)
        greedy = float((config.get("gen") or {}).get("temperature") or 0.0) == 0.0
        if greedy and (config.get("method") or {}).get("lossless"):
            audited[consumer] = _audit(frame[frame["run_dir"] == consumer], copies)
    if audited:
        frame = frame.astype({"lossless": object, "first_divergence": object})  # bools and ints beside nulls
        for rows in audited.values():
            frame.loc[rows.index, ["lossless", "first_divergence"]] = rows[["lossless", "first_divergence"]]
    return pd.concat([frame, *added], ignore_index=True) if added else frame
