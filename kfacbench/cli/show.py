"""``kfacbench show``: the summary of a run directory (or its top kernels)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from kfacbench.cli.common import at_least, kernels_table, warn_busy
from kfacbench.errors import KfacbenchError
from kfacbench.runs.rundir import load_tables, read_table
from kfacbench.runs.summary import rich_summary, time_shares

SHOW_CELLS = (
    "cell_id", "label", "workload", "optimizer", "batch_size", "inv_interval", "seed", "hparams",
    "status", "error", "final_train_loss", "final_eval_metric", "train_time_s",
    "time_to_target_s", "median_step_ms", "steps",
)  # fmt: skip
"""The columns of ``cells`` that ``show`` uses (the summary and the failed cells' lines)."""
SHOW_TABLES = {"cells": SHOW_CELLS, "phases": ("cell_id", "phase", "median_ms", "total_s")}
"""The tables ``show`` reads, with the columns it uses (``phases``: the refresh's cost)."""
SHOW_KERNELS = ("optimizer", "phase", "kernel", "category", "calls", "total_ms", "share")
"""The columns of ``kernels`` that ``show --kernels`` uses."""


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    kernels_path = args.run_dir / "kernels.parquet"
    if args.kernels:
        if not kernels_path.exists():
            raise KfacbenchError(
                f"{kernels_path} does not exist; make it with `kfacbench profile SUITE`"
            )
        kernels = read_table(kernels_path, SHOW_KERNELS)
        console.print(kernels_table(kernels, args.top, str(args.run_dir)))
        return 0
    tables = load_tables(args.run_dir, SHOW_TABLES)
    cells = tables["cells"]
    console.print(rich_summary(cells, str(args.run_dir), tables["phases"]))
    if shares := time_shares(cells):
        console.print(shares)
    failed = cells[cells["status"] != "ok"]
    for rec in failed.to_dict("records"):
        console.print(f"[yellow]{rec['label']}[/]: {rec['status']} {rec['error']}")
    warn_busy(console, cells)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench show`` with the subcommands ``sub``."""
    show = sub.add_parser("show", help="summarise a run directory")
    show.add_argument("run_dir", type=Path, help="a run directory (results/runs/<suite>/<time>)")
    show.add_argument("--kernels", action="store_true", help="top kernels per optimizer and phase")
    show.add_argument("--top", type=at_least(1), default=5, help="kernels per phase (%(default)s)")
    show.set_defaults(func=cmd_show)
