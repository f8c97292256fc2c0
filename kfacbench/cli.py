"""The ``kfacbench`` command: run suites, list what exists, show results."""

from __future__ import annotations

import argparse
import datetime as dt
import difflib
import fnmatch
import itertools
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import tomllib
from collections.abc import Callable, Hashable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import pandas as pd
import torch.distributed as td
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kfacbench.cluster import EXECUTORS, ClusterOptions, submit_cells
from kfacbench.compare import METRICS, compare_runs
from kfacbench.core import subnormals
from kfacbench.diagnose import CheckpointPart, diagnose_cells
from kfacbench.diagnose_dense import (
    DENSE_BUDGET,
    DenseSelection,
    dense_part,
    dense_plan,
    rank_part,
)
from kfacbench.distributed import init, launched_by_torchrun
from kfacbench.doctor import CheckResult, Doctor, run_check, write_results
from kfacbench.errors import KfacbenchError, SuiteError
from kfacbench.launch import DIST_DIR, TIMEOUT_ENV, LaunchOptions, launch, write_json
from kfacbench.machine_load import busy_cells, warning_line
from kfacbench.optim import METHODS, HParam
from kfacbench.profiling import profile_cells, top_kernels
from kfacbench.regress import (
    FAIL_ABOVE,
    KEYS,
    MIN_SHARE,
    ab_records,
    baseline_commit,
    baseline_for,
    busy_passes,
    check,
    combine,
    export_commit,
    machine_kind,
    read_baseline,
    write_baseline,
)
from kfacbench.report.arithmetic import MODELLED, arithmetic_table
from kfacbench.rundir import load_tables, read_manifest, read_table
from kfacbench.runner import RunOptions, one_line, record_failure, resolve_device, run_cells
from kfacbench.store import RunStore, environment, fresh_dir, new_manifest
from kfacbench.suite import DEVICE, Cell, ProfileWindow, Suite, load_suite
from kfacbench.summary import rich_summary, time_shares
from kfacbench.workloads import WORKLOADS

DEFAULT_SUITE = "quick"
DEFAULT_OUT = Path("results/runs")
DOCTOR_OUT = Path("results/doctor")
DIAGNOSE_AT = (0, 50, 200)
"""Checkpoints of ``kfacbench diagnose`` when neither --at nor the suite sets them."""
BASELINES = Path("results/baselines")
EXAMPLES = """examples:
  kfacbench run                          the quick suite (CURVES, CPU-friendly) on auto device
  kfacbench run sgd_steps --device cuda  SGD step time on every workload, synthetic data
  kfacbench run quick --only '*bs=100*'  a subset of the cells
  kfacbench run quick --resume           continue the latest interrupted run of quick
  kfacbench show results/runs/quick/20261124-140000
  kfacbench profile kernels --steps 5   per-kernel profiles (TensorBoard traces, kernels table)
  kfacbench show RUN_DIR --kernels      the top kernels per optimizer and phase
  kfacbench arithmetic RUN_DIR          kfac-fast / SGD measured against the FLOP model
  kfacbench report RUN_DIR -o reports/quick/   figures, self-contained HTML, Markdown
  kfacbench rebuild --check             every committed report rebuilt from its committed runs
  kfacbench diagnose quick --at 0,50,200 --damping 1e-3   curvature quality vs the natural gradient
  kfacbench compare BASE_RUN NEW_RUN    ratios per cell; exit 1 above +10%
  kfacbench regress --device cpu        the CI speed check against results/baselines/cpu.parquet
  kfacbench run dist --nproc 2          data-parallel through torchrun (gloo on CPU, nccl on GPUs)
  kfacbench run quick --submitit slurm  every cell a SLURM job (needs the cluster extra)
  kfacbench run peers                   kfacbench's K-FAC/SKFAC vs ASDL's (needs the peers extra)
  kfacbench doctor --device cuda        check a GPU machine in ~3 minutes; exit 1 on a failure
  kfacbench list workloads
"""


def bundled_suites() -> dict[str, Path]:
    """Suites shipped with the package (the repository's ``suites/`` folder)."""
    found: dict[str, Path] = {}
    for entry in resources.files("kfacbench.suites").iterdir():
        if entry.name.endswith(".toml"):
            found[entry.name.removesuffix(".toml")] = Path(str(entry))
    return found


def resolve_suite(name_or_path: str) -> Path:
    """A suite file from a path, ``./suites/<name>.toml``, or a bundled suite name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    local = Path("suites") / f"{name_or_path}.toml"
    if local.exists():
        return local
    bundled = bundled_suites()
    if name_or_path in bundled:
        return bundled[name_or_path]
    known = ", ".join(sorted(bundled))
    raise SuiteError(f"{name_or_path}: no such suite file or bundled suite (bundled: {known})")


def read_suite(name_or_path: str) -> Suite:
    """Load and validate a suite against the registered workloads and optimizers."""
    return load_suite(resolve_suite(name_or_path), workloads=WORKLOADS, methods=METHODS)


def latest_run(root: Path, suite: str) -> Path:
    """The most recent run directory of ``suite`` under ``root``."""
    runs = sorted(p for p in (root / suite).glob("*") if (p / "parts").is_dir())
    if not runs:
        raise KfacbenchError(f"--resume: no earlier run of suite {suite!r} under {root / suite}")
    return runs[-1]


def check_devices(override: str | None, cells: Sequence[Cell]) -> None:
    """Fail on a device the cells cannot have (CUDA where there is none) before a command makes
    any folder: a rejected command must not leave an empty run for a bare ``--resume`` to pick."""
    for device in {override or c.settings.device for c in cells}:
        resolve_device(device)


def write_env(store: RunStore, args: argparse.Namespace, cells: Sequence[Cell]) -> None:
    """``env.json`` of a run (the first cell's device): versions, the machine, and whether this
    process flushes subnormal floats; and ``manifest.json``, the command that made the run (a
    resumed run adds its command), so a published run says how to make it again."""
    device = resolve_device(args.device or cells[0].settings.device)
    env = environment(device)
    store.write_text("env.json", json.dumps(env, indent=2) + "\n")
    command = "kfacbench " + shlex.join(args.argv)
    path = store.run_dir / "manifest.json"
    if path.exists():
        manifest = read_manifest(path)
        manifest["resumed_by"] = [*manifest.get("resumed_by", []), command]
    else:
        manifest = new_manifest(command, env)
    store.write_text("manifest.json", json.dumps(manifest, indent=2) + "\n")


def check_resumable(run_dir: Path, suite: str) -> None:
    """Refuse to resume into a folder that is not a run of ``suite``."""
    if not (run_dir / "parts").is_dir():
        raise KfacbenchError(f"--resume {run_dir}: not a kfacbench run directory (no parts/)")
    stored = run_dir / "suite.toml"
    if stored.exists():
        try:
            name = tomllib.loads(stored.read_text(encoding="utf-8")).get("name", suite)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise KfacbenchError(
                f"--resume {run_dir}: {stored} is damaged ({one_line(exc)}); it records which"
                " suite the run is of, so the run cannot be resumed safely"
            ) from None
        if name != suite:
            raise KfacbenchError(
                f"--resume {run_dir}: that run is of suite {name!r}, not {suite!r}"
            )


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


def new_store(out: Path, suite: str) -> RunStore:
    """A new run directory ``out/<suite>/<timestamp>``, or a one-line error naming ``--out``."""
    if out.exists() and not out.is_dir():
        raise KfacbenchError(f"--out {out}: exists and is not a directory")
    try:
        return RunStore.new(out, suite)
    except OSError as exc:
        raise KfacbenchError(f"--out {out}: cannot create a run directory: {exc}") from None


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
    _warn_busy(console, cells_table)
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


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    what = args.what
    if what in ("all", "workloads"):
        table = Table(title="workloads")
        for col in ("name", "metric", "target", "summary", "target from"):
            table.add_column(col)
        for w in WORKLOADS.values():
            table.add_row(w.name, w.metric, f"{w.target:g}", w.summary, w.target_note)
        console.print(table)
    if what in ("all", "optimizers"):
        table = Table(title="optimizers")
        for col in ("name", "hyperparameters (default)", "summary"):
            table.add_column(col)
        for m in METHODS.values():
            hps = ", ".join(f"{k}={v.default}{_range(v)}" for k, v in m.hparams.items())
            table.add_row(m.name, hps, m.summary)
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
        console.print(_kernels_table(kernels, args.top, str(store.run_dir)))
    console.print(
        f"kernels: {store.run_dir}/kernels.parquet; traces: tensorboard --logdir"
        f" {store.run_dir}/traces (pip install 'kfacbench\\[profile]')"
    )
    return 0


def _steps(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated steps >= 0, e.g. ``0,50,200``."""
    try:
        steps = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected steps like 0,50,200, got {text!r}") from None
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"expected steps >= 0 like 0,50,200, got {text!r}")
    return steps


def _names(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names, e.g. ``8,10,11,13``."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected layer names like 8,10,11,13, got {text!r}")
    return names


def cmd_diagnose(args: argparse.Namespace, console: Console) -> int:
    suite = read_suite(args.suite)
    cells = suite.select(args.only)
    if not cells:
        raise KfacbenchError(f"--only {args.only!r} matches none of the {len(suite.cells)} cells")
    at = args.at or suite.diagnose_at or DIAGNOSE_AT
    undamped = sorted({c.optimizer for c in cells if "damping" not in METHODS[c.optimizer].hparams})
    if undamped and args.damping is None:
        raise KfacbenchError(
            f"--damping: {', '.join(undamped)} cells have no damping of their own; give the λ"
            " of the exact direction they are compared with (e.g. --damping 1e-3)"
        )
    parts: list[CheckpointPart] = []
    plan: dict[str, DenseSelection | str] = {}
    if not args.no_dense:
        plan = dense_plan([c.workload for c in cells], args.dense_budget, args.dense_layers)
        parts.append(dense_part(args.dense_budget, args.dense_layers))
    if not args.no_rank:
        parts.append(rank_part())
    check_devices(args.device, cells)
    if args.resume is not None:
        run_dir = latest_run(args.out, suite.name) if args.resume == "latest" else Path(args.resume)
        check_resumable(run_dir, suite.name)
        store = RunStore(run_dir)
    else:
        store = new_store(args.out, suite.name)
    if suite.path is not None and not (store.run_dir / "suite.toml").exists():
        store.write_text("suite.toml", suite.path.read_text())
    write_env(store, args, cells)
    console.print(
        f"diagnosing {len(cells)} cells of {suite.name} at steps {', '.join(map(str, at))}"
        f" ({args.fisher} Fisher) -> {store.run_dir}"
    )
    for workload, selection in plan.items():
        what = selection if isinstance(selection, str) else selection.describe()
        kind = "not applicable: " if isinstance(selection, str) else ""
        console.print(f"  dense diagnostics of {workload}: {kind}{escape(what)}")
    options = RunOptions(device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
    with Progress(console=console, transient=False) as progress:
        task = progress.add_task("checkpoints", total=len(cells) * len(at))

        def report(cell: Cell, step: int, message: str) -> None:
            progress.advance(task)
            if message != "ok":
                console.print(f"[yellow]{escape(cell.label)}[/] at step {step}: {escape(message)}")

        table = diagnose_cells(
            cells, store.run_dir, options, at, fisher=args.fisher, damping=args.damping,
            parts=parts, on_checkpoint=report,
        )  # fmt: skip
    console.print(_diagnostics_table(table, str(store.run_dir)))
    console.print(f"diagnostics: {store.run_dir}/diagnostics.parquet")
    return 0


def _diagnostics_table(table: pd.DataFrame, title: str) -> Table:
    """Cosine and model-reduction ratio per cell, approximation and step."""
    scores = table[table["metric"].isin(["cosine", "model_ratio"]) & (table["layer"] == "all")]
    wide = scores.pivot_table(
        index=["label", "approximation", "step"], columns="metric", values="value"
    ).reset_index()
    out = Table(title=f"curvature quality vs the exact damped natural gradient ({title})")
    for col in ("cell", "approximation", "step", "cosine", "model ratio"):
        out.add_column(col, justify="right" if col in ("step", "cosine", "model ratio") else "left")
    for r in wide.to_dict("records"):
        out.add_row(
            escape(str(r["label"])),
            escape(str(r["approximation"])),
            str(r["step"]),
            f"{r.get('cosine', math.nan):.3f}",
            f"{r.get('model_ratio', math.nan):.3f}",
        )
    return out


def _kernels_table(kernels: pd.DataFrame, top: int, title: str) -> Table:
    table = Table(title=f"top {top} kernels per optimizer and phase ({title})")
    for col in ("optimizer", "phase", "kernel", "category", "calls", "total ms", "share"):
        table.add_column(col, justify="right" if col in ("calls", "total ms", "share") else "left")
    for r in top_kernels(kernels, top).to_dict("records"):
        table.add_row(
            r["optimizer"],
            r["phase"],
            r["kernel"][:70],
            r["category"],
            str(r["calls"]),
            f"{r['total_ms']:.3g}",
            f"{r['share']:.1%}",
        )
    return table


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from kfacbench.report import write_report  # matplotlib is imported only when reporting
    from kfacbench.report.claims import claims_table

    command = "kfacbench " + shlex.join(args.argv)
    claims = claims_table if args.claims else None
    index = write_report(
        args.run_dirs, args.output, claims=claims, command=command, baseline=args.baseline
    )
    console.print(f"report: {index} (and summary.md, PNG/SVG figures in {args.output})")
    return 0


REBUILD = re.compile(r"^Rebuild: `(kfacbench report .+)`$", re.MULTILINE)
"""The header line of a report's ``summary.md`` that names the command that made it."""


def recorded_command(report: Path) -> str:
    """The command in the header of ``report``'s ``summary.md``.

    Raises:
        KfacbenchError: no ``summary.md``, or one without a ``Rebuild:`` line.
    """
    summary = report / "summary.md"
    try:
        text = summary.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KfacbenchError(f"{summary}: not readable ({one_line(exc)})") from None
    match = REBUILD.search(text)
    if match is None:
        raise KfacbenchError(
            f"{summary}: no 'Rebuild: `kfacbench report ...`' line: made before reports recorded"
            " their command; make it again with kfacbench report"
        )
    return match.group(1)


def cmd_rebuild(args: argparse.Namespace, console: Console) -> int:
    from kfacbench.report import write_report
    from kfacbench.report.claims import claims_table

    reports = args.reports or sorted(p.parent for p in Path("reports").glob("*/summary.md"))
    if not reports:
        raise KfacbenchError(
            "no reports/*/summary.md here: run kfacbench rebuild from the repo root"
        )
    differ = []
    for report in reports:
        command = recorded_command(report)
        recorded = build_parser().parse_args(shlex.split(command)[1:])
        if recorded.output.resolve() != report.resolve():
            raise KfacbenchError(
                f"{report / 'summary.md'}: its command writes to {recorded.output}, not {report}"
            )
        claims = claims_table if recorded.claims else None
        options = {"claims": claims, "command": command, "baseline": recorded.baseline}
        if not args.check:
            write_report(recorded.run_dirs, report, **options)
            console.print(f"rebuilt {report}")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            write_report(recorded.run_dirs, Path(tmp), **options)
            new = (Path(tmp) / "summary.md").read_text(encoding="utf-8")
        old = (report / "summary.md").read_text(encoding="utf-8")
        if new == old:
            console.print(f"{report}: summary.md rebuilds identical")
            continue
        differ.append(str(report))
        diff = difflib.unified_diff(
            old.splitlines(), new.splitlines(), "committed", "rebuilt", lineterm="", n=0
        )
        console.print(f"[red]{report}: summary.md differs[/]")
        console.print(escape("\n".join(itertools.islice(diff, 40))), highlight=False)
    if differ:
        console.print(f"[red]{len(differ)} reports differ from a rebuild[/]: {', '.join(differ)}")
        return 1
    return 0


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    result = compare_runs(args.base, args.new, args.metric, args.fail_above / 100)
    table = Table(
        title=f"{args.metric}: {args.new} vs {args.base} (regression above +{args.fail_above:g}%)"
    )
    median = args.metric == "amortized"  # the median step's ratio beside the amortized one
    columns = ["cell", "base", "new", "new / base", "noise ±"]
    columns += ["median step new / base", ""] if median else [""]
    for col in columns:
        table.add_column(col, justify="left" if col in ("cell", "") else "right")
    for r in result.table.to_dict("records"):
        noise = "" if r["noise"] != r["noise"] else f"{r['noise']:.1%}"
        beside = [f"{r['median_ratio']:.3f}"] if median else []
        table.add_row(
            r["label"],
            f"{r['base']:.4g}",
            f"{r['new']:.4g}",
            f"{r['ratio']:.3f}",
            noise,
            *beside,
            "[red]regressed[/]" if r["regressed"] else "",
        )
    console.print(table)
    console.print(
        f"geometric-mean ratio {result.geomean_ratio():.3f} over {len(result.table)} cells;"
        f" {len(result.only_base)} only in BASE, {len(result.only_new)} only in NEW"
    )
    if args.markdown is not None:
        args.markdown.write_text(result.markdown())
        console.print(f"markdown: {args.markdown}")
    regressed = result.regressions
    if not regressed.empty:
        console.print(f"[red]{len(regressed)} cells regressed[/]: " + ", ".join(regressed["label"]))
        return 1
    return 0


def _passes(run_dirs: list[Path]) -> list[Path]:
    """Run directories, a directory of passes (``kfacbench regress`` output) expanded."""
    out: list[Path] = []
    for d in run_dirs:
        if (d / "cells.parquet").exists() or not d.is_dir():
            out.append(d)
        else:
            inner = sorted(p for p in d.iterdir() if (p / "cells.parquet").exists())
            out += inner or [d]
    return out


def cmd_regress(args: argparse.Namespace, console: Console) -> int:
    if args.repeats < 1:
        raise KfacbenchError(f"--repeats must be at least 1, not {args.repeats}")
    if args.run:
        run_dirs = _passes(args.run)
        busy = busy_passes(run_dirs)
    else:
        suite = read_suite(args.suite)
        check_devices(args.device, suite.cells)
        root = fresh_dir(args.out / "regress" / suite.name)
        options = RunOptions(device=args.device, data_dir=args.data_dir, cache_dir=args.cache_dir)
        run_dirs, busy = [], {}
        # A pass timed on a busy machine is replaced by another, up to --repeats extra passes.
        for i in range(2 * args.repeats):
            if len(run_dirs) - len(busy) == args.repeats:
                break
            store = RunStore(root / f"pass-{i + 1}")
            if suite.path is not None:
                store.write_text("suite.toml", suite.path.read_text())
            console.print(
                f"suite {suite.name}, pass {i + 1} ({args.repeats} needed): {len(suite.cells)}"
                f" cells -> {store.run_dir}"
            )
            # Alternate the order so a drift in machine speed during a pass cancels out.
            cells = suite.cells if i % 2 == 0 else list(reversed(suite.cells))
            run_cells(cells, store, options, console)
            run_dirs.append(store.run_dir)
            busy.update(busy_passes([store.run_dir]))
    for run_dir, line in busy.items():
        console.print(f"[yellow]not gating on {run_dir}[/]: {escape(line)}")
    run_dirs = [d for d in run_dirs if d not in busy]
    if not run_dirs:
        console.print(
            "[red]refusing to gate[/]: every pass ran on a busy machine, so a slower phase could"
            " be the other processes' doing (exit code 3); rerun on a quiet machine"
        )
        return 3
    record = combine(run_dirs)
    kind = machine_kind(run_dirs[0])
    baseline_path = args.baseline or (
        BASELINES / f"{kind}.parquet" if args.update_baseline else baseline_for(BASELINES, kind)
    )
    if args.update_baseline:
        write_baseline(record, baseline_path)
        console.print(
            f"baseline for {kind} written: {baseline_path} ({len(record)} lines,"
            f" {len(run_dirs)} passes, {record['machine'].iloc[0]})"
        )
        return 0
    baseline = read_baseline(baseline_path)
    result = check(record, baseline, args.fail_above / 100, args.min_share / 100)
    table = Table(
        title=f"normalised phase times ({len(run_dirs)} passes) vs {baseline_path}: regression"
        f" above +{args.fail_above:g}%, phases under {args.min_share:g}% of their step not gated"
    )
    for col in ("setting", "phase", "share", "base / SGD", "now / SGD", "passes", "change", ""):
        table.add_column(col, justify="left" if col in ("setting", "phase", "") else "right")
    for r in result.to_dict("records"):
        verdict = (
            "[red]regressed[/]"
            if r["regressed"]
            else "[red]missing[/]"
            if r["missing"]
            else ("" if r["gated"] else "[dim]ungated")
        )
        table.add_row(*_ratio_cells(r, f"{max(r['share_base'], r['share_new']):.0%}"), verdict)
    console.print(table)
    then, now = baseline["machine"].iloc[0], record["machine"].iloc[0]
    if then != now:
        console.print(
            f"[yellow]baseline recorded on {then}, this run on {now}: ratios can differ between"
            " machines; re-record the baseline on the machine that gates[/]"
        )
    missing = result[result["missing"]]
    if not missing.empty:
        names = ", ".join(
            f"{s} {p}" for s, p in zip(missing["setting"], missing["phase"], strict=True)
        )
        console.print(
            f"[red]{len(missing)} baseline lines not measured[/] (a failed cell, a phase no longer"
            f" timed): {names}; if that is intended, re-record the baseline"
        )
        return 1
    bad = result[result["regressed"]]
    if not bad.empty:
        names = ", ".join(
            f"{s} {p} ×{c:.2f}"
            for s, p, c in zip(bad["setting"], bad["phase"], bad["change"], strict=True)
        )
        console.print(f"[red]{len(bad)} regressions[/]: {names}")
        if args.run or not args.confirm:
            return 1
        return _confirm_regressions(args, suite, baseline_path, root, bad, console)
    console.print(f"no regression above +{args.fail_above:g}%")
    return 0


def _ratio_cells(r: Mapping[Hashable, Any], third: str) -> list[str]:
    """A line of a regress table: setting, phase, ``third``, the two ratios, the passes' range
    and the change."""
    return [
        str(r["setting"]),
        str(r["phase"]),
        third,
        f"{r['ratio_base']:.3f}",
        f"{r['ratio_new']:.3f}",
        f"{r['ratio_lo']:.3f}-{r['ratio_hi']:.3f}",
        f"{r['change']:.3f}",
    ]


def _confirm_regressions(
    args: argparse.Namespace,
    suite: Suite,
    baseline_path: Path,
    root: Path,
    flagged: pd.DataFrame,
    console: Console,
) -> int:
    """The A/B confirmation of lines flagged against the baseline file (module docstring of
    :mod:`kfacbench.regress`): exit 1 only when the baseline's own commit, run here with the
    current code in alternating passes, shows the regression too."""
    rev = args.against or baseline_commit(baseline_path)
    if rev is None or suite.path is None:
        why = "no suite file" if suite.path is None else f"no git history of {baseline_path}"
        console.print(f"[yellow]cannot confirm by an A/B run[/] ({why}; --against REV names one)")
        return 1
    console.print(
        f"confirming on this machine: the baseline's commit {rev[:12]} and the current code,"
        f" {args.repeats} alternating passes each (--no-confirm skips this)"
    )

    def on_pass(side: str, run_dir: Path) -> None:
        console.print(f"  {'baseline commit' if side == 'old' else 'current code':15} {run_dir}")

    new_source = Path(__file__).resolve().parent.parent
    try:
        with tempfile.TemporaryDirectory(prefix="kfacbench-ab-") as tmp:
            old_source = export_commit(rev, baseline_path.resolve().parent, Path(tmp))
            old, new = ab_records(
                suite.path.resolve(),
                old_source,
                new_source,
                args.repeats,
                root / "ab",
                args.device,
                args.cache_dir,
                on_pass,
            )
    except KfacbenchError as exc:  # the flags stand: exit 1, not a bad-input 2
        console.print(f"[yellow]cannot confirm by an A/B run[/]: {escape(str(exc))}")
        return 1
    ab = check(new, old, args.fail_above / 100, args.min_share / 100)
    ab = ab.merge(flagged[[*KEYS, "change"]], on=KEYS, suffixes=("", "_file"))
    table = Table(title=f"flagged lines, A/B on this machine: {rev[:12]} vs current code")
    for col in ("setting", "phase", "vs file", "then / SGD", "now / SGD", "now passes", "A/B", ""):
        table.add_column(col, justify="left" if col in ("setting", "phase", "") else "right")
    for r in ab.to_dict("records"):
        verdict = "[red]confirmed[/]" if r["regressed"] else "not confirmed"
        table.add_row(*_ratio_cells(r, f"{r['change_file']:.3f}"), verdict)
    console.print(table)
    confirmed = ab[ab["regressed"]]
    if not confirmed.empty:
        console.print(f"[red]{len(confirmed)} regressions confirmed by the A/B run[/]")
        return 1
    console.print(
        f"[yellow]no regression above +{args.fail_above:g}% in the A/B run[/]: the baseline file"
        f" does not fit this machine; record one here (--update-baseline) to gate on it directly"
    )
    return 0


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


def cmd_doctor(args: argparse.Namespace, console: Console) -> int:
    device = resolve_device(args.device)
    out = args.out or DOCTOR_OUT / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    checks = Doctor(device, out).plan()
    if args.only:
        groups = ", ".join(dict.fromkeys(c.group for c in checks))
        checks = [c for c in checks if fnmatch.fnmatchcase(f"{c.group}: {c.name}", args.only)]
        if not checks:
            raise KfacbenchError(
                f"--only {args.only!r} matches no check; checks are named 'GROUP: CHECK'"
                f" (groups: {groups})"
            )
    console.print(f"doctor: {len(checks)} checks on {device} -> {out}")
    results: list[CheckResult] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("checks", total=len(checks))
        for check in checks:
            progress.update(task, description=f"{check.group}: {check.name}")
            result = run_check(check)
            results.append(result)
            # Written and printed per check: a machine lent for minutes may be taken back (or
            # the call cut off) before the last check, and what finished must survive.
            write_results(out, results)
            progress.console.print(
                f"{result.status:>7}  {result.group}: {result.check} ({result.seconds:.1f} s)"
                f"  {result.detail}",
                highlight=False,
                markup=False,
            )
            progress.advance(task)
    path = write_results(out, results)
    console.print(_doctor_table(results, str(device)))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skipped")}
    seconds = sum(r.seconds for r in results)
    console.print(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skipped']} skipped in"
        f" {seconds:.0f} s; table: {path}"
    )
    for r in results:
        if r.status == "fail":
            print(f"kfacbench doctor: FAIL {r.group}: {r.check}: {r.detail}", file=sys.stderr)
    return 1 if counts["fail"] else 0


def _doctor_table(results: Sequence[CheckResult], device: str) -> Table:
    table = Table(title=f"kfacbench doctor ({device})")
    for column in ("group", "check", "status", "detail", "s"):
        table.add_column(column, justify="right" if column == "s" else "left")
    colours = {"pass": "green", "fail": "red", "skipped": "yellow"}
    for r in results:
        status = f"[{colours[r.status]}]{r.status}[/]"
        table.add_row(r.group, escape(r.check), status, escape(r.detail), f"{r.seconds:.1f}")
    return table


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    kernels_path = args.run_dir / "kernels.parquet"
    if args.kernels:
        if not kernels_path.exists():
            raise KfacbenchError(
                f"{kernels_path} does not exist; make it with `kfacbench profile SUITE`"
            )
        kernels = read_table(kernels_path, SHOW_KERNELS)
        console.print(_kernels_table(kernels, args.top, str(args.run_dir)))
        return 0
    tables = load_tables(args.run_dir, SHOW_TABLES)
    cells = tables["cells"]
    console.print(rich_summary(cells, str(args.run_dir), tables["phases"]))
    if shares := time_shares(cells):
        console.print(shares)
    failed = cells[cells["status"] != "ok"]
    for rec in failed.to_dict("records"):
        console.print(f"[yellow]{rec['label']}[/]: {rec['status']} {rec['error']}")
    _warn_busy(console, cells)
    return 0


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
    return 0


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _warn_busy(console: Console, cells: pd.DataFrame) -> None:
    """Name the cells timed on a busy machine, and say what to do (:mod:`machine_load`)."""
    line = warning_line(cells)
    if line is None:
        return
    for rec in busy_cells(cells).to_dict("records"):
        console.print(f"[yellow]busy[/] {escape(str(rec['label']))}: {escape(rec['busy_reason'])}")
    console.print(f"[yellow]warning[/]: {escape(line)}")


class _Parser(argparse.ArgumentParser):
    """argparse with kfacbench's error format: one line and exit code 2 (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kfacbench: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return convert


def _finite(what: str, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number >= 0 (> 0 when ``strict``); a NaN threshold, say,
    would never be exceeded."""
    bound = "> 0" if strict else ">= 0"

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise argparse.ArgumentTypeError(f"expected finite {what} {bound}, got {text!r}")
        return value

    return convert


def _device(text: str) -> str:
    """An argparse type: a device spec the suite's ``device`` setting also takes."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def _add_placement(parser: argparse.ArgumentParser) -> None:
    """Where results go, where cells run and where data comes from (``run`` and ``profile``)."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (%(default)s)")
    parser.add_argument(
        "--device", type=_device, help="override the suite's device: auto, cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="folder with real data files (also $KFACBENCH_DATA)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="cache for generated data (default $KFACBENCH_CACHE or ~/.cache/kfacbench)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kfacbench",
        description="Benchmark SGD, K-FAC and SKFAC on one training core: run suites of cells "
        "(workload × batch size × inversion interval × hyperparameters × seed) and record "
        "loss curves, wall-clock times and per-phase step times as parquet tables.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="run a suite",
        description="Run every cell of a suite and write cells/curves/phases parquet tables "
        "to OUT/<suite>/<timestamp>/. Finished cells are kept if the run is interrupted; "
        "--resume continues it.",
    )
    run.add_argument(
        "suite",
        nargs="?",
        default=DEFAULT_SUITE,
        help="suite file, or name of ./suites/NAME.toml or of a bundled suite "
        f"(default: {DEFAULT_SUITE})",
    )
    _add_placement(run)
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
        type=_at_least(1),
        metavar="N",
        help="data-parallel: N processes on this node (one per GPU), launched through torchrun;"
        " the suite's batch size is the global batch (gloo on CPU, nccl on CUDA)",
    )
    run.add_argument(
        "--nnodes",
        type=_at_least(1),
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
        type=_at_least(1),
        default=60,
        metavar="M",
        help="time limit per job (%(default)s)",
    )
    run.add_argument(
        "--gpus-per-job",
        type=_at_least(0),
        default=0,
        metavar="G",
        help="GPUs per job (%(default)s)",
    )
    run.add_argument(
        "--cpus-per-job",
        type=_at_least(1),
        default=4,
        metavar="C",
        help="CPU cores per job (%(default)s)",
    )
    run.add_argument(
        "--dist-timeout",
        type=_finite("seconds", strict=True),
        default=300.0,
        metavar="S",
        help="seconds after which a collective that gets no answer fails the job (%(default)s)",
    )
    run.add_argument("--only", metavar="PATTERN", help="run only cells whose label or id matches")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", help="list workloads, optimizers and suites")
    lst.add_argument(
        "what", nargs="?", default="all", choices=("all", "workloads", "optimizers", "suites")
    )
    lst.set_defaults(func=cmd_list)

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
        type=_at_least(1),
        help="profiled (active) steps (default: the suite's [profile], or 5)",
    )
    prof.add_argument("--wait", type=_at_least(1), help="steps skipped first (default 1)")
    prof.add_argument("--warmup", type=_at_least(0), help="warm-up steps (default 2)")
    prof.add_argument(
        "--top", type=_at_least(1), default=5, help="kernels shown per phase (%(default)s)"
    )
    _add_placement(prof)
    prof.set_defaults(func=cmd_profile)

    rep = sub.add_parser(
        "report",
        help="plotted report of one or more runs (PNG/SVG, self-contained HTML, Markdown)",
        description="Figures (loss vs time and steps, time-to-target and speedup over the best "
        "SGD, per-phase step time, scaling with batch size / inversion interval / width, "
        "kernels, performance profile), an HTML page with them embedded and a Markdown summary.",
    )
    rep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run directories")
    rep.add_argument(
        "-o", "--output", type=Path, required=True, help="output folder, e.g. reports/<name>/"
    )
    rep.add_argument(
        "--claims",
        action="store_true",
        help="open the report with the K-FAC and SKFAC papers' claims, each set against what "
        "the runs measured, with a verdict (suites/reproduction_cpu.toml measures them all)",
    )
    rep.add_argument(
        "--baseline",
        default="sgd",
        metavar="OPTIMIZER",
        help="the optimizer every speed-up and step ratio divides by (sgd; adamw for a "
        "transformer); its cells must be in the runs",
    )
    rep.set_defaults(func=cmd_report)

    reb = sub.add_parser(
        "rebuild",
        help="rebuild committed reports from their committed runs (--check: compare instead)",
        description="Run again the `kfacbench report` command recorded in each report's "
        "summary.md header (every folder of reports/ by default; run from the repository root). "
        "With --check, build each into a temporary folder and compare its summary.md with the "
        "committed one byte for byte; exit 1 when one differs (CI runs this).",
    )
    reb.add_argument(
        "reports", type=Path, nargs="*", metavar="REPORT_DIR", help="default: reports/*/"
    )
    reb.add_argument(
        "--check", action="store_true", help="compare with the committed summary.md, write nothing"
    )
    reb.set_defaults(func=cmd_rebuild)

    cmp = sub.add_parser(
        "compare",
        help="compare two runs cell by cell; exit 1 on a regression",
        description="Match the cells of two run directories by config and print NEW / BASE per "
        "cell with a noise estimate (step_time: the p10-p90 spread of the step times). Exits 1 "
        "when a cell's ratio exceeds 1 + PCT/100, a cell that was ok fails or diverges, or a "
        "target is no longer reached.",
    )
    cmp.add_argument("base", type=Path, help="the reference run directory")
    cmp.add_argument("new", type=Path, help="the run directory under test")
    cmp.add_argument(
        "--metric",
        choices=METRICS,
        default="amortized",
        help="what to compare (%(default)s: training time / steps, refreshes included;"
        " step_time: the median step)",
    )
    cmp.add_argument(
        "--fail-above",
        type=_finite("percent"),
        default=10.0,
        metavar="PCT",
        help="relative increase counted as a regression, in percent (%(default)s)",
    )
    cmp.add_argument("--markdown", type=Path, metavar="FILE", help="also write a Markdown table")
    cmp.set_defaults(func=cmd_compare)

    reg = sub.add_parser(
        "regress",
        help="run the regression suite and compare normalised phase times with a baseline",
        description="Run SUITE (default ci) N times with its cells interleaved, divide every "
        "phase's median time by the SGD step of the same workload and batch size in the same "
        "pass, take the median over the passes, and compare with the baseline of this machine "
        "kind (results/baselines/<machine-kind>.parquet). Exits 1 when the whole step, or a "
        "phase that is at least --min-share of its step, grew by more than --fail-above percent "
        "and an A/B run of the baseline's commit and the current code on this machine confirms it "
        "(ratios of one CPU model differ between VMs). Record the baseline with --update-baseline "
        "on unchanged code, on the machine that gates.",
    )
    reg.add_argument("suite", nargs="?", default="ci", help="suite file or name (%(default)s)")
    reg.add_argument(
        "--run",
        type=Path,
        nargs="+",
        metavar="RUN_DIR",
        help="check existing runs (passes) instead of running the suite; a directory of passes"
        " written by an earlier `kfacbench regress` is expanded",
    )
    reg.add_argument(
        "--repeats",
        type=int,
        default=3,
        metavar="N",
        help="interleaved passes over the suite; each line is the median over them (%(default)s)",
    )
    reg.add_argument("--baseline", type=Path, help="baseline file (default: by machine kind)")
    reg.add_argument(
        "--update-baseline", action="store_true", help="write the baseline from this run"
    )
    reg.add_argument(
        "--fail-above",
        type=_finite("percent"),
        default=FAIL_ABOVE,
        metavar="PCT",
        help="allowed growth of a normalised phase time, percent (%(default)s)",
    )
    reg.add_argument(
        "--min-share",
        type=_finite("percent"),
        default=MIN_SHARE,
        metavar="PCT",
        help="phases below this share of their step are shown but do not gate (%(default)s)",
    )
    reg.add_argument(
        "--no-confirm",
        dest="confirm",
        action="store_false",
        help="exit 1 on lines flagged against the baseline file without confirming them by an"
        " A/B run of the baseline's commit and the current code on this machine",
    )
    reg.add_argument(
        "--against",
        metavar="REV",
        help="the commit the A/B confirmation runs (default: the one that last wrote the baseline)",
    )
    _add_placement(reg)
    reg.set_defaults(func=cmd_regress)

    diag = sub.add_parser(
        "diagnose",
        help="curvature quality along training: each approximation vs the exact natural gradient",
        description="Train each cell as `run` does and, at the steps --at, compare every "
        "curvature approximation's direction (K-FAC from this batch's factors, with factored "
        "and exact damping; the run's own optimizer with its possibly stale inverses; the "
        "gradient) with the exact damped natural-gradient direction (F + λI)⁻¹∇h, computed by "
        "conjugate gradient on exact Fisher-vector products: cosine, and the fraction of the "
        "exact quadratic model's reduction achieved (model ratio). On a few middle layers within "
        "--dense-budget parameters it also forms F, K-FAC's F̃ (all blocks) and the exact, "
        "block-diagonal and block-tridiagonal damped inverses densely (errors and heatmaps), and "
        "per layer it measures SKFAC's factor error against rank. Writes diagnostics.parquet "
        "(and dense/ heatmaps); `kfacbench report RUN_DIR` draws them.",
    )
    diag.add_argument("suite", nargs="?", default=DEFAULT_SUITE, help="suite file or name")
    diag.add_argument("--only", metavar="PATTERN", help="diagnose only cells that match")
    diag.add_argument(
        "--at",
        type=_steps,
        metavar="STEPS",
        help="checkpoints, e.g. 0,50,200 (default: the suite's [diagnose] at, or"
        f" {','.join(map(str, DIAGNOSE_AT))})",
    )
    diag.add_argument(
        "--fisher",
        choices=("exact", "empirical"),
        default="exact",
        help="the Fisher of the reference direction (%(default)s: type-2, the GGN)",
    )
    diag.add_argument(
        "--damping",
        type=_finite("λ", strict=True),
        help="λ for cells whose optimizer has none (SGD); K-FAC and SKFAC cells use their own",
    )
    diag.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue: checkpoints already diagnosed are not computed again (each part on"
        " its own: the scores, the dense diagnostics, SKFAC's rank ladder)",
    )
    diag.add_argument(
        "--dense-budget",
        type=_at_least(1),
        default=DENSE_BUDGET,
        metavar="P",
        help="parameters of the layers whose exact Fisher F, Kronecker approximation F̃ and"
        " damped inverses are formed densely (Martens & Grosse Figs. 2-3); by default the"
        " longest run of consecutive Linear layers that fits, nearest the middle (%(default)s)",
    )
    diag.add_argument(
        "--dense-layers",
        type=_names,
        metavar="NAMES",
        help="those layers instead, e.g. 8,10,11,13 (consecutive Linear layers, within the"
        " budget; names as in model.named_modules())",
    )
    diag.add_argument(
        "--no-dense", action="store_true", help="skip the dense diagnostics (and their heatmaps)"
    )
    diag.add_argument(
        "--no-rank",
        action="store_true",
        help="skip SKFAC's factor error against rank (per layer, ranks 8, 16, ... the batch)",
    )
    _add_placement(diag)
    diag.set_defaults(func=cmd_diagnose)

    doc = sub.add_parser(
        "doctor",
        help="check a machine: every method, the CUDA paths, profiling, a process group",
        description="A short acceptance of a machine (about 3 minutes on a GPU, 1 on a 2-core"
        " CPU) on synthetic data: versions; every registered method on an MLP autoencoder and"
        " ResNet-20 (finite, loss falling); a profiled K-FAC window whose kernels are attributed"
        " to its phases; on CUDA no host sync in non-refresh steps, CUDA-event vs wall-clock step"
        " times, peak memory, bf16 and TF32 cells; a torchrun group (gloo on CPU, nccl on CUDA)."
        " Prints pass / fail / skipped per check, writes OUT/doctor.parquet and exits 1 on any"
        " failure.",
    )
    doc.add_argument(
        "--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N (%(default)s)"
    )
    doc.add_argument(
        "--out", type=Path, help=f"folder for the table and traces (default {DOCTOR_OUT}/<time>)"
    )
    doc.add_argument(
        "--only", metavar="PATTERN", help="run the checks whose 'group: check' matches (glob)"
    )
    doc.set_defaults(func=cmd_doctor)

    show = sub.add_parser("show", help="summarise a run directory")
    show.add_argument("run_dir", type=Path, help="a run directory (results/runs/<suite>/<time>)")
    show.add_argument("--kernels", action="store_true", help="top kernels per optimizer and phase")
    show.add_argument("--top", type=_at_least(1), default=5, help="kernels per phase (%(default)s)")
    show.set_defaults(func=cmd_show)

    arith = sub.add_parser(
        "arithmetic",
        help="a run's SGD and kfac-fast cells against the FLOP model (kfacbench/optim/flops.py)",
    )
    arith.add_argument("run_dir", type=Path, help="a run directory")
    arith.set_defaults(func=cmd_arithmetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``kfacbench`` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        # Before any torch work: the CPU threads copy the setting when they start.
        subnormals.apply()
        return int(args.func(args, console))
    except KfacbenchError as exc:
        print(f"kfacbench: error: {exc}", file=sys.stderr)  # one line, never wrapped
        return 2


if __name__ == "__main__":
    sys.exit(main())
