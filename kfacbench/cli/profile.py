"""``kfacbench profile``: torch.profiler traces and the kernels table of each cell."""

from __future__ import annotations

import argparse

from rich.console import Console

from kfacbench.cli.common import (
    DEFAULT_SUITE,
    add_placement,
    at_least,
    check_devices,
    kernels_table,
    new_store,
    read_suite,
    write_env,
)
from kfacbench.errors import KfacbenchError
from kfacbench.profiling import profile_cells
from kfacbench.runner import RunOptions
from kfacbench.suite import ProfileWindow


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    suite = read_suite(args.suite)
    cells = suite.select(args.only)
    if not cells:
        raise KfacbenchError(f"--only {args.only!r} matches none of the {len(suite.cells)} cells")
    base = suite.profile or ProfileWindow()
    window = ProfileWindow(
        wait=base.wait if args.wait is None else args.wait,
        warmup=base.warmup if args.warmup is None else args.warmup,
        active=base.active if args.steps is None else args.steps,
    )
    check_devices(args.device, cells)
    store = new_store(args.out, suite.name)
    if suite.path is not None:
        store.write_text("suite.toml", suite.path.read_text())
    write_env(store, args, cells)
    console.print(
        f"profiling {len(cells)} cells of {suite.name} ({window.active} steps each, after"
        f" {window.wait} skipped and {window.warmup} warm-up) -> {store.run_dir}"
    )
    options = RunOptions(device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    kernels = profile_cells(
        cells,
        store.run_dir,
        options,
        window,
        on_cell=lambda cell, message: console.print(f"{cell.label}: {message}"),
    )
    if not kernels.empty:
        console.print(kernels_table(kernels, args.top, str(store.run_dir)))
    console.print(
        f"kernels: {store.run_dir}/kernels.parquet; traces: tensorboard --logdir"
        f" {store.run_dir}/traces (pip install 'kfacbench\\[profile]')"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench profile`` with the subcommands ``sub``."""
    prof = sub.add_parser(
        "profile",
        help="profile a window of steps of each cell (torch.profiler traces, kernels table)",
        description="Rebuild each cell and train it for WAIT + WARMUP + STEPS steps under "
        "torch.profiler, recording the last STEPS (a separate pass: profiling never runs inside "
        "a timed run). Writes TensorBoard/Perfetto traces to OUT/<suite>/<timestamp>/traces/"
        "<cell-id>/ and the kernels table (per cell, phase and kernel or CPU operator) to "
        "kernels.parquet.",
    )
    prof.add_argument(
        "suite", nargs="?", default=DEFAULT_SUITE, help="suite file or name (as for run)"
    )
    prof.add_argument(
        "--only", metavar="PATTERN", help="profile only cells whose label or id matches"
    )
    prof.add_argument(
        "--steps",
        type=at_least(1),
        help="profiled (active) steps (default: the suite's [profile], or 5)",
    )
    prof.add_argument("--wait", type=at_least(1), help="steps skipped first (default 1)")
    prof.add_argument("--warmup", type=at_least(0), help="warm-up steps (default 2)")
    prof.add_argument(
        "--top", type=at_least(1), default=5, help="kernels shown per phase (%(default)s)"
    )
    add_placement(prof)
    prof.set_defaults(func=cmd_profile)
