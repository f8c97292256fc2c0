"""``kfacbench list``: the workloads, optimizers and suites there are."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kfacbench.cli.common import add_plugin_option, bundled_suites, read_suite, resolve_suite
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS, HParam
from kfacbench.workloads import WORKLOADS


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    what = args.what
    if what in ("all", "workloads"):
        table = Table(title="workloads")
        for col in ("name", "metric", "target", "summary", "target from", "origin"):
            table.add_column(col)
        for w in WORKLOADS.values():
            table.add_row(w.name, w.metric, f"{w.target:g}", w.summary, w.target_note, w.origin)
        console.print(table)
    if what in ("all", "optimizers"):
        table = Table(title="optimizers")
        for col in ("name", "hyperparameters (default)", "summary", "origin"):
            table.add_column(col)
        for m in METHODS.values():
            hps = ", ".join(f"{k}={v.default}{_range(v)}" for k, v in m.hparams.items())
            table.add_row(m.name, hps, m.summary, m.origin)
        console.print(table)
    if what in ("all", "suites"):
        table = Table(title="suites")
        for col in ("name", "path", "cells", "description"):
            table.add_column(col)
        names = set(bundled_suites()) | {p.stem for p in Path("suites").glob("*.toml")}
        for name in sorted(names):
            try:
                s = read_suite(name)
                table.add_row(s.name, str(resolve_suite(name)), str(len(s.cells)), s.description)
            except KfacbenchError as exc:
                table.add_row(name, str(resolve_suite(name)), "-", f"[red]{exc}")
        console.print(table)
    return 0


def _range(hp: HParam) -> str:
    """`` in [0, 1)`` for a bounded numeric hyperparameter, else nothing."""
    return f" in {hp.interval}" if hp.kind in (int, float) and hp.bounds != "(-inf, inf)" else ""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench list`` with the subcommands ``sub``."""
    lst = sub.add_parser("list", help="list workloads, optimizers and suites")
    lst.add_argument(
        "what", nargs="?", default="all", choices=("all", "workloads", "optimizers", "suites")
    )
    add_plugin_option(lst)
    lst.set_defaults(func=cmd_list)
