"""The run summary (`kfacbench show`, the end of `kfacbench run`): one row per setting."""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.console import Console

from kfacbench.runs.summary import rich_summary, summary_frame, time_shares


def cells(**extra: list[float]) -> pd.DataFrame:
    """Two seeds of one SGD setting that reached the target, as the cells table holds them."""
    return pd.DataFrame(
        {
            "workload": "curves_ae",
            "optimizer": "sgd",
            "batch_size": 100,
            "inv_interval": math.nan,
            "seed": [0, 1],
            "hparams": json.dumps({"lr": 0.01}),
            "status": "ok",
            "final_train_loss": [60.0, 62.0],
            "final_eval_metric": [1.0, 1.1],
            "train_time_s": [100.0, 110.0],
            "time_to_target_s": [80.0, 90.0],
            "median_step_ms": [10.0, 12.0],
            "steps": [1000, 1000],
            **extra,
        }
    )


def rendered(frame: pd.DataFrame) -> str:
    console = Console(width=200, record=True)
    console.print(rich_summary(frame, "t"))
    return console.export_text()


def test_the_eval_before_the_target_is_shown_where_recorded() -> None:
    frame = summary_frame(cells(time_to_target_lo_s=[60.0, 70.0]))
    assert frame.loc[0, "time_to_target_s"] == 85.0
    assert frame.loc[0, "time_to_target_lo_s"] == 65.0
    text = rendered(cells(time_to_target_lo_s=[60.0, 70.0]))
    assert "not yet at s" in text and " 65 " in text
    # A run recorded before the column: no such column in the summary, nothing invented.
    old = summary_frame(cells())
    assert math.isnan(old.loc[0, "time_to_target_lo_s"])
    assert "not yet at s" not in rendered(cells())


def test_time_shares_split_the_cells_wall_time() -> None:
    """Training 210 s, evaluation 60, building 10, compiling 0 (not shown), the rest 20 of the
    cells' 300 s; runs recorded before the columns say nothing."""
    table = cells(
        wall_s=[140.0, 160.0],
        eval_s=[25.0, 35.0],
        build_s=[5.0, 5.0],
        compile_s=[0.0, 0.0],
    )
    assert time_shares(table) == (
        "the cells' wall time, 300 s: training 70%, evaluation 20%, building 3%, other 7%"
    )
    assert time_shares(cells()) == ""
    # Counting ops after training (ops_probe_s) is a part of its own, out of "other".
    counted = table.assign(ops_probe_s=[6.0, 9.0])
    assert time_shares(counted) == (
        "the cells' wall time, 300 s: training 70%, evaluation 20%, building 3%, counting ops 5%,"
        " other 2%"
    )


def test_the_amortized_step_leads_and_the_refresh_stands_beside_the_median() -> None:
    """A method that refreshes every 20 steps: 100 steps of 10 ms and 5 refreshes of 300 ms in
    2.5 s of training. Its median step says 10 ms; its cost is 25 ms a step, 60% of it the
    refresh. SGD (no inverse phase) has no refresh columns."""
    table = pd.DataFrame(
        {
            "cell_id": ["k", "s"],
            "workload": "curves_ae",
            "optimizer": ["kfac", "sgd"],
            "batch_size": 100,
            "inv_interval": [20.0, math.nan],
            "seed": 0,
            "hparams": "{}",
            "status": "ok",
            "final_train_loss": 1.0,
            "final_eval_metric": 1.0,
            "train_time_s": [2.5, 1.0],
            "time_to_target_s": math.nan,
            "median_step_ms": [10.0, 10.0],
            "steps": [100, 100],
        }
    )
    phases = pd.DataFrame(
        {
            "cell_id": ["k", "k", "s"],
            "phase": ["inverse", "step", "step"],
            "median_ms": [300.0, 10.0, 10.0],
            "total_s": [1.5, 2.5, 1.0],
        }
    )
    frame = summary_frame(table, phases).set_index("optimizer")
    assert frame.loc["kfac", "amortized_ms"] == 25.0 and frame.loc["sgd", "amortized_ms"] == 10.0
    assert frame.loc["kfac", "refresh_ms"] == 300.0
    assert frame.loc["kfac", "refresh_share"] == 0.6
    assert math.isnan(frame.loc["sgd", "refresh_ms"])
    console = Console(width=250, record=True)
    console.print(rich_summary(table, "t", phases))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "ms/step" in line)
    assert header.index("ms/step") < header.index("median step ms") < header.index("refresh ms")
    assert " 25 " in text and " 300 " in text and " 60 " in text
    # Without the phases table, or with an empty one (every cell failed): no refresh columns.
    assert "refresh ms" not in rendered(cells())
    assert summary_frame(cells(), pd.DataFrame())["refresh_ms"].isna().all()


def test_the_step_ops_stand_beside_the_times_where_counted() -> None:
    """Two seeds of K-FAC-fast whose plain steps counted 300 and 302 ops and refresh steps 500:
    the summary shows the median over seeds, as whole numbers. A run recorded before ops were
    counted (no such columns) and a cell not counted (NaN) show none."""
    table = cells(cell_id=["a", "b"])
    phases = pd.DataFrame(
        {
            "cell_id": ["a", "a", "b", "b"],
            "phase": ["step", "forward", "step", "forward"],
            "median_ms": 1.0,
            "total_s": 1.0,
            "ops_per_step": [300.0, 40.0, 302.0, 40.0],
            "refresh_ops": [500.0, 40.0, 500.0, 40.0],
        }
    )
    frame = summary_frame(table, phases)
    assert frame.loc[0, "ops_per_step"] == 301.0 and frame.loc[0, "refresh_ops"] == 500.0
    console = Console(width=250, record=True)
    console.print(rich_summary(table, "t", phases))
    text = console.export_text()
    assert "ops/step" in text and "refresh ops" in text and " 301 " in text and " 500 " in text
    old = phases.drop(columns=["ops_per_step", "refresh_ops"])
    assert summary_frame(table, old)["ops_per_step"].isna().all()
    uncounted = phases.assign(ops_per_step=math.nan, refresh_ops=math.nan)
    for without in (old, uncounted):
        console = Console(width=250, record=True)
        console.print(rich_summary(table, "t", without))
        assert "ops" not in console.export_text()
