"""``kfacbench compare``: two runs cell by cell; exit 1 on a regression."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kfacbench.cli.common import finite
from kfacbench.runs.compare import METRICS, compare_runs


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench compare`` with the subcommands ``sub``."""
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
        type=finite("percent"),
        default=10.0,
        metavar="PCT",
        help="relative increase counted as a regression, in percent (%(default)s)",
    )
    cmp.add_argument("--markdown", type=Path, metavar="FILE", help="also write a Markdown table")
    cmp.set_defaults(func=cmd_compare)
