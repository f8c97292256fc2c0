"""Speed-regression checks against a committed baseline (``kfacbench regress``).

Absolute step times do not survive a change of machine, nor the load of a shared CI runner, so
the regression record is *normalised*: every phase's median time of every cell divided by the
median SGD step of the same workload and batch size measured in the same run (DeepOBS' overhead
ratio, applied per phase). A K-FAC inverse that gets 20% slower moves its ratio by 20% whatever
the machine's speed that minute; a machine that is 20% slower for everything moves nothing.

On a shared machine the load also changes *between* cells, so one pass is not enough: the suite is
run several times, its cells interleaved (pass 1 runs SGD, K-FAC, SKFAC, pass 2 runs them again,
...), each pass normalised by its own SGD cells, and a line's ratio is the median over the passes.
Phases that are a small share of their step (an SGD ``update`` of 0.3 ms, a K-FAC inverse paid
every tenth step) move by tens of percent from scheduling noise alone, so only the whole step and
the phases above a share floor gate the check; the others are shown but never fail it.

Baselines are parquet files keyed by machine kind (``cpu``, ``cuda-nvidia-h100-80gb-hbm3``, ...,
from the run's ``env.json``), so a CPU baseline is never compared with a GPU run.

A kind is not a machine, though: two VMs that both call their CPU "Intel Xeon Processor" can
differ in cache and memory bandwidth, which moves a memory-bound phase (the momentum update)
relative to the compute-bound SGD step by 1.7× on unchanged code. So a line flagged against the
baseline file is only a suspicion: :func:`ab_records` confirms it by running the baseline's own
commit and the current code on this machine, in alternating processes, and comparing the two.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from kfacbench.core.timing import STEP
from kfacbench.errors import KfacbenchError
from kfacbench.machine_load import warning_line
from kfacbench.runs.environment import command_output
from kfacbench.runs.rundir import load_tables, read_env, read_table
from kfacbench.runs.schema import RECORD_COLUMNS, RECORD_KEYS
from kfacbench.runs.store import atomic_write_parquet, settings_of

FAIL_ABOVE = 50.0
"""Default threshold in percent, above the noise measured on unchanged code: on a 2-core VM,
21 runs of 3 passes against two 5-pass baselines recorded an hour apart moved gated lines by up
to 1.37x (README). A quieter machine (a dedicated GPU) can use a lower ``--fail-above``."""

MIN_SHARE = 5.0
"""Default share of its step (percent) below which a phase does not gate the check."""

REQUIRED = {
    "cells": ("cell_id", "label", "status", "workload", "batch_size", "optimizer"),
    "phases": ("cell_id", "phase", "median_ms"),
}
"""The columns of a run's tables that :func:`normalised_phases` uses."""


def machine_kind(run_dir: Path) -> str:
    """``cpu-<cpu model>`` or ``cuda-<gpu model>`` (lower case, dashes) from the run's
    ``env.json``: normalised ratios move between CPU models too (an update phase that is 6% of
    the step on one is 1.5× that, relative to SGD, on another), so baselines are per model."""
    env = read_env(run_dir)
    kind = "cuda" if env.get("device_kind") == "cuda" else "cpu"
    model = re.sub(r"[^a-z0-9]+", "-", str(env.get("device_name", kind)).lower()).strip("-")
    return f"{kind}-{model}"


def baseline_for(root: Path, kind: str) -> Path:
    """The baseline of a machine kind under ``root``: ``<kind>.parquet``, or for a CPU model
    without one the generic ``cpu.parquet`` (recorded before baselines were per model)."""
    specific = root / f"{kind}.parquet"
    generic = root / "cpu.parquet"
    return generic if kind.startswith("cpu-") and not specific.exists() else specific


def machine_of(run_dir: Path) -> str:
    """The facts that move normalised ratios between machines of one kind: the device's model,
    the number of CPU threads, the torch build and whether subnormal floats were flushed (e.g.
    ``AMD EPYC, 2 threads, torch 2.13.0, subnormals flushed``)."""
    env = read_env(run_dir)
    flushed = env.get("flush_denormal")
    subnormals = "?" if flushed is None else "flushed" if flushed else "kept"
    return (
        f"{env.get('device_name', '?')}, {env.get('torch_threads', '?')} threads,"
        f" torch {env.get('torch_version', '?')}, subnormals {subnormals}"
    )


def normalised_phases(run_dir: Path) -> pd.DataFrame:
    """One pass: per setting and phase (the whole ``step`` included) the median ms, its ratio to
    the SGD step of the same workload and batch size in the same run, and its share of the
    setting's own step.

    Raises:
        KfacbenchError: a missing or damaged run directory, a finished cell without a step time
            in ``phases`` (a record without it would pass the check unmeasured), or a workload
            and batch size without an SGD cell to normalise by.
    """
    tables = load_tables(run_dir, REQUIRED)
    cells = tables["cells"][tables["cells"]["status"] == "ok"].copy()
    timed = tables["phases"].loc[tables["phases"]["phase"] == STEP, "cell_id"]
    untimed = list(cells.loc[~cells["cell_id"].isin(timed), "label"])
    if untimed:
        names = ", ".join(untimed[:3]) + (", ..." if len(untimed) > 3 else "")
        raise KfacbenchError(
            f"{run_dir / 'phases.parquet'}: no step time for {len(untimed)} finished cell(s)"
            f" ({names}); damaged, or not the run's own table"
        )
    cells["setting"] = settings_of(cells["label"])
    phases = tables["phases"].merge(
        cells[["cell_id", "workload", "batch_size", "optimizer", "setting"]], on="cell_id"
    )
    sgd = phases[(phases["optimizer"] == "sgd") & (phases["phase"] == STEP)]
    sgd_step = sgd.groupby(["workload", "batch_size"])["median_ms"].median().rename("sgd_step_ms")
    merged = phases.merge(sgd_step.reset_index(), on=["workload", "batch_size"], how="left")
    missing = merged[merged["sgd_step_ms"].isna()][["workload", "batch_size"]].drop_duplicates()
    if not missing.empty:
        pairs = ", ".join(f"{w} bs={b}" for w, b in missing.itertuples(index=False))
        raise KfacbenchError(
            f"{run_dir}: no SGD cell to normalise by for {pairs}; a regression suite needs one"
            " SGD cell per workload and batch size"
        )
    merged["ratio"] = merged["median_ms"] / merged["sgd_step_ms"]
    record = merged.groupby([*RECORD_KEYS, "optimizer"], as_index=False)[
        ["median_ms", "sgd_step_ms", "ratio"]
    ].median()
    own_step = (
        record[record["phase"] == STEP].set_index(RECORD_KEYS[:3])["median_ms"].rename("own_step")
    )
    record = record.join(own_step, on=RECORD_KEYS[:3])
    record["share"] = record["median_ms"] / record["own_step"]
    return record.drop(columns="own_step").sort_values(RECORD_KEYS, ignore_index=True)


def busy_passes(run_dirs: Sequence[Path]) -> dict[Path, str]:
    """The passes with a cell timed on a busy machine, each with the warning that says so.

    Normalising by the same pass's SGD step cancels a load that is steady over the pass, not one
    that comes and goes between cells (a build starting next to the K-FAC cell); such a pass
    would show phantom regressions, so it does not gate (:mod:`kfacbench.machine_load`).
    """
    busy: dict[Path, str] = {}
    for run_dir in run_dirs:
        line = warning_line(load_tables(run_dir, {"cells": ["cell_id", "label"]})["cells"])
        if line is not None:
            busy[run_dir] = line
    return busy


def combine(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """The regression record of several interleaved passes: per line the median ratio over the
    passes, its range (``ratio_lo``, ``ratio_hi``: the noise seen in this measurement) and the
    median share of the step.

    Raises:
        KfacbenchError: no passes, or passes run on different machines.
    """
    if not run_dirs:
        raise KfacbenchError("no run directories to build a regression record from")
    machines = {machine_of(d) for d in run_dirs}
    if len(machines) > 1:
        raise KfacbenchError(f"passes from different machines: {sorted(machines)}")
    passes = pd.concat([normalised_phases(d) for d in run_dirs], ignore_index=True)
    grouped = passes.groupby([*RECORD_KEYS, "optimizer"], as_index=False)
    record = grouped[["median_ms", "sgd_step_ms", "ratio", "share"]].median()
    spread = grouped["ratio"].agg(ratio_lo="min", ratio_hi="max", repeats="count")
    record = record.merge(spread, on=[*RECORD_KEYS, "optimizer"])
    record["machine"] = machines.pop()
    return record[RECORD_COLUMNS].sort_values(RECORD_KEYS, ignore_index=True)


def write_baseline(record: pd.DataFrame, path: Path) -> None:
    """Store a regression record as the baseline (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(path, record)


def read_baseline(path: Path) -> pd.DataFrame:
    """A baseline written by :func:`write_baseline`.

    Raises:
        KfacbenchError: the file is missing, unreadable, lacks record columns or has no lines.
    """
    if not Path(path).exists():
        raise KfacbenchError(
            f"no baseline {path}; record one with `kfacbench regress --update-baseline` on"
            " unchanged code"
        )
    rewrite = "rewrite it with `kfacbench regress --update-baseline`"
    try:
        baseline = read_table(path, RECORD_COLUMNS)
    except KfacbenchError as exc:
        raise KfacbenchError(f"{exc}; not a regression baseline: {rewrite}") from None
    if baseline.empty:  # every line would be missing, and a missing line never fails the check
        raise KfacbenchError(f"{path}: a regression baseline without lines; {rewrite}")
    return baseline


def check(
    record: pd.DataFrame, baseline: pd.DataFrame, fail_above: float, min_share: float = 0.0
) -> pd.DataFrame:
    """Join the current record with the baseline and flag ratios above ``1 + fail_above`` times
    the baseline's.

    Only gated lines can be flagged: the whole step, and phases whose share of their step was at
    least ``min_share`` in the baseline or is now (a phase that grew from 1% to 30% of the step
    is gated by its new share). A gated line of the baseline that this record lacks is flagged
    ``missing``: a cell that failed, or a phase no longer timed, would otherwise pass the check
    unmeasured. Lines new in the record are kept with a NaN change, never flagged.
    """
    joined = baseline[[*RECORD_KEYS, "optimizer", "ratio", "share"]].merge(
        record[[*RECORD_KEYS, "optimizer", "ratio", "ratio_lo", "ratio_hi", "share"]],
        on=RECORD_KEYS,
        how="outer",
        suffixes=("_base", "_new"),
    )
    joined["optimizer"] = joined.pop("optimizer_new").fillna(joined.pop("optimizer_base"))
    joined["change"] = joined["ratio_new"] / joined["ratio_base"]
    share = joined[["share_base", "share_new"]].max(axis=1)
    joined["gated"] = (joined["phase"] == STEP) | (share >= min_share)
    joined["regressed"] = joined["gated"] & (joined["change"] > 1 + fail_above)
    joined["missing"] = joined["gated"] & joined["ratio_new"].isna()
    order = joined.assign(key=joined["change"].where(joined["gated"], -1.0))
    return order.sort_values("key", ascending=False, ignore_index=True).drop(columns="key")


def baseline_commit(path: Path) -> str | None:
    """The commit that last wrote the baseline file ``path``: the code it was measured on, since a
    baseline is recorded on unchanged code and committed alone. ``None`` when git, the file's
    history or the repository is not there (an untracked file, a shallow clone: there the
    oldest commit present seems to have written every file, and an A/B run of it against the
    current code would clear a real regression)."""
    where = path.resolve().parent
    if command_output(["git", "rev-parse", "--is-shallow-repository"], where) != "false":
        return None
    return command_output(["git", "log", "-1", "--format=%H", "--", path.name], where)


def export_commit(rev: str, repo: Path, dest: Path) -> Path:
    """Write the tree of commit ``rev`` of the git repository around ``repo`` into ``dest``.

    Raises:
        KfacbenchError: git is missing, or the commit is not in the repository.
    """
    try:
        proc = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=repo, capture_output=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise KfacbenchError(f"cannot export commit {rev}: {exc}") from None
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise KfacbenchError(f"cannot export commit {rev} of {repo}: {why[-1] if why else '?'}")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_pass_in(
    source: Path, suite: Path, out: Path, device: str | None, cache_dir: Path | None
) -> Path:
    """One pass of ``suite`` run by the kfacbench source tree ``source`` (the directory holding
    the ``kfacbench`` package) in a fresh Python process; returns its run directory.

    Raises:
        KfacbenchError: the run did not finish every cell.
    """
    # -P: `python -m` would otherwise put the working directory, maybe a checkout of the current
    # code, ahead of PYTHONPATH.
    cmd = [sys.executable, "-P", "-m", "kfacbench", "run", str(suite), "--out", str(out)]
    if device is not None:
        cmd += ["--device", device]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    runs = sorted(p.parent for p in out.glob("*/*/cells.parquet"))
    if proc.returncode != 0 or len(runs) != 1:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise KfacbenchError(f"`kfacbench run` of {source} exited {proc.returncode}: {why}")
    return runs[0]


def ab_records(
    suite: Path,
    old_source: Path,
    new_source: Path,
    repeats: int,
    out: Path,
    device: str | None = None,
    cache_dir: Path | None = None,
    on_pass: Callable[[str, Path], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Regression records of two source trees measured together on this machine: ``repeats``
    passes each, in the order old, new, new, old, old, ... so that a drift of the machine's
    speed falls on both alike, every pass in its own process (no warm caches or compiled kernels
    carried over). Busy passes are dropped, as in the check itself.

    Returns:
        The records of ``old_source`` and of ``new_source`` (:func:`combine`).

    Raises:
        KfacbenchError: a pass failed, or every pass of one side ran on a busy machine.
    """
    sides: dict[str, tuple[Path, list[Path]]] = {"old": (old_source, []), "new": (new_source, [])}
    for i in range(repeats):
        for side in ("old", "new") if i % 2 == 0 else ("new", "old"):
            source, dirs = sides[side]
            run_dir = run_pass_in(source, suite, out / f"{side}-{i + 1}", device, cache_dir)
            dirs.append(run_dir)
            if on_pass is not None:
                on_pass(side, run_dir)
    records = []
    for source, dirs in sides.values():
        busy = busy_passes(dirs)
        quiet = [d for d in dirs if d not in busy]
        if not quiet:
            raise KfacbenchError(f"every pass of {source} ran on a busy machine")
        records.append(combine(quiet))
    return records[0], records[1]
