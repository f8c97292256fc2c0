"""The report's memory table on hand-made cells: medians over seeds, ratios to the SGD cells of
the same suite, workload and batch size, and the cells that ran out of memory."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from kfacbench.report.data import ReportData
from kfacbench.report.document import markdown, sections
from kfacbench.report.memory import mebibytes, memory_display, memory_table

NAN = math.nan


def cell(setting: str, optimizer: str, batch: int, seed: int, **kw: Any) -> dict[str, Any]:
    row = {
        "suite": "s",
        "workload": "w",
        "batch_size": batch,
        "setting": f"w {setting}",
        "optimizer": optimizer,
        "seed": seed,
        "status": "ok",
        "state_mb": NAN,
        "curvature_state_mb": NAN,
        "peak_mem_over_baseline_mb": NAN,
        "oom_request_mb": NAN,
    }
    return row | kw


CELLS = [
    cell("sgd bs=100", "sgd", 100, 0, state_mb=2.0, curvature_state_mb=0.0,
         peak_mem_over_baseline_mb=10.0),
    cell("sgd bs=100", "sgd", 100, 1, state_mb=2.0, curvature_state_mb=0.0,
         peak_mem_over_baseline_mb=14.0),
    cell("kfac bs=100", "kfac", 100, 0, state_mb=9.0, curvature_state_mb=7.0,
         peak_mem_over_baseline_mb=36.0),
    cell("kfac bs=100", "kfac", 100, 1, state_mb=9.0, curvature_state_mb=7.0,
         peak_mem_over_baseline_mb=48.0),
    cell("skfac bs=100", "skfac", 100, 0, state_mb=3.0, curvature_state_mb=1.0),
    cell("skfac bs=100", "skfac", 100, 1, status="oom", oom_request_mb=1536.0),
    cell("kfac bs=500", "kfac", 500, 0, status="oom", oom_request_mb=NAN),
]  # fmt: skip
"""SGD 2 MiB of momentum, its peak over the baseline 12 MiB (median of 10 and 14); K-FAC 9 MiB
of which 7 are curvature, peak 42; SKFAC's second seed ran out of memory asking for 1.5 GiB; at
batch 500 only K-FAC, out of memory without a size in the message (and no SGD to divide by)."""


def test_memory_by_hand() -> None:
    table = memory_table(pd.DataFrame(CELLS)).set_index("setting")
    assert list(table.index) == ["w sgd bs=100", "w kfac bs=100", "w skfac bs=100", "w kfac bs=500"]
    kfac = table.loc["w kfac bs=100"]
    assert (kfac["state_mib"], kfac["curvature_mib"], kfac["state_vs_sgd"]) == (9.0, 7.0, 4.5)
    assert (kfac["peak_over_baseline_mib"], kfac["peak_vs_sgd"]) == (42.0, 3.5)
    skfac = table.loc["w skfac bs=100"]
    assert skfac["state_vs_sgd"] == 1.5 and math.isnan(skfac["peak_vs_sgd"])
    assert skfac["out_of_memory"] == "out of memory: tried to allocate 1.50 GiB (1 of 2 seeds)"
    big = table.loc["w kfac bs=500"]
    assert math.isnan(big["state_mib"]) and math.isnan(big["state_vs_sgd"])
    assert big["out_of_memory"] == "out of memory (1 of 1 seeds)"
    assert table.loc["w sgd bs=100", "out_of_memory"] == ""
    shown = memory_display(memory_table(pd.DataFrame(CELLS)))
    assert list(shown["state vs SGD"]) == ["1×", "4.5×", "1.5×", "-"]
    assert list(shown["peak vs SGD"]) == ["1×", "3.5×", "-", "-"]


def test_another_suite_or_baseline_divides_by_its_own() -> None:
    other = [c | {"suite": "t"} for c in CELLS if c["optimizer"] == "kfac"]
    table = memory_table(pd.DataFrame(CELLS + other))
    assert table["state_vs_sgd"].isna().sum() == 3  # suite t's K-FAC and batch 500 have no SGD
    adam = [cell("adamw bs=100", "adamw", 100, 0, state_mb=3.0, peak_mem_over_baseline_mb=21.0)]
    by_adamw = memory_table(pd.DataFrame(CELLS + adam), "adamw").set_index("setting")
    assert by_adamw.index[0] == "w adamw bs=100"  # the baseline leads its batch size
    assert by_adamw.loc["w kfac bs=100", "state_vs_adamw"] == 3.0
    assert by_adamw.loc["w kfac bs=100", "peak_vs_adamw"] == 2.0


def test_runs_from_before_the_memory_columns_get_no_memory_section() -> None:
    old = pd.DataFrame(CELLS).drop(columns=["state_mb", "curvature_state_mb", "oom_request_mb"])
    assert memory_table(old).empty
    for frame, shown in ((old, False), (pd.DataFrame(CELLS), True)):
        frame = frame.assign(
            label=frame["setting"] + " seed=" + frame["seed"].astype(str),
            cell_id=[f"c{i}" for i in range(len(frame))],
            inv_interval=NAN,
            steps=10,
            train_time_s=1.0,
            time_to_target_s=NAN,
            median_step_ms=100.0,
            data_mode="synthetic",
            hparams="{}",
        )
        data = ReportData(frame, pd.DataFrame(), pd.DataFrame(), None, [], [])
        md = markdown("t", sections(data, [], [], None, [], None))
        assert ("## Memory" in md) == shown
        if shown:
            assert "out of memory: tried to allocate 1.50 GiB (1 of 2 seeds)" in md


def test_sizes_for_a_reader() -> None:
    assert [mebibytes(v) for v in (0.5, 17.0, 170.0, 1536.0, 2.0**40)] == [
        "0.50 MiB",
        "17.0 MiB",
        "170 MiB",
        "1.50 GiB",
        "1048576 TiB",
    ]
