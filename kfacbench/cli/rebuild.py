"""``kfacbench rebuild``: committed reports rebuilt from their committed runs (or checked)."""

from __future__ import annotations

import argparse
import difflib
import itertools
import re
import shlex
import tempfile
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from kfacbench.errors import KfacbenchError
from kfacbench.runner import one_line

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
    from kfacbench.cli import build_parser  # not at the top: the package imports this module
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench rebuild`` with the subcommands ``sub``."""
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
