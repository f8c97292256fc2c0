"""Every table's columns, in one place: what a run directory's parquet tables hold, the regression
baseline's lines, and what each column holds.

- ``cells``: one row per cell (:data:`CELL_COLUMNS`, written by :mod:`kfacbench.runs.store`);
- ``curves`` and ``phases``: long tables, one row per cell and logged step or phase;
- ``kernels``: ``kfacbench profile``'s per-kernel rows (:data:`KERNEL_COLUMNS`);
- ``diagnostics``: ``kfacbench diagnose``'s rows (:data:`DIAGNOSTIC_COLUMNS`);
- the regression record and baseline files of ``kfacbench regress`` (:data:`RECORD_COLUMNS`).

Readers check the columns they use by name (:data:`KINDS`, :data:`ROW_KEYS`, and
:func:`kfacbench.runs.rundir.read_table`).
"""

from __future__ import annotations

from typing import Literal

from kfacbench.machine_load import COLUMNS as LOAD_COLUMNS

TABLES = ("cells", "curves", "phases")
"""The tables of every run directory, rebuilt from ``parts/`` after each finished cell."""

CELL_COLUMNS = (
    "cell_id", "suite", "label", "workload", "optimizer", "batch_size", "inv_interval", "seed",
    "hparams", "config", "method_info", "data_mode", "data_source", "status", "error", "steps",
    "train_time_s", "time_to_target_s", "time_to_target_lo_s", "metric", "target",
    "final_train_loss", "final_eval_loss", "final_eval_metric", "median_step_ms",
    "timer_overhead_ms", "timer_overhead_ratio",
    "peak_mem_mb", "mem_baseline_mb", "peak_mem_over_baseline_mb", "state_mb",
    "curvature_state_mb", "oom_request_mb", *LOAD_COLUMNS, "device_kind",
    "device_name", "world_size", "backend", "flush_denormal", "tf32", "cudnn_benchmark", "amp",
    "compile", "compile_s", "cuda_graph", "graphed_steps", "graphs_captured",
    "build_s", "eval_s", "ops_probe_s", "wall_s", "torch_version", "kfacbench_version",
    "git_commit", "host", "started_at", "finished_at",
)  # fmt: skip
"""Columns of the ``cells`` table, in order."""


KERNEL_COLUMNS = (
    "cell_id",
    "label",
    "workload",
    "optimizer",
    "device",
    "phase",
    "kernel",
    "category",
    "calls",
    "total_ms",
    "mean_ms",
    "share",
)
"""Columns of the ``kernels`` table."""


DIAGNOSTIC_COLUMNS = (
    "cell_id", "label", "optimizer", "step", "approximation", "fisher", "layer", "rank", "metric",
    "value",
)  # fmt: skip
"""Columns of ``diagnostics.parquet``: one row per cell, checkpoint, approximation, layer, rank
and metric. ``layer`` is ``all`` for whole-network scores, ``dense:<first>..<last>`` for the dense
diagnostics and a layer's name for per-layer ones; ``rank`` (nullable integer) is the rank of
SKFAC's factors for its rank ladder, missing elsewhere (and in tables from before it existed)."""

RECORD_KEYS = ["workload", "batch_size", "setting", "phase"]
"""What identifies one line of the regression record."""


RECORD_COLUMNS = [
    *RECORD_KEYS,
    "optimizer",
    "median_ms",
    "sgd_step_ms",
    "ratio",
    "ratio_lo",
    "ratio_hi",
    "share",
    "repeats",
    "machine",
]
"""Columns of a regression record and of a baseline file."""


Kind = Literal["text", "number", "json object"]

KINDS: dict[str, Kind] = {
    **dict.fromkeys(
        (
            "cell_id", "suite", "label", "workload", "optimizer", "status", "error", "phase",
            "kernel", "category", "setting", "machine",
        ),
        "text",
    ),
    **dict.fromkeys(
        (
            "batch_size", "inv_interval", "seed", "steps", "train_time_s", "time_to_target_s",
            "final_train_loss", "final_eval_metric", "median_step_ms", "step", "train_loss",
            "calls", "total_s", "median_ms", "p10_ms", "p90_ms", "total_ms", "share",
            "sgd_step_ms", "ratio", "ratio_lo", "ratio_hi", "repeats",
        ),
        "number",
    ),
    "hparams": "json object",
}  # fmt: skip
"""What the commands expect a column to hold, by column name (the same name means the same thing
in every table). A required column of another name is only checked to be present."""

ROW_KEYS: dict[str, tuple[str, ...]] = {"cells": ("cell_id",), "phases": ("cell_id", "phase")}
"""Columns that identify a row: a repeated key (a table concatenated twice) is damage that the
commands would otherwise trip over when they look a cell up."""
