"""``kfacbench run``: run a suite (in this process, through torchrun or as cluster jobs)."""

from __future__ import annotations

import argparse
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as td
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kfacbench.cli.common import (
    DEFAULT_SUITE,
    add_placement,
    add_plugin_option,
    at_least,
    check_devices,
    check_resumable,
    finite,
    latest_run,
    new_store,
    read_suite,
    warn_busy,
    write_env,
)
from kfacbench.cluster import EXECUTORS, ClusterOptions, submit_cells
from kfacbench.core.device import resolve_device
from kfacbench.distributed import init, launched_by_torchrun
from kfacbench.errors import KfacbenchError
from kfacbench.launch import DIST_DIR, TIMEOUT_ENV, LaunchOptions, launch, write_json
from kfacbench.machine_load import busy_cells
from kfacbench.profiling import profile_cells
from kfacbench.runner import RunOptions, record_failure, run_cells
from kfacbench.runs.rundir import load_tables
from kfacbench.runs.store import RunStore
from kfacbench.runs.summary import rich_summary, time_shares
from kfacbench.suite import Cell, Suite


def open_run(args: argparse.Namespace, suite: Suite) -> tuple[RunStore, bool]:
    """The run directory of ``run``: the one to resume, or a new one; and whether it is new.

    Called only after every argument was checked, so a rejected command leaves no empty run
    directory behind for a later bare ``--resume`` to pick as the latest run.
    """
    if args.resume is not None:
        run_dir = latest_run(args.out, suite.name) if args.resume == "latest" else Path(args.resume)
        if not (args.nnodes > 1 and not run_dir.exists()):  # several nodes: a new shared folder
            check_resumable(run_dir, suite.name)
        return RunStore(run_dir), False
    return new_store(args.out, suite.name), True


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    suite = read_suite(args.suite)
    cells = suite.select(args.only)
    if not cells:
        raise KfacbenchError(f"--only {args.only!r} matches none of the {len(suite.cells)} cells")
    if args.dry_run:
        table = Table(title=f"{suite.name}: {len(cells)} cells (dry run)")
        for col in ("cell id", "label", "device", "max_steps", "max_seconds"):
            table.add_column(col)
        for c in cells:
            s = c.settings
            table.add_row(c.id, c.label, s.device, str(s.max_steps), str(s.max_seconds))
        console.print(table)
        return 0
    options = RunOptions(device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    if args.nproc is not None and args.submitit is not None:
        raise KfacbenchError("--nproc and --submitit do not combine: choose one way to run cells")
    if launched_by_torchrun():
        return run_worker(args, suite, cells, options)
    if args.nproc is None and args.submitit is None:
        check_devices(args.device, cells)
    if args.rerun_busy and args.resume is None:
        raise KfacbenchError("--rerun-busy reruns the busy cells of a run: give --resume too")
    store, created = open_run(args, suite)
    try:
        return _run_in(store, args, suite, cells, options, console)
    except BaseException:
        if created and not store.finished_ids():  # nothing to resume: leave no empty run behind
            shutil.rmtree(store.run_dir, ignore_errors=True)
        raise


def _run_in(
    store: RunStore,
    args: argparse.Namespace,
    suite: Suite,
    cells: Sequence[Cell],
    options: RunOptions,
    console: Console,
) -> int:
    """The body of ``run`` once its run directory exists."""
    if suite.path is not None and not (store.run_dir / "suite.toml").exists():
        store.write_text("suite.toml", suite.path.read_text())
    write_env(store, args, cells)
    if args.rerun_busy and store.finished_ids():
        busy = busy_cells(load_tables(store.run_dir, {"cells": ["cell_id"]})["cells"])
        selected = {c.id for c in cells}
        for cell_id in busy["cell_id"]:
            if cell_id in selected:
                store.set_aside(str(cell_id), "busy")
        console.print(f"--rerun-busy: {len(busy)} busy cells set aside in {store.parts / 'busy'}")
    console.print(f"suite {suite.name}: {len(cells)} cells -> {store.run_dir}")
    try:
        if args.nproc is not None:
            code = run_distributed(args, suite, cells, store, console)
            if code:
                return code
        elif args.submitit is not None:
            cluster = ClusterOptions(
                executor=args.submitit,
                partition=args.slurm_partition,
                timeout_min=args.job_minutes,
                gpus_per_node=args.gpus_per_job,
                cpus_per_task=args.cpus_per_job,
            )
            submit_cells(cells, store, options, cluster, console)
        else:
            run_cells(cells, store, options, console)
    except KeyboardInterrupt:
        if not store.finished_ids():
            raise  # nothing finished: the run directory goes
        console.print(
            f"[red]interrupted[/]: finished cells are kept; continue with\n"
            f"  kfacbench run {args.suite} --resume {store.run_dir}"
        )
        return 130
    if suite.profile is not None:
        console.print(f"profiling {len(cells)} cells (separate pass, after the timed runs)")
        profile_cells(
            cells,
            store.run_dir,
            options,
            suite.profile,
            on_cell=lambda cell, message: console.print(f"  {cell.label}: {message}"),
        )
    tables = load_tables(store.run_dir)
    cells_table = tables["cells"]
    console.print(rich_summary(cells_table, f"{suite.name} ({store.run_dir})", tables["phases"]))
    if shares := time_shares(cells_table):
        console.print(shares)
    warn_busy(console, cells_table)
    console.print(
        f"tables: {store.run_dir}/{{cells,curves,phases}}.parquet  "
        f"(pandas.read_parquet; `kfacbench show {store.run_dir}`)"
    )
    if suite.profile is not None:
        console.print(
            f"kernels: {store.run_dir}/kernels.parquet (`kfacbench show {store.run_dir}"
            f" --kernels`); traces: tensorboard --logdir {store.run_dir}/traces"
        )
    failed = cells_table[cells_table["status"] == "error"]
    if not failed.empty:
        console.print(
            f"[red]{len(failed)} of {len(cells_table)} cells failed[/] (status error: see the"
            f" error column, and errors/ for tracebacks); exit code 1"
        )
        return 1
    return 0


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The options of ``run`` that the torchrun workers must see too."""
    out: list[str] = []
    for flag, value in (
        ("--only", args.only),
        ("--device", args.device),
        ("--data-dir", args.data_dir),
        ("--cache-dir", args.cache_dir),
    ):
        if value is not None:
            out += [flag, str(value)]
    for file in args.plugin or []:
        out += ["--plugin", str(Path(file).resolve())]
    return out


def run_distributed(
    args: argparse.Namespace,
    suite: Suite,
    cells: Sequence[Cell],
    store: RunStore,
    console: Console,
) -> int:
    """Launch the workers through torchrun; record a failed cell and relaunch for the rest."""
    opts = LaunchOptions(args.nproc, args.nnodes, args.rdzv_endpoint, args.dist_timeout)
    target = str(suite.path) if suite.path is not None else args.suite
    by_id = {c.id: c for c in cells}
    while True:
        failure = launch(target, store.run_dir, _worker_args(args), opts)
        if failure is None:
            return 0
        cell = by_id.get(failure.cell_id or "")
        if cell is None or cell.id in store.finished_ids():
            raise KfacbenchError(f"the distributed job failed outside a cell: {failure.message}")
        record_failure(cell, store, failure.status, failure.message, failure.started_at)
        console.print(f"[yellow]{cell.label}: {failure.status}[/] {escape(failure.message)}")
        if opts.nnodes > 1:  # the other nodes' launchers stopped too: resume all of them
            console.print(f"resume with: kfacbench run {args.suite} ... --resume {store.run_dir}")
            return 1
        if all(c.id in store.finished_ids() for c in cells):
            return 0


def run_worker(
    args: argparse.Namespace,
    suite: Suite,
    cells: Sequence[Cell],
    options: RunOptions,
) -> int:
    """One torchrun worker: join the process group and run the cells with the other ranks."""
    kinds = {resolve_device(args.device or c.settings.device).type for c in cells}
    if len(kinds) > 1:
        raise KfacbenchError(
            f"a distributed run needs one device kind for all cells, got {sorted(kinds)}; "
            "set --device"
        )
    dist = init(kinds.pop(), float(os.environ.get(TIMEOUT_ENV, "300")))
    store = RunStore(Path(args.resume))
    where = {"pid": os.getpid(), "host": socket.gethostname(), "local_rank": dist.local_rank}
    write_json(store.run_dir / DIST_DIR / f"rank{dist.rank}.json", where)
    quiet = Console(stderr=True, quiet=not dist.is_main)
    try:
        run_cells(cells, store, options, quiet, dist=dist)
        if suite.profile is not None:
            profile_cells(cells, store.run_dir, options, suite.profile, dist=dist)
        # Every rank past its last collective before any tears the group down (a rank that
        # closes its gloo pairs while another's last message is in flight aborts that rank).
        td.barrier()
    finally:
        td.destroy_process_group()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench run`` with the subcommands ``sub``."""
    run = sub.add_parser(
        "run",
        help="run a suite",
        description="Run every cell of a suite and write cells/curves/phases parquet tables "
        "to OUT/<suite>/<timestamp>/. Finished cells are kept if the run is interrupted; "
        "--resume continues it.",
    )
    add_plugin_option(run)
    run.add_argument(
        "suite",
        nargs="?",
        default=DEFAULT_SUITE,
        help="suite file, or name of ./suites/NAME.toml or of a bundled suite "
        f"(default: {DEFAULT_SUITE})",
    )
    add_placement(run)
    run.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue a run: skip finished cells, rerun unfinished ones "
        "(default RUN_DIR: the latest run of the suite under --out)",
    )
    run.add_argument(
        "--rerun-busy",
        action="store_true",
        help="with --resume: run again the cells that ran on a busy machine (their first results"
        " are kept in parts/busy/)",
    )
    run.add_argument("--dry-run", action="store_true", help="list the cells without running")
    run.add_argument(
        "--nproc",
        type=at_least(1),
        metavar="N",
        help="data-parallel: N processes on this node (one per GPU), launched through torchrun;"
        " the suite's batch size is the global batch (gloo on CPU, nccl on CUDA)",
    )
    run.add_argument(
        "--nnodes",
        type=at_least(1),
        default=1,
        metavar="M",
        help="nodes taking part (%(default)s)",
    )
    run.add_argument(
        "--rdzv-endpoint",
        metavar="HOST:PORT",
        help="rendezvous of a multi-node run (c10d; run the same command on every node, with"
        " the same --resume RUN_DIR on a shared filesystem)",
    )
    run.add_argument(
        "--submitit",
        choices=EXECUTORS,
        help="run every cell as a job through submitit: slurm (a job array; the run directory"
        " must be on a shared filesystem) or local (processes on this machine, for trying it)",
    )
    run.add_argument("--slurm-partition", metavar="P", help="SLURM partition for --submitit")
    run.add_argument(
        "--job-minutes",
        type=at_least(1),
        default=60,
        metavar="M",
        help="time limit per job (%(default)s)",
    )
    run.add_argument(
        "--gpus-per-job",
        type=at_least(0),
        default=0,
        metavar="G",
        help="GPUs per job (%(default)s)",
    )
    run.add_argument(
        "--cpus-per-job",
        type=at_least(1),
        default=4,
        metavar="C",
        help="CPU cores per job (%(default)s)",
    )
    run.add_argument(
        "--dist-timeout",
        type=finite("seconds", strict=True),
        default=300.0,
        metavar="S",
        help="seconds after which a collective that gets no answer fails the job (%(default)s)",
    )
    run.add_argument("--only", metavar="PATTERN", help="run only cells whose label or id matches")
    run.set_defaults(func=cmd_run)
