"""``kfacbench arithmetic``: a run's cells against the FLOP model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kfacbench.errors import KfacbenchError
from kfacbench.report.arithmetic import MODELLED, arithmetic_table
from kfacbench.runs.rundir import load_tables, read_env

ARITHMETIC_TABLES = {
    "cells": (
        "cell_id", "workload", "batch_size", "compile", "seed", "optimizer", "inv_interval",
        "steps", "status", "train_time_s", "device_kind", "hparams", "method_info",
    ),
    "phases": ("cell_id", "phase", "calls", "total_s"),
}  # fmt: skip


def cmd_arithmetic(args: argparse.Namespace, console: Console) -> int:
    tables = load_tables(args.run_dir, ARITHMETIC_TABLES)
    table = arithmetic_table(tables["cells"], tables["phases"])
    if table.empty:
        raise KfacbenchError(
            f"{args.run_dir}: no ok cell of {' or '.join(MODELLED)} on a workload the FLOP model"
            " covers"
        )
    out = Table(title=f"measured against the FLOP model ({args.run_dir})")
    columns = {
        "workload": "workload", "batch_size": "batch", "optimizer": "optimizer", "seed": "seed",
        "inv_interval": "T_inv", "refreshes": "refreshes", "amortized_ms": "ms/step",
        "model_gflop": "GFLOP/step", "measured_ratio": "/ SGD", "model_ratio": "model / SGD",
        "over_model": "/ model", "gflops_fwd_bwd": "GFLOP/s fwd+bwd",
        "gflops_curvature": "curvature", "gflops_precondition": "precondition",
        "gflops_inverse": "inverse",
    }  # fmt: skip
    for title in columns.values():
        out.add_column(title, justify="left" if title in ("workload", "optimizer") else "right")
    for rec in table.to_dict("records"):
        out.add_row(*(_fmt(rec[key]) for key in columns))
    console.print(out)
    console.print(
        "ms/step: training time / steps (refreshes included); / SGD: over the SGD cell of the"
        " same workload, batch, compile mode and seed; GFLOP/s: the model's FLOPs of a phase"
        " over its measured time (inverse: per refresh)"
    )
    env = read_env(args.run_dir) if (args.run_dir / "env.json").exists() else {}
    rate = env.get("gemm_gflops")  # runs from before it was measured have none
    if rate is not None:
        console.print(
            f"the device's float32 GEMM rate, measured before the cells: {rate:.4g} GFLOP/s"
        )
    return 0


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench arithmetic`` with the subcommands ``sub``."""
    arith = sub.add_parser(
        "arithmetic",
        help="a run's SGD and kfac-fast cells against the FLOP model (kfacbench/optim/flops.py)",
    )
    arith.add_argument("run_dir", type=Path, help="a run directory")
    arith.set_defaults(func=cmd_arithmetic)
