"""``kfacbench report``: the plotted report of one or more runs."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from rich.console import Console


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench report`` with the subcommands ``sub``."""
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
