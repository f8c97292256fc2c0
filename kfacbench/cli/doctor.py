"""``kfacbench doctor``: the acceptance of a machine."""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kfacbench.cli.common import device_spec
from kfacbench.core.device import resolve_device
from kfacbench.doctor import CheckResult, Doctor, run_check, write_results
from kfacbench.errors import KfacbenchError

DOCTOR_OUT = Path("results/doctor")


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench doctor`` with the subcommands ``sub``."""
    doc = sub.add_parser(
        "doctor",
        help="check a machine: every method, the CUDA paths, profiling, a process group",
        description="A short acceptance of a machine on synthetic data (on an H200 its 27 checks"
        " took 44 s, before the linalg probe was added: results/gpu/nvidia-h200/2026-11-30/):"
        " versions; every registered method on an MLP autoencoder and ResNet-20 (finite, loss"
        " falling); the linear-algebra probe at the refresh shapes; a profiled K-FAC window whose"
        " kernels are attributed to its phases; on CUDA no host sync in non-refresh steps,"
        " CUDA-event vs wall-clock step times, peak memory, bf16 and TF32 cells; a torchrun group"
        " (gloo on CPU, nccl on CUDA). Prints pass / fail / skipped per check, writes"
        " OUT/doctor.parquet and exits 1 on any failure.",
    )
    doc.add_argument(
        "--device", type=device_spec, default="auto", help="auto, cpu, cuda or cuda:N (%(default)s)"
    )
    doc.add_argument(
        "--out", type=Path, help=f"folder for the table and traces (default {DOCTOR_OUT}/<time>)"
    )
    doc.add_argument(
        "--only", metavar="PATTERN", help="run the checks whose 'group: check' matches (glob)"
    )
    doc.set_defaults(func=cmd_doctor)
