"""The runs a report reads: their tables concatenated into one :class:`ReportData`, and where
they came from (:class:`Provenance`: the manifests, commits and paths that decide whether a
report can be published)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kfacbench.diagnostics.quality import diagnostics_frame
from kfacbench.errors import KfacbenchError
from kfacbench.runs.rundir import load_tables, read_env, read_manifest, read_table
from kfacbench.runs.store import settings_of

ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])/(?:[\w.+-]+/)+[\w.+-]*")
"""A path of the machine (``/work/x/``, ``/tmp/run``) in text a reader gets: a report that
names one cannot be rebuilt elsewhere and says where someone's files were."""


@dataclass
class Provenance:
    """Where one run of a report came from, and why it could not be published as it is."""

    path: str
    """The run folder as the report names it: relative to the working directory."""
    command: str | None
    """The command that made the run (its ``manifest.json``), None without a manifest."""
    commit: str | None
    note: str | None = None
    """The manifest's note: how a manifest written after the run was recovered."""
    problems: list[str] = field(default_factory=list)
    """Each reason the run is not a published run: not committed, a dirty tree, a machine path,
    no manifest. Empty for a run that can be published."""


def provenance(run_dir: Path, env: dict[str, Any] | None) -> Provenance:
    """The provenance of ``run_dir``: its manifest, commit and the problems a reader would meet.

    A published run lives under ``results/<device>/<date>/`` (committed; ``results/runs/`` is
    git-ignored), has a ``manifest.json`` naming the command and a clean commit, and no path of
    the machine in its command.
    """
    problems = []
    try:
        shown = run_dir.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        shown = run_dir.as_posix()
        problems.append(f"{shown} is outside the working directory (a path of this machine)")
    parts = Path(shown).parts
    if len(parts) < 3 or parts[0] != "results" or parts[1] == "runs":
        problems.append(f"{shown} is not a committed run folder (results/<device>/<date>/...)")
    manifest_path = run_dir / "manifest.json"
    manifest = read_manifest(manifest_path) if manifest_path.exists() else None
    command = manifest["command"] if manifest else None
    commit = (manifest or {}).get("commit") or (env or {}).get("git_commit")
    if manifest is None:
        problems.append(f"{shown} has no manifest.json (the command that made it is not recorded)")
    elif ABSOLUTE_PATH.search(str(command)):
        problems.append(f"{shown}: its command names a path of the machine")
    if commit is None:
        problems.append(f"{shown}: the commit it ran at is not recorded")
    elif str(commit).endswith("-dirty") or (manifest or {}).get("dirty"):
        problems.append(f"{shown} was made from a tree with uncommitted changes ({commit})")
    note = (manifest or {}).get("note")
    return Provenance(shown, command, commit, note=note, problems=problems)


def setting_names(cells: pd.DataFrame) -> pd.Series:
    """Each cell's setting: its label without the seed, and, when the cells come from several
    suites, the suite's name after it. The seeds of one setting in one suite are its replicates;
    the same label in two suites is two settings (their min-max band is not a seed spread)."""
    names = settings_of(cells["label"].astype(str))
    if "suite" in cells and cells["suite"].nunique() > 1:
        names = names + " [" + cells["suite"].astype(str) + "]"
    return names


BASELINE = "sgd"
"""The optimizer a report's speed-ups and step ratios divide by unless it names another
(``kfacbench report --baseline adamw``: a transformer's baseline is AdamW, not SGD)."""


@dataclass
class ReportData:
    """The concatenated tables of the runs in a report."""

    cells: pd.DataFrame
    curves: pd.DataFrame
    phases: pd.DataFrame
    kernels: pd.DataFrame | None
    envs: list[dict[str, Any]]
    suites: list[tuple[str, str]]
    diagnostics: pd.DataFrame | None = None
    """The ``kfacbench diagnose`` runs' rows, with a ``suite`` column (None: no such run)."""
    heatmaps: dict[tuple[str, int], Path] = field(default_factory=dict)
    """The dense diagnostics' heatmap files, by cell id and step."""
    runs: list[Provenance] = field(default_factory=list)
    """Each run folder's provenance, in the order given."""
    baseline: str = BASELINE
    """The optimizer the speed-ups and step ratios divide by."""


REQUIRED = {
    "cells": (
        "cell_id", "suite", "label", "workload", "optimizer", "batch_size", "inv_interval",
        "seed", "hparams", "status", "steps", "train_time_s", "time_to_target_s",
        "median_step_ms",
    ),
    "curves": ("cell_id", "step", "train_time_s", "train_loss"),
    "phases": ("cell_id", "phase", "total_s"),
    "kernels": ("optimizer", "phase", "kernel", "category", "share"),
    "diagnostics": (
        "cell_id", "label", "optimizer", "step", "approximation", "layer", "metric", "value",
    ),
}  # fmt: skip
"""The columns of each table that the report's figures and tables use."""


def load_runs(run_dirs: Sequence[Path]) -> ReportData:
    """Read and concatenate the runs' tables (cells gain a ``setting`` column: the label
    without its seed). A run directory holds timed cells (``kfacbench run``), kernels
    (``profile``) or curvature diagnostics (``diagnose``: ``diagnostics.parquet`` and the dense
    heatmaps under ``dense/``).

    Raises:
        KfacbenchError: a missing or damaged table or ``env.json`` (a
            :class:`~kfacbench.errors.RunDirError`), or no run with cells or diagnostics.
    """
    parts: dict[str, list[pd.DataFrame]] = {
        "cells": [], "curves": [], "phases": [], "kernels": [], "diagnostics": [],
    }  # fmt: skip
    envs, suites, runs = [], [], []
    heatmaps: dict[tuple[str, int], Path] = {}
    for run_dir in run_dirs:
        kernels_path = run_dir / "kernels.parquet"
        diagnostics_path = run_dir / "diagnostics.parquet"
        timed = ("cells", "curves", "phases")
        other = kernels_path.exists() or diagnostics_path.exists()
        if not other or any((run_dir / f"{n}.parquet").exists() for n in timed):
            # Not a `kfacbench profile` or `diagnose` directory, which hold no timed cells.
            tables = load_tables(run_dir, {n: REQUIRED[n] for n in timed})
            for name, table in tables.items():
                parts[name].append(table)
        if kernels_path.exists():
            parts["kernels"].append(read_table(kernels_path, REQUIRED["kernels"]))
        if diagnostics_path.exists():
            table = read_table(diagnostics_path, REQUIRED["diagnostics"])
            parts["diagnostics"].append(
                diagnostics_frame([table]).assign(suite=run_dir.parent.name)
            )
            for path in sorted((run_dir / "dense").glob("*.npz")):
                cell_id, _, step = path.stem.rpartition(".s")
                if step.isdigit():
                    heatmaps[(cell_id, int(step))] = path
        env = read_env(run_dir) if (run_dir / "env.json").exists() else None
        if env is not None:
            envs.append(env)
        runs.append(provenance(run_dir, env))
        if (run_dir / "suite.toml").exists():
            # Shown as text only: damage shows as such, never stops the report.
            text = (run_dir / "suite.toml").read_text(errors="replace")
            suites.append((runs[-1].path, text))
    if not parts["cells"] and not parts["diagnostics"]:
        raise KfacbenchError(
            "a report needs at least one run directory with cells.parquet (`kfacbench run`) or"
            " diagnostics.parquet (`kfacbench diagnose`)"
        )
    for name in timed:  # a diagnostics-only report: empty timing tables with their columns
        parts[name] = parts[name] or [pd.DataFrame(columns=list(REQUIRED[name]))]
    cells = pd.concat(parts["cells"], ignore_index=True).drop_duplicates("cell_id", keep="last")
    cells["setting"] = setting_names(cells)
    kernels = pd.concat(parts["kernels"], ignore_index=True) if parts["kernels"] else None
    diagnostics = None
    if parts["diagnostics"]:
        key = ["cell_id", "step", "approximation", "layer", "rank", "metric"]
        diagnostics = pd.concat(parts["diagnostics"], ignore_index=True).drop_duplicates(
            key, keep="last"
        )
    return ReportData(
        cells=cells,
        curves=pd.concat(parts["curves"], ignore_index=True),
        phases=pd.concat(parts["phases"], ignore_index=True),
        kernels=kernels,
        envs=envs,
        suites=suites,
        diagnostics=diagnostics,
        heatmaps=heatmaps,
        runs=runs,
    )
