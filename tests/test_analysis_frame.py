"""Tidy frame: run-level columns, the AR join (own run, dedicated AR run, never another machine),
aggregation over repeats (mean ± std, one definition via summarize), shards, parquet round trip.
The synthetic sweep is the ``analysis_sweep`` fixture (tests/conftest.py)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from decodebench.analysis.frame import aggregate, load_frame, read_parquet, save_parquet
from decodebench.runners.run_dir import RunDirectory

from helpers import make_record


def one(table: pd.DataFrame, method: str, group: str = "overall") -> pd.Series:
    found = table[(table["method"] == method) & (table["group"] == group)]
    assert len(found) == 1, (method, group, table[["method", "group"]])
    return found.iloc[0]


def test_frame_columns_and_join(analysis_sweep):
    frame = load_frame([analysis_sweep])
    assert len(frame) == 2 * 4 + 4 + 2 + 2 + 2
    for column in (
        "method_name",
        "lossless_method",
        "machine",
        "setting",
        "repeat",
        "run_dir",
        "baseline_index",
        "baseline_run",
        "ar_wall_s",
        "quality.exact_match",
    ):
        assert column in frame.columns
    assert set(frame["machine"]) == {"TestCPU/-/cpu/2/2", "OtherCPU/-/cpu/2/2"}
    assert set(frame.loc[frame["role"] == "baseline", "method_name"]) == {"ar"}

    pld = frame[(frame["method"] == "pld[cpu]") & frame["run_dir"].str.endswith("pld_s1")]
    assert (pld["baseline_run"] == pld["run_dir"]).all() and list(pld["ar_wall_s"]) == [1.0, 1.0]
    ar = frame[frame["role"] == "baseline"]
    assert (ar["baseline_index"] == ar.index).all()  # AR is its own baseline

    nobase = frame[frame["method"] == "pld[paper]"]  # no baseline of its own: the dedicated AR run
    assert nobase["baseline_run"].str.endswith("/ar").all() and list(nobase["ar_wall_s"]) == [0.8, 0.8]
    other = frame[frame["method"] == "pld[gpu]"]  # another machine: never joined
    assert other["baseline_index"].isna().all() and other["ar_wall_s"].isna().all()


def test_aggregate_mean_and_std_over_repeats(analysis_sweep):
    table = aggregate(load_frame([analysis_sweep]))
    pld = one(table, "pld[cpu]")
    assert pld.repeats == 2 and pld.records == 4
    assert pld.speedup == pytest.approx(2.25)  # 2.0 (pld_s0) and 2.5 (pld_s1)
    assert pld.speedup_std == pytest.approx(math.sqrt(2 * 0.25**2))
    assert (pld.tau, pld.alpha, pld.lossless_rate) == (pytest.approx(1.8), 0.5, 1.0)
    assert pld.tau_std == 0.0
    assert pld.per_position_acceptance == [1.0, 0.0]
    assert one(table, "pld[cpu]", "qa").speedup == pytest.approx(2.25)

    base = one(table, "ar (baseline)")
    assert (base.repeats, base.records, base.speedup, base.tau) == (3, 6, 1.0, 1.0)
    assert one(table, "ar").tokens_per_s == pytest.approx(9 / 0.8)
    skip = one(table, "skip")
    assert skip.speedup == 4.0 and skip["quality.exact_match"] == 0.5 and not skip.lossless_method
    assert math.isnan(skip.speedup_std)  # one repeat
    assert one(table, "pld[paper]").speedup == pytest.approx(2.0)
    assert math.isnan(one(table, "pld[gpu]").speedup)
    assert one(table, "pld[gpu]").tau == pytest.approx(1.8)


def test_shards_pool_into_one_repeat(tmp_path, analysis_builders):
    build = analysis_builders
    root = tmp_path / "shards"
    for index, (sid, group) in enumerate([("81", "mt_bench"), ("401", "qa")]):
        build.run(
            root,
            f"shard{index}",
            [build.ar("ar", "baseline", sid, group), build.method("pld[cpu]", sid, group)],
            "pld",
            shard=f"{index}/2",
        )
    row = one(aggregate(load_frame([root])), "pld[cpu]")
    assert (row.repeats, row.records, row.speedup) == (1, 2, 2.0)


def test_parquet_round_trip(tmp_path, analysis_sweep):
    frame = load_frame([analysis_sweep])
    back = read_parquet(save_parquet(frame, tmp_path / "out" / "records.parquet"))
    assert len(back) == len(frame)
    skip = back[back["method"] == "skip"]
    assert list(skip["tree_sizes"].iloc[0]) == [3, 3, 3, 3] and skip["quality"].iloc[0] == {"exact_match": 0.5}
    pd.testing.assert_frame_equal(
        aggregate(back).drop(columns="per_position_acceptance"),
        aggregate(frame).drop(columns="per_position_acceptance"),
        check_dtype=False,
    )


def test_errors_and_missing_fields(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.append_record(
        make_record(
            method="ar",
            role="baseline",
            new_tokens=4,
            wall_s=1.0,
            steps=4,
        )
    )
    run.append_record(
        make_record(
            method="pld",
            role="method",
            error="RuntimeError: boom",
        )
    )
    frame = load_frame([tmp_path])
    assert frame.loc[frame["role"] == "method", "baseline_run"].item() == str(run.path)
    row = one(aggregate(frame), "pld")
    assert (row.records, row.errors) == (1, 1) and math.isnan(row.speedup)
    assert frame["machine"].eq("unknown").all()
