"""Sweeps larger than one machine: every cell a job, through submitit (SLURM, or local processes).

``kfacbench run SUITE --submitit slurm`` submits each unfinished cell as one job of a job array
(submitit's SLURM executor; ``local`` runs the jobs as processes on this machine, which tests the
path but times cells that share the CPU). A job loads the suite copy stored in the run directory,
runs its cell with the ordinary runner and writes the cell's parts into the same run directory
(atomically), so the run directory must be on a filesystem every node sees. The launcher waits
for the jobs with a progress bar, records a job that died (time limit, preemption, node failure)
as an ``error`` cell with submitit's message, and rebuilds the tables from all parts. An
interrupted launcher loses nothing: ``--resume`` submits only the cells without parts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kfacbench.core import subnormals
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS
from kfacbench.runner import RunOptions, one_line, record_failure, run_cells
from kfacbench.runs.store import RunStore
from kfacbench.suite import Cell, load_suite
from kfacbench.workloads import WORKLOADS

EXECUTORS = ("local", "slurm")


@dataclass(frozen=True)
class ClusterOptions:
    """What submitit is asked for per job.

    Attributes:
        executor: ``slurm`` or ``local``.
        partition: SLURM partition (``None``: the cluster's default).
        timeout_min: the job's time limit in minutes.
        gpus_per_node: GPUs per job (one cell runs on one device).
        cpus_per_task: CPU cores per job.
        max_parallel: jobs of the array running at once (SLURM's ``%N``).
    """

    executor: str = "slurm"
    partition: str | None = None
    timeout_min: int = 60
    gpus_per_node: int = 0
    cpus_per_task: int = 4
    max_parallel: int = 64


def run_one(run_dir: str, cell_id: str, options: RunOptions) -> str:
    """The job: run cell ``cell_id`` of the suite stored in ``run_dir``; return its status."""
    subnormals.apply()  # a job is a fresh process: before its first kernel
    suite = load_suite(Path(run_dir) / "suite.toml", workloads=WORKLOADS, methods=METHODS)
    cells = [c for c in suite.cells if c.id == cell_id]
    if not cells:
        raise KfacbenchError(f"cell {cell_id} is not in {run_dir}/suite.toml")
    console = Console(stderr=True, quiet=True)
    # The other cells' jobs write into the same directory now: their temporary files are live.
    rows = run_cells(cells, RunStore(Path(run_dir)), options, console, other_writers=True)
    return str(rows[0]["status"]) if rows else "ok"


def _executor(folder: Path, cluster: ClusterOptions) -> Any:
    try:
        import submitit
    except ImportError:
        raise KfacbenchError(
            "--submitit needs the submitit package: pip install 'kfacbench[cluster]'"
        ) from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster.executor)
    params: dict[str, Any] = {
        "timeout_min": cluster.timeout_min,
        "gpus_per_node": cluster.gpus_per_node,
        "cpus_per_task": cluster.cpus_per_task,
        "slurm_array_parallelism": cluster.max_parallel,
    }
    if cluster.partition is not None:
        params["slurm_partition"] = cluster.partition
    executor.update_parameters(**params)
    return executor


def submit_cells(
    cells: Sequence[Cell],
    store: RunStore,
    options: RunOptions,
    cluster: ClusterOptions,
    console: Console,
) -> None:
    """Run every unfinished cell of ``store`` as a submitit job and wait for all of them."""
    if not (store.run_dir / "suite.toml").exists():
        raise KfacbenchError("--submitit needs the suite as a file (its copy in the run directory)")
    done = store.finished_ids()
    todo = [c for c in cells if c.id not in done]
    if not todo:
        console.print("every cell has its results: nothing to submit")
        return
    executor = _executor(store.run_dir / "jobs", cluster)
    store.remove_stale_files()  # before the jobs start writing: they leave temporary files alone
    with executor.batch():
        jobs = [executor.submit(run_one, str(store.run_dir), c.id, options) for c in todo]
    console.print(f"submitted {len(jobs)} jobs ({cluster.executor}); logs: {store.run_dir}/jobs")
    columns = (TextColumn("[bold]jobs"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pending = list(zip(todo, jobs, strict=True))
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("jobs", total=len(pending))
        while pending:
            still = []
            for cell, job in pending:
                if not job.done():
                    still.append((cell, job))
                    continue
                progress.advance(task)
                error = job.exception()
                if error is not None and cell.id not in store.finished_ids():
                    record_failure(cell, store, "error", f"job {job.job_id}: {one_line(error)}")
                    console.print(f"[yellow]{cell.label}: error[/] {escape(one_line(error))}")
            pending = still
            if pending:
                time.sleep(1.0)
    store.consolidate()
