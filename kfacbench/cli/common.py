"""What the commands share: finding suites, opening run directories, argument types and
tables printed by more than one command."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import tomllib
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kfacbench.core.device import resolve_device
from kfacbench.errors import KfacbenchError, SuiteError
from kfacbench.machine_load import busy_cells, warning_line
from kfacbench.optim import METHODS
from kfacbench.profiling import top_kernels
from kfacbench.runner import one_line
from kfacbench.runs.environment import environment
from kfacbench.runs.rundir import read_manifest
from kfacbench.runs.store import RunStore, new_manifest
from kfacbench.suite import DEVICE, Cell, Suite, load_suite
from kfacbench.workloads import WORKLOADS

DEFAULT_SUITE = "quick"
DEFAULT_OUT = Path("results/runs")


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


def new_store(out: Path, suite: str) -> RunStore:
    """A new run directory ``out/<suite>/<timestamp>``, or a one-line error naming ``--out``."""
    if out.exists() and not out.is_dir():
        raise KfacbenchError(f"--out {out}: exists and is not a directory")
    try:
        return RunStore.new(out, suite)
    except OSError as exc:
        raise KfacbenchError(f"--out {out}: cannot create a run directory: {exc}") from None


def kernels_table(kernels: pd.DataFrame, top: int, title: str) -> Table:
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


def warn_busy(console: Console, cells: pd.DataFrame) -> None:
    """Name the cells timed on a busy machine, and say what to do (:mod:`machine_load`)."""
    line = warning_line(cells)
    if line is None:
        return
    for rec in busy_cells(cells).to_dict("records"):
        console.print(f"[yellow]busy[/] {escape(str(rec['label']))}: {escape(rec['busy_reason'])}")
    console.print(f"[yellow]warning[/]: {escape(line)}")


def at_least(minimum: int) -> Callable[[str], int]:
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


def finite(what: str, *, strict: bool = False) -> Callable[[str], float]:
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


def device_spec(text: str) -> str:
    """An argparse type: a device spec the suite's ``device`` setting also takes."""
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_placement(parser: argparse.ArgumentParser) -> None:
    """Where results go, where cells run and where data comes from (``run`` and ``profile``)."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results root (%(default)s)")
    parser.add_argument(
        "--device", type=device_spec, help="override the suite's device: auto, cpu, cuda, cuda:N"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="folder with real data files (also $KFACBENCH_DATA)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="cache for generated data (default $KFACBENCH_CACHE or ~/.cache/kfacbench)",
    )


def add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin FILE`` (repeatable): a plugin file's methods and workloads, loaded before the
    command runs (docs/plugins.md)."""
    parser.add_argument(
        "--plugin",
        action="append",
        metavar="FILE",
        help="a Python file defining METHODS and/or WORKLOADS (repeatable; docs/plugins.md)",
    )
