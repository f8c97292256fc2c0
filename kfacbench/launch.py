"""Launching a suite on several processes through torchrun, and what the launcher records.

``kfacbench run SUITE --nproc N`` does not run cells itself: it creates (or resumes) the run
directory and starts torchrun's elastic agent in-process (``torch.distributed.run``, the code
behind the ``torchrun`` command) with N workers, each ``python -m kfacbench run SUITE --resume
RUN_DIR``. A worker sees torchrun's environment, joins the process group and runs the cells with
the others (:func:`kfacbench.runner.run_cells`); rank 0 writes the tables.

When a worker fails, torchrun stops the others at once (its monitor polls every 0.1 s; a rank
blocked in a collective is terminated, and collectives time out after ``--dist-timeout`` in any
case), and ``elastic_launch`` raises ChildFailedError naming the first failed rank and its exit
code or signal. The launcher then records the cell that was running as ``error`` (``oom``) with
the failing rank's message, from the failure file the rank wrote (``dist/failure.rank<R>.json``)
or, for a rank that died without one (killed, segfault), from torchrun's report; on one node it
starts torchrun again for the cells left, so one bad cell does not end the suite.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import run as torchrun

from kfacbench.errors import KfacbenchError
from kfacbench.runs.store import atomic_write_bytes

TIMEOUT_ENV = "KFACBENCH_DIST_TIMEOUT"
"""Environment variable carrying ``--dist-timeout`` (seconds) to the workers."""

DIST_DIR = "dist"
"""Run-directory folder for the launcher's bookkeeping: the running cell, failures, ranks."""


@dataclass(frozen=True)
class LaunchOptions:
    """How to start the workers.

    Attributes:
        nproc: worker processes on this node (one per device).
        nnodes: nodes taking part (each runs the same command).
        rdzv_endpoint: ``host:port`` of the rendezvous (c10d) for several nodes; ``None`` on one
            node (torchrun's standalone mode).
        timeout_s: bound on every collective, so a rank that stops answering fails the job.
    """

    nproc: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    timeout_s: float = 300.0


@dataclass(frozen=True)
class Failure:
    """What is known about the failure that ended a torchrun job.

    Attributes:
        cell_id: the cell that was running, if known.
        status: ``error`` or ``oom``.
        message: one line for the ``error`` column.
        started_at: when that cell started (rank 0's clock), if known.
    """

    cell_id: str | None
    status: str
    message: str
    started_at: str | None = None


def torchrun_args(
    suite: str, run_dir: Path, worker_args: list[str], opts: LaunchOptions
) -> list[str]:
    """The torchrun command line (without ``torchrun``) for one launch."""
    if opts.nproc < 1 or opts.nnodes < 1:
        raise KfacbenchError(
            f"--nproc and --nnodes must be at least 1 (got {opts.nproc}, {opts.nnodes})"
        )
    args = [f"--nproc-per-node={opts.nproc}", f"--nnodes={opts.nnodes}", "--max-restarts=0"]
    if opts.rdzv_endpoint is None:
        if opts.nnodes > 1:
            raise KfacbenchError(
                "--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)"
            )
        args.append("--standalone")
    else:
        args += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={opts.rdzv_endpoint}",
            f"--rdzv-id=kfacbench-{run_dir.name}",
        ]
    return [*args, "-m", "kfacbench", "run", suite, "--resume", str(run_dir), *worker_args]


def launch(
    suite: str, run_dir: Path, worker_args: list[str], opts: LaunchOptions
) -> Failure | None:
    """Run one torchrun job over the cells not yet finished in ``run_dir``.

    Returns:
        ``None`` when every worker finished, else the :class:`Failure` that ended the job.
    """
    bookkeeping = run_dir / DIST_DIR
    bookkeeping.mkdir(parents=True, exist_ok=True)
    for stale in bookkeeping.glob("*.json"):
        stale.unlink()
    args = get_args_parser().parse_args(torchrun_args(suite, run_dir, worker_args, opts))
    os.environ[TIMEOUT_ENV] = str(opts.timeout_s)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        rank, first = exc.get_first_failure()
        if first.exitcode < 0:
            how = f"was killed by {first.signal_name()}"
        else:
            how = f"exited with code {first.exitcode}"
        return failure_of(bookkeeping, rank, f"rank {rank} {how} (no error reported)")
    return None


def failure_of(bookkeeping: Path, rank: int, fallback: str) -> Failure:
    """The failure of ``rank`` (the first to fail, as torchrun saw it): its own report when it
    wrote one, else the cell that was running with ``fallback`` (a rank killed or crashed
    without a Python exception). The other ranks' reports are consequences (a peer closed the
    connection) and are not used."""
    current_file = bookkeeping / "current.json"
    current = json.loads(current_file.read_text()) if current_file.exists() else {}
    started = current.get("started_at")
    report_file = bookkeeping / f"failure.rank{rank}.json"
    if report_file.exists():
        report: dict[str, Any] = json.loads(report_file.read_text())
        message = f"rank {rank}: {report['error']}"
        return Failure(report["cell_id"], report["status"], message, started)
    return Failure(current.get("cell_id"), "error", fallback, started)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """A small bookkeeping file, replaced atomically (read by the launcher after a failure)."""
    atomic_write_bytes(path, json.dumps(data).encode())
