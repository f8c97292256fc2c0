"""``kfacbench regress``: normalised phase times against a machine's baseline (the CI check)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import kfacbench
from kfacbench.cli.common import add_placement, check_devices, finite, read_suite
from kfacbench.errors import KfacbenchError
from kfacbench.runner import RunOptions, run_cells
from kfacbench.runs.regress import (
    FAIL_ABOVE,
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
from kfacbench.runs.schema import RECORD_KEYS
from kfacbench.runs.store import RunStore, fresh_dir
from kfacbench.suite import Suite

BASELINES = Path("results/baselines")


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
    :mod:`kfacbench.runs.regress`): exit 1 only when the baseline's own commit, run here with the
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

    new_source = Path(kfacbench.__file__).resolve().parent.parent
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
    ab = ab.merge(flagged[[*RECORD_KEYS, "change"]], on=RECORD_KEYS, suffixes=("", "_file"))
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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench regress`` with the subcommands ``sub``."""
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
        type=finite("percent"),
        default=FAIL_ABOVE,
        metavar="PCT",
        help="allowed growth of a normalised phase time, percent (%(default)s)",
    )
    reg.add_argument(
        "--min-share",
        type=finite("percent"),
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
    add_placement(reg)
    reg.set_defaults(func=cmd_regress)
