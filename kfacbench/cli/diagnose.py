"""``kfacbench diagnose``: curvature quality along training, against the exact natural
gradient."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kfacbench.cli.common import (
    DEFAULT_SUITE,
    add_placement,
    at_least,
    check_devices,
    check_resumable,
    finite,
    latest_run,
    new_store,
    read_suite,
    write_env,
)
from kfacbench.diagnostics.dense import (
    DENSE_BUDGET,
    DenseSelection,
    dense_part,
    dense_plan,
    rank_part,
)
from kfacbench.diagnostics.quality import CheckpointPart, diagnose_cells
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS
from kfacbench.runner import RunOptions
from kfacbench.runs.store import RunStore
from kfacbench.suite import Cell

DIAGNOSE_AT = (0, 50, 200)
"""Checkpoints of ``kfacbench diagnose`` when neither --at nor the suite sets them."""


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


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kfacbench diagnose`` with the subcommands ``sub``."""
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
        type=finite("λ", strict=True),
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
        type=at_least(1),
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
    add_placement(diag)
    diag.set_defaults(func=cmd_diagnose)
