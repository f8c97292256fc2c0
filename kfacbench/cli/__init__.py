"""The ``kfacbench`` command: run suites, list what exists, show results.

One module per command (``run``, ``list`` in :mod:`~kfacbench.cli.listing`, ``profile``,
``report``, ``rebuild``, ``compare``, ``regress``, ``diagnose``, ``doctor``, ``show``,
``arithmetic``), each with its ``add_parser`` and ``cmd_*``; what several share is in
:mod:`~kfacbench.cli.common`. The parser is assembled here, in :data:`COMMANDS` order (the order
``kfacbench --help`` lists them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from rich.console import Console

from kfacbench import plugins
from kfacbench.cli import (
    arithmetic,
    compare,
    diagnose,
    doctor,
    listing,
    profile,
    rebuild,
    regress,
    report,
    run,
    show,
)
from kfacbench.cli.common import read_suite
from kfacbench.core import subnormals
from kfacbench.errors import KfacbenchError

COMMANDS = (
    run,
    listing,
    profile,
    report,
    rebuild,
    compare,
    regress,
    diagnose,
    doctor,
    show,
    arithmetic,
)
"""The command modules, each adding its subcommand, in the order ``--help`` lists them."""

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
  kfacbench doctor --device cuda        check a GPU machine before measuring; exit 1 on a failure
  kfacbench list workloads
"""


class _Parser(argparse.ArgumentParser):
    """argparse with kfacbench's error format: one line and exit code 2 (usage is in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"kfacbench: error: {self.prog}: {message} (see {self.prog} --help)\n")


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
    for command in COMMANDS:
        command.add_parser(sub)
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
        # Plugins first: every command sees installed packages' and named files' methods.
        plugins.load_entry_points()
        for file in getattr(args, "plugin", None) or []:
            plugins.load_file(Path(file))
        return int(args.func(args, console))
    except KfacbenchError as exc:
        print(f"kfacbench: error: {exc}", file=sys.stderr)  # one line, never wrapped
        return 2


__all__ = ["COMMANDS", "build_parser", "main", "read_suite"]
