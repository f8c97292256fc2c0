"""Summary tables of a run: one row per optimizer × setting, medians over seeds."""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.table import Table

from kfacbench.core.timing import REFRESH_PHASE, STEP
from kfacbench.machine_load import busy_cells
from kfacbench.runs.rundir import amortized_step_ms

TEXT_COLUMNS = {"workload", "optimizer", "setting", "status"}


def varying_hparams(cells: pd.DataFrame) -> pd.Series:
    """For each cell, the hyperparameters whose values differ within its optimizer's cells, its
    ``compile`` mode when not ``off``, and ``cuda_graph`` when its steps were graphed."""
    parsed = cells["hparams"].map(json.loads)
    out = pd.Series("", index=cells.index, dtype=object)
    for _, group in cells.groupby("optimizer"):
        hp = parsed.loc[group.index]
        keys = sorted({k for d in hp for k in d})
        varying = [k for k in keys if len({json.dumps(d.get(k)) for d in hp}) > 1]
        out.loc[group.index] = hp.map(lambda d, v=varying: " ".join(f"{k}={d.get(k)}" for k in v))
    if "compile" in cells:  # a run setting, and a sweep axis of its own (cells before: no column)
        mode = cells["compile"].fillna("off").astype(str)
        # Element by element: a Python str added to an arrow-backed string column fails on
        # some pandas versions (an empty object column becomes arrow's null type).
        for i in mode.index[mode != "off"]:
            out[i] = f"{out[i]} compile={mode[i]}".strip()
    if "cuda_graph" in cells:  # likewise (cells before: no column)
        for i in cells.index[cells["cuda_graph"].fillna(False).astype(bool)]:
            out[i] = f"{out[i]} cuda_graph".strip()
    return out


def summary_frame(cells: pd.DataFrame, phases: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per setting (seeds pooled): seeds, statuses, median final losses, times and step cost,
    and how many of its cells ran on a busy machine (:mod:`kfacbench.machine_load`).

    The step cost that compares methods is amortized: training time / steps, every refresh
    included (``amortized_ms``). The median step (``median_step_ms``) is the non-refresh step,
    and with ``phases`` the refresh is beside it: the median ``inverse`` phase per refresh
    (``refresh_ms``) and the share of the training time spent in it (``refresh_share``). A
    median alone hides the refresh: K-FAC-fast refreshing every 20 steps on faces_ae read 1.75×
    SGD by median step on an H200 and 5.7× by training time / steps.

    With ``phases`` recorded with op counts, the ops of the step beside them: ``ops_per_step``
    (the non-refresh step) and ``refresh_ops`` (a refresh step), counted on untimed probe steps
    (:mod:`kfacbench.core.opcount`); NaN for runs recorded before them.
    """
    busy = busy_cells(cells).index
    cells = cells.assign(
        setting=varying_hparams(cells),
        ok=cells["status"].eq("ok"),
        busy=cells.index.isin(busy),
        amortized_ms=amortized_step_ms(cells),
        refresh_ms=math.nan,
        refresh_share=math.nan,
        ops_per_step=math.nan,
        refresh_ops=math.nan,
    )
    if phases is not None and not phases.empty:  # a run whose every cell failed has none
        refresh = phases[phases["phase"] == REFRESH_PHASE].set_index("cell_id")
        cells["refresh_ms"] = cells["cell_id"].map(refresh["median_ms"])
        cells["refresh_share"] = cells["cell_id"].map(refresh["total_s"]) / cells["train_time_s"]
        step = phases[phases["phase"] == STEP].set_index("cell_id")
        for column in ("ops_per_step", "refresh_ops"):
            if column in step:  # runs recorded before ops were counted have neither
                cells[column] = cells["cell_id"].map(step[column])
    if "compile_s" not in cells:  # runs recorded before compiled steps existed
        cells["compile_s"] = 0.0
    if "time_to_target_lo_s" not in cells:  # ... and before the eval interval was recorded
        cells["time_to_target_lo_s"] = math.nan
    keys = ["workload", "optimizer", "batch_size", "inv_interval", "setting"]
    grouped = cells.groupby(keys, dropna=False, sort=True)
    frame = grouped.agg(
        seeds=("seed", "nunique"),
        ok=("ok", "sum"),
        status=("status", lambda s: ",".join(sorted(set(s)))),
        final_train_loss=("final_train_loss", "median"),
        final_eval_metric=("final_eval_metric", "median"),
        train_time_s=("train_time_s", "median"),
        time_to_target_s=("time_to_target_s", "median"),
        time_to_target_lo_s=("time_to_target_lo_s", "median"),
        amortized_ms=("amortized_ms", "median"),
        median_step_ms=("median_step_ms", "median"),
        refresh_ms=("refresh_ms", "median"),
        refresh_share=("refresh_share", "median"),
        ops_per_step=("ops_per_step", "median"),
        refresh_ops=("refresh_ops", "median"),
        compile_s=("compile_s", "median"),
        busy=("busy", "sum"),
    ).reset_index()
    return frame


def time_shares(cells: pd.DataFrame) -> str:
    """Where the cells' wall time went, e.g. ``the cells' wall time, 62 s: training 93%,
    evaluation 4%, building 2%, other 1%``; ``""`` for runs recorded before it was measured.

    Training is the timed steps (``train_time_s``); compiling, evaluation, building and counting
    ops (the untimed probe steps after training, ``ops_probe_s``) are kept off that clock, and
    ``other`` is the rest (read-backs, the machine-load sampler, the flush probe). A timing suite
    whose cells spend their wall time elsewhere measures little for what it costs.
    """
    if "wall_s" not in cells or not cells["wall_s"].notna().any():
        return ""
    timed = cells[cells["wall_s"].notna()]
    wall = float(timed["wall_s"].sum())
    parts = {
        "training": timed["train_time_s"],
        "compiling": timed["compile_s"],
        "evaluation": timed["eval_s"],
        "building": timed["build_s"],
        # Runs recorded before ops were counted: none.
        "counting ops": timed.get("ops_probe_s", pd.Series(0.0, index=timed.index)),
    }
    seconds = {name: float(col.fillna(0).sum()) for name, col in parts.items()}
    seconds["other"] = max(wall - sum(seconds.values()), 0.0)
    shown = ", ".join(
        f"{name} {value / wall:.0%}"
        for name, value in seconds.items()
        if name in ("training", "evaluation") or value > 0.005 * wall
    )
    return f"the cells' wall time, {wall:.0f} s: {shown}"


def rich_summary(cells: pd.DataFrame, title: str, phases: pd.DataFrame | None = None) -> Table:
    """The summary as a rich table for the terminal: the amortized step first, the median step
    and (with ``phases``) the refresh beside it."""
    frame = summary_frame(cells, phases)
    table = Table(title=title)
    headers = {
        "workload": "workload",
        "optimizer": "optimizer",
        "batch_size": "batch",
        "inv_interval": "T_inv",
        "setting": "setting",
        "status": "status",
        "final_train_loss": "train loss",
        "final_eval_metric": "eval metric",
        "train_time_s": "train s",
        "time_to_target_s": "to target s",
    }
    if frame["time_to_target_lo_s"].notna().any():  # the eval before, which had not reached it
        headers["time_to_target_lo_s"] = "not yet at s"
    headers["amortized_ms"] = "ms/step"
    headers["median_step_ms"] = "median step ms"
    if frame["refresh_ms"].notna().any():  # methods that refresh: what each refresh costs
        headers["refresh_ms"] = "refresh ms"
        headers["refresh_share"] = "refresh %"
    if frame["ops_per_step"].notna().any():  # the launch-cost proxy, where it was counted
        headers["ops_per_step"] = "ops/step"
    if frame["refresh_ops"].notna().any():
        headers["refresh_ops"] = "refresh ops"
    if (frame["compile_s"] > 0).any():  # kept out of "train s" and "step ms"
        headers["compile_s"] = "compile s"
    if frame["busy"].any():  # cells timed while other processes used the CPUs
        headers["busy"] = "busy"
    for key, head in headers.items():
        table.add_column(head, justify="left" if key in TEXT_COLUMNS else "right")
    frame["refresh_share"] = frame["refresh_share"] * 100
    for column in ("ops_per_step", "refresh_ops"):  # counts: whole numbers, not 4 digits
        frame[column] = frame[column].round().astype("Int64")
    for rec in frame.to_dict("records"):
        table.add_row(*(_fmt(rec[k]) for k in headers))
    table.caption = (
        "ms/step: training time / steps, refreshes included; median step: the non-refresh step"
        + (
            "; refresh: the inverse phase per refresh and its share of training"
            if "refresh_ms" in headers
            else ""
        )
        + (
            "; ops: aten ops (kernel launches on a GPU) of the step, counted on untimed steps"
            if "ops_per_step" in headers or "refresh_ops" in headers
            else ""
        )
    )
    return table


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
