"""Plotted comparison reports: seaborn figures (PNG + SVG), one self-contained HTML page, Markdown.

``kfacbench report RUN_DIR [RUN_DIR ...] -o DIR`` reads the tables of one or more runs and writes:

- ``loss_<workload>.{png,svg}``: training loss vs wall-clock time and vs steps, the median over
  seeds with a min-max band (curves are interpolated onto a common time grid per setting, since
  seeds do not log at the same seconds);
- ``time_to_target.{png,svg}``: median time-to-target per setting, with the speedup over the
  best-tuned SGD setting of the workload;
- ``phases.{png,svg}``: the per-step time broken down by phase (amortised: a phase's total time
  over the cell's steps, so refreshes every T steps count 1/T), stacked;
- ``scaling_<axis>.{png,svg}``: step time vs batch size, vs inversion interval and vs layer width
  (the ``wide_ae_W`` workloads), for whichever of these axes the runs swept;
- ``kernels.{png,svg}``: the top kernels per optimizer and phase, when a kernels table exists;
- ``performance_profile.{png,svg}``: across workloads, the fraction of workloads on which each
  optimizer's time-to-target is within τ of the best (AlgoPerf's performance profile, τ ≤ 4);
- ``index.html`` (figures embedded as data URIs: no network needed) and ``summary.md``.

Every figure gives an optimizer the same colour (:func:`optimizer_colors`); settings of one
optimizer differ by line style or hatch.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullLocator, PercentFormatter

from kfacbench.core.timing import STEP
from kfacbench.errors import KfacbenchError
from kfacbench.machine_load import busy_cells, warning_line
from kfacbench.optim import METHODS
from kfacbench.optim.peers import COUNTERPARTS
from kfacbench.rundir import load_tables, read_env, read_table
from kfacbench.store import settings_of

TAU_MAX = 4.0
"""Largest ratio to the best time-to-target shown by the performance profile (AlgoPerf's r_max)."""
_WIDTH = re.compile(r"^wide_ae_(\d+)$")
_DASHES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1))]


def optimizer_colors(optimizers: Sequence[str] = ()) -> dict[str, Any]:
    """One colour per optimizer, the same in every figure and report: registered methods in
    registry order, then any other name (a peer) after them."""
    names = list(METHODS) + sorted(set(optimizers) - set(METHODS))
    palette = sns.color_palette("colorblind", len(names))
    return dict(zip(names, palette, strict=True))


@dataclass
class ReportData:
    """The concatenated tables of the runs in a report."""

    cells: pd.DataFrame
    curves: pd.DataFrame
    phases: pd.DataFrame
    kernels: pd.DataFrame | None
    envs: list[dict[str, Any]]
    suites: list[tuple[str, str]]


REQUIRED = {
    "cells": (
        "cell_id", "suite", "label", "workload", "optimizer", "batch_size", "inv_interval",
        "seed", "status", "steps", "train_time_s", "time_to_target_s", "median_step_ms",
    ),
    "curves": ("cell_id", "step", "train_time_s", "train_loss"),
    "phases": ("cell_id", "phase", "total_s"),
    "kernels": ("optimizer", "phase", "kernel", "category", "share"),
}  # fmt: skip
"""The columns of each table that the report's figures and tables use."""


def load_runs(run_dirs: Sequence[Path]) -> ReportData:
    """Read and concatenate the runs' tables (cells gain a ``setting`` column: the label
    without its seed).

    Raises:
        KfacbenchError: a missing or damaged table or ``env.json`` (a
            :class:`~kfacbench.errors.RunDirError`), or no run with cells.
    """
    parts: dict[str, list[pd.DataFrame]] = {"cells": [], "curves": [], "phases": [], "kernels": []}
    envs, suites = [], []
    for run_dir in run_dirs:
        kernels_path = run_dir / "kernels.parquet"
        timed = ("cells", "curves", "phases")
        if not kernels_path.exists() or any((run_dir / f"{n}.parquet").exists() for n in timed):
            # Not a `kfacbench profile` directory, which holds the kernels table only.
            tables = load_tables(run_dir, {n: REQUIRED[n] for n in timed})
            for name, table in tables.items():
                parts[name].append(table)
        if kernels_path.exists():
            parts["kernels"].append(read_table(kernels_path, REQUIRED["kernels"]))
        if (run_dir / "env.json").exists():
            envs.append(read_env(run_dir))
        if (run_dir / "suite.toml").exists():
            # Shown as text only: damage shows as such, never stops the report.
            suites.append((str(run_dir), (run_dir / "suite.toml").read_text(errors="replace")))
    if not parts["cells"]:
        raise KfacbenchError(
            "a report needs at least one run directory with cells.parquet (`kfacbench run`)"
        )
    cells = pd.concat(parts["cells"], ignore_index=True).drop_duplicates("cell_id", keep="last")
    cells["setting"] = settings_of(cells["label"])
    kernels = pd.concat(parts["kernels"], ignore_index=True) if parts["kernels"] else None
    return ReportData(
        cells=cells,
        curves=pd.concat(parts["curves"], ignore_index=True),
        phases=pd.concat(parts["phases"], ignore_index=True),
        kernels=kernels,
        envs=envs,
        suites=suites,
    )


# ---------------------------------------------------------------- figures
def _save(fig: plt.Figure, out: Path, name: str) -> str:
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return name


def _styles(cells: pd.DataFrame) -> dict[str, Any]:
    """A line style per setting, cycling within each optimizer."""
    styles: dict[str, Any] = {}
    for _, group in cells.groupby("optimizer"):
        for i, setting in enumerate(sorted(group["setting"].unique())):
            styles[setting] = _DASHES[i % len(_DASHES)]
    return styles


def _median_band(
    runs: list[pd.DataFrame], x: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max of the seeds' loss curves on a common grid of ``x``, over the range
    every seed has logged (no flat extrapolation before the first logged point)."""
    start = max(float(r[x].min()) for r in runs)
    end = min(float(r[x].max()) for r in runs)
    grid = np.linspace(start, end, 120) if end > start else np.array([start])
    values = np.stack([np.interp(grid, r[x], r["train_loss"]) for r in runs])
    return grid, np.median(values, 0), values.min(0), values.max(0)


def loss_figures(data: ReportData, out: Path, colors: dict[str, Any]) -> list[str]:
    """Training loss vs wall-clock and vs steps, one figure per workload."""
    names = []
    styles = _styles(data.cells)
    curves = data.curves.dropna(subset=["train_loss"]).merge(
        data.cells[["cell_id", "workload", "optimizer", "setting"]], on="cell_id"
    )
    for workload, wcurves in curves.groupby("workload"):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for (opt_key, set_key), group in wcurves.groupby(["optimizer", "setting"]):
            optimizer, setting = str(opt_key), str(set_key)
            runs = [g.sort_values("step") for _, g in group.groupby("cell_id")]
            for ax, x in zip(axes, ("train_time_s", "step"), strict=True):
                grid, med, low, high = _median_band(runs, x)
                label = setting.removeprefix(f"{workload} ")
                ax.plot(grid, med, color=colors[optimizer], linestyle=styles[setting], label=label)
                if len(runs) > 1:
                    ax.fill_between(grid, low, high, color=colors[optimizer], alpha=0.15)
        axes[0].set_xlabel("training time (s, evals excluded)")
        axes[1].set_xlabel("steps")
        axes[0].set_ylabel("training loss (minibatch mean)")
        if (wcurves["train_loss"] > 0).all():
            axes[0].set_yscale("log")
        for ax in axes:
            ax.grid(True, alpha=0.3)
        fig.suptitle(f"{workload}: training loss (median over seeds, band: min-max)")
        axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
        names.append(_save(fig, out, f"loss_{workload}"))
    return names


def time_to_target_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Per workload and setting: median time-to-target over seeds (NaN: not reached by every
    seed), seeds, and the speedup over the workload's best SGD setting."""
    ok = cells[cells["status"] == "ok"]
    rows = []
    for (workload, optimizer, setting), g in ok.groupby(["workload", "optimizer", "setting"]):
        ttt = g["time_to_target_s"]
        median = float(ttt.median()) if ttt.notna().all() else math.nan
        rows.append(
            {
                "workload": workload,
                "optimizer": optimizer,
                "setting": setting,
                "seeds": len(g),
                "time_to_target_s": median,
                "median_step_ms": float(g["median_step_ms"].median()),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    best_sgd = table[table["optimizer"] == "sgd"].groupby("workload")["time_to_target_s"].min()
    table["speedup_vs_best_sgd"] = table.apply(
        lambda r: best_sgd.get(r["workload"], math.nan) / r["time_to_target_s"], axis=1
    )
    return table.sort_values(["workload", "time_to_target_s"], ignore_index=True)


def time_to_target_figure(table: pd.DataFrame, out: Path, colors: dict[str, Any]) -> list[str]:
    reached = table.dropna(subset=["time_to_target_s"]) if not table.empty else table
    if reached.empty:
        return []
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(reached) + 1.5))
    sns.barplot(
        reached,
        y="setting",
        x="time_to_target_s",
        hue="optimizer",
        palette=colors,
        dodge=False,
        ax=ax,
    )
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    for bar, speedup in zip(bars, reached["speedup_vs_best_sgd"], strict=False):
        if math.isfinite(speedup):
            ax.annotate(
                f"{speedup:.2f}× best SGD",
                (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
    ax.set_xlabel("time to target (s of training, median over seeds)")
    ax.set_ylabel("")
    ax.set_title("Time to target (settings that reached it with every seed)")
    ax.legend(title="optimizer", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return [_save(fig, out, "time_to_target")]


def phase_table(data: ReportData) -> pd.DataFrame:
    """Amortised ms per step of each phase per setting (median over seeds)."""
    phases = data.phases[data.phases["phase"] != STEP].merge(
        data.cells[["cell_id", "workload", "optimizer", "setting", "steps"]], on="cell_id"
    )
    phases["ms_per_step"] = phases["total_s"] * 1e3 / phases["steps"].clip(lower=1)
    medians = phases.groupby(["workload", "optimizer", "setting", "phase"])["ms_per_step"].median()
    return medians.reset_index().sort_values(["workload", "optimizer", "setting"])


PHASE_ORDER = ("forward", "backward", "curvature", "inverse", "precondition", "rescale", "update")


def phase_figure(data: ReportData, out: Path) -> list[str]:
    """Stacked per-phase bars, one panel per workload (each with its own time axis)."""
    table = phase_table(data)
    if table.empty:
        return []
    phases = [p for p in PHASE_ORDER if p in set(table["phase"])]
    phases += sorted(set(table["phase"]) - set(phases))
    palette = dict(zip(phases, sns.color_palette("Set2", len(phases)), strict=True))
    workloads = sorted(table["workload"].unique())
    counts = [table[table["workload"] == w]["setting"].nunique() for w in workloads]
    fig, axes = plt.subplots(
        len(workloads),
        1,
        figsize=(10, 0.42 * sum(counts) + 1.2 * len(workloads)),
        gridspec_kw={"height_ratios": counts},
        squeeze=False,
    )
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        wide = (
            table[table["workload"] == workload]
            .pivot_table(index="setting", columns="phase", values="ms_per_step", aggfunc="sum")
            .reindex(columns=[p for p in phases if p in set(table["phase"])])
            .fillna(0.0)
        )
        wide.index = [str(i).removeprefix(f"{workload} ") for i in wide.index]
        wide.plot.barh(
            stacked=True, ax=ax, color=[palette[p] for p in wide.columns], width=0.75, legend=False
        )
        ax.set_title(workload, loc="left", fontsize=10)
        ax.set_xlabel("ms per step (amortised over the cell's steps; median over seeds)")
        ax.invert_yaxis()
    handles = [Rectangle((0, 0), 1, 1, color=palette[p]) for p in phases]
    fig.legend(handles, phases, title="phase", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Where a step's time goes, by phase")
    fig.tight_layout()
    return [_save(fig, out, "phases")]


def scaling_figures(data: ReportData, out: Path, colors: dict[str, Any]) -> list[str]:
    """Step time vs each swept axis (batch size, inversion interval, width)."""
    cells = data.cells[data.cells["status"] == "ok"].copy()
    cells["width"] = cells["workload"].map(
        lambda w: int(m.group(1)) if (m := _WIDTH.match(w)) else math.nan
    )
    cells["family"] = cells["workload"].map(lambda w: "wide_ae" if _WIDTH.match(w) else w)
    names = []
    axes_spec = (
        ("batch_size", "batch size (examples)", "workload"),
        ("inv_interval", "inversion interval T_inv (steps)", "workload"),
        ("width", "hidden width W of wide_ae_W", "family"),
    )
    for axis, xlabel, facet in axes_spec:
        swept = cells.dropna(subset=[axis])
        varied = swept.groupby(facet)[axis].nunique()
        swept = swept[swept[facet].isin(varied[varied >= 2].index)]
        if swept.empty:
            continue
        grid = sns.relplot(
            swept,
            x=axis,
            y="median_step_ms",
            hue="optimizer",
            palette={k: v for k, v in colors.items() if k in set(swept["optimizer"])},
            col=facet,
            kind="line",
            marker="o",
            estimator="median",
            errorbar=None,
            facet_kws={"sharey": False, "sharex": False},
            height=3.6,
            col_wrap=min(3, swept[facet].nunique()),
        )
        grid.set(xscale="log", yscale="log")
        for ax in grid.axes.flat:  # label the swept values themselves, not log decades
            values = sorted(swept[axis].unique())
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.xaxis.set_minor_locator(NullLocator())
        grid.set_axis_labels(xlabel, "median step time (ms)")
        grid.figure.suptitle(
            f"Step time vs {xlabel} (median over each optimizer's other settings)", y=1.03
        )
        names.append(_save(grid.figure, out, f"scaling_{axis}"))
    return names


def kernel_figure(data: ReportData, out: Path, top: int = 3) -> list[str]:
    """The ``top`` kernels (or CPU operators) of every phase, one panel per optimizer, bars
    coloured by kernel category."""
    if data.kernels is None or data.kernels.empty:
        return []
    k = data.kernels[~data.kernels["kernel"].str.startswith("(")]
    shares = k.groupby(["optimizer", "phase", "kernel", "category"])["share"].mean().reset_index()
    k = shares.sort_values("share", ascending=False).groupby(["optimizer", "phase"]).head(top)
    k = k.assign(row=k["phase"] + ": " + k["kernel"].str.slice(0, 48)).sort_values(
        ["optimizer", "phase", "share"], ascending=[True, True, False]
    )
    categories = sorted(k["category"].unique())
    palette = dict(zip(categories, sns.color_palette("tab10", len(categories)), strict=True))
    height = max(3.0, 0.28 * k.groupby("optimizer").size().max())
    grid = sns.catplot(
        k,
        y="row",
        x="share",
        hue="category",
        col="optimizer",
        kind="bar",
        sharey=False,
        sharex=False,
        height=height,
        aspect=max(1.1, 4.0 / height),
        dodge=False,
        palette=palette,
        legend=False,  # placed by hand below: seaborn's outside legend can overflow a small grid
    )
    handles = [Rectangle((0, 0), 1, 1, color=palette[c]) for c in categories]
    grid.figure.legend(
        handles, categories, title="category", loc="center left", bbox_to_anchor=(1.0, 0.5)
    )
    grid.set_axis_labels("share of the profiled steps", "")
    for ax in grid.axes.flat:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    grid.figure.suptitle(f"Top {top} kernels / operators per phase", y=1.02)
    return [_save(grid.figure, out, "kernels")]


def performance_profile(table: pd.DataFrame) -> pd.DataFrame:
    """ρ_o(τ): the fraction of workloads where optimizer o's best time-to-target is within τ of
    the best of all optimizers (not reached: never), for τ on a grid in [1, TAU_MAX]."""
    if table.empty or table["time_to_target_s"].isna().all():
        return pd.DataFrame(columns=["optimizer", "tau", "fraction"])
    best = table.groupby(["workload", "optimizer"])["time_to_target_s"].min().unstack()
    ratios = best.div(best.min(axis=1), axis=0)
    taus = np.linspace(1.0, TAU_MAX, 121)
    rows = [
        {"optimizer": o, "tau": t, "fraction": float((ratios[o] <= t).mean())}
        for o in ratios.columns
        for t in taus
    ]
    return pd.DataFrame(rows)


def performance_profile_figure(table: pd.DataFrame, out: Path, colors: dict[str, Any]) -> list[str]:
    profile = performance_profile(table)
    if profile.empty:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for optimizer, g in profile.groupby("optimizer"):
        name = str(optimizer)
        ax.step(g["tau"], g["fraction"], where="post", color=colors[name], label=name)
    ax.set_xlabel("τ (time-to-target / best time-to-target)")
    ax.set_ylabel("fraction of workloads within τ")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(1.0, TAU_MAX)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"Performance profile over {table['workload'].nunique()} workloads")
    return [_save(fig, out, "performance_profile")]


# ---------------------------------------------------------------- documents
def _environment_lines(data: ReportData) -> list[str]:
    lines = []
    for env in data.envs:
        lines.append(
            ", ".join(
                f"{k}: {env[k]}"
                for k in ("device_name", "device_kind", "torch_version", "git_commit", "host")
                if env.get(k) is not None
            )
        )
    return sorted(set(lines))


def step_time_table(data: ReportData) -> pd.DataFrame:
    """Median step time per setting and its ratio to the same run's best SGD step."""
    ok = data.cells[data.cells["status"] == "ok"]
    table = ok.groupby(["workload", "optimizer", "setting"], as_index=False).agg(
        median_step_ms=("median_step_ms", "median"), seeds=("seed", "count")
    )
    sgd = table[table["optimizer"] == "sgd"].groupby("workload")["median_step_ms"].min()
    table["vs_sgd_step"] = table.apply(
        lambda r: r["median_step_ms"] / sgd.get(r["workload"], math.nan), axis=1
    )
    return table


def peer_table(data: ReportData) -> pd.DataFrame:
    """kfacbench's presets against the peers that implement the same method, per workload and
    batch size: median step (non-refresh steps dominate) and mean step (training time / steps,
    refreshes included), and their ratios kfacbench / peer. Empty without such pairs."""
    ok = data.cells[data.cells["status"] == "ok"].copy()
    ok["mean_step_ms"] = ok["train_time_s"] / ok["steps"].astype(float) * 1e3
    per = ok.groupby(["workload", "batch_size", "optimizer"])[
        ["median_step_ms", "mean_step_ms"]
    ].median()
    rows = []
    for (workload, batch), group in per.groupby(level=[0, 1]):
        have = group.droplevel([0, 1])
        for peer, ours in COUNTERPARTS.items():
            if peer in have.index and ours in have.index:
                a, b = have.loc[ours], have.loc[peer]
                rows.append(
                    {
                        "workload": workload,
                        "batch_size": batch,
                        "kfacbench": ours,
                        "peer": peer,
                        "median_step_ms": f"{a['median_step_ms']:.4g} / {b['median_step_ms']:.4g}",
                        "median_ratio": a["median_step_ms"] / b["median_step_ms"],
                        "mean_step_ms": f"{a['mean_step_ms']:.4g} / {b['mean_step_ms']:.4g}",
                        "mean_ratio": a["mean_step_ms"] / b["mean_step_ms"],
                    }
                )
    return pd.DataFrame(rows)


def _markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "(none)\n"
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def busy_warnings(cells: pd.DataFrame) -> list[str]:
    """The busy-machine warning and the cells it concerns (their times are not comparable:
    every figure and table built on them may be off by the other processes' share)."""
    line = warning_line(cells)
    if line is None:
        return []
    labels = ", ".join(str(label) for label in busy_cells(cells)["label"])
    return [f"{line}. Busy cells: {labels}"]


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the figures, ``index.html`` and ``summary.md`` for ``run_dirs`` into ``out``.

    Returns:
        The path of ``index.html``.

    Raises:
        KfacbenchError: ``out`` is not a folder and cannot become one, or a run cannot be read
            (:func:`load_runs`).
    """
    if out.exists() and not out.is_dir():  # checked first: reading the runs can take a while
        raise KfacbenchError(f"{out}: exists and is not a folder; a report is a folder of files")
    data = load_runs(run_dirs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KfacbenchError(f"{out}: cannot create the report folder ({exc.strerror})") from None
    sns.set_theme(style="whitegrid", context="notebook")
    colors = optimizer_colors([str(o) for o in data.cells["optimizer"].unique()])
    ttt = time_to_target_table(data.cells)
    figures = [
        *loss_figures(data, out, colors),
        *time_to_target_figure(ttt, out, colors),
        *phase_figure(data, out),
        *scaling_figures(data, out, colors),
        *kernel_figure(data, out),
        *performance_profile_figure(ttt, out, colors),
    ]
    steps = step_time_table(data)
    peers = peer_table(data)
    env = _environment_lines(data)
    suites = ", ".join(sorted(data.cells["suite"].unique()))
    warnings = busy_warnings(data.cells)
    md = [
        f"# kfacbench report: {suites}",
        "",
        *(f"- {line}" for line in env),
        f"- runs: {', '.join(str(p) for p in run_dirs)}",
        "",
        *(f"> **Warning**: {line}\n" for line in warnings),
        "## Time to target",
        "",
        _markdown_table(ttt),
        "## Step time (median; ratio to the best SGD step of the same workload)",
        "",
        _markdown_table(steps),
        *(
            [
                "## kfacbench vs peers (step ms: kfacbench / peer; ratio kfacbench / peer)",
                "",
                _markdown_table(peers),
            ]
            if not peers.empty
            else []
        ),
        "## Figures",
        "",
        *(f"![{name}]({name}.png)" for name in figures),
        "",
    ]
    (out / "summary.md").write_text("\n".join(md))
    images = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((out / f"{name}.png").read_bytes()).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>"
        for name in figures
    )
    suites_html = "\n".join(
        f"<details><summary>suite as run: {html.escape(path)}</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
        for path, text in data.suites
    )
    peers_html = (
        "<h2>kfacbench vs peers</h2>\n"
        + peers.to_html(index=False, float_format=lambda v: f"{v:.3g}")
        + "\n"
        if not peers.empty
        else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kfacbench report: {html.escape(suites)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }} img {{ max-width: 100%; }} figure {{ margin: 1.5em 0; }}
figcaption {{ color: #666; font-size: 0.8em; }} pre {{ background: #f7f7f7; padding: 1em; }}
.warning {{ background: #fff3cd; border-left: 4px solid #e0a800; padding: 0.5em 1em; }}
</style></head><body>
<h1>kfacbench report: {html.escape(suites)}</h1>
<ul>{"".join(f"<li>{html.escape(line)}</li>" for line in env)}</ul>
{"".join(f'<p class="warning">Warning: {html.escape(line)}</p>' for line in warnings)}
{suites_html}
<h2>Time to target</h2>
{ttt.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="not reached")}
<h2>Step time</h2>
{steps.to_html(index=False, float_format=lambda v: f"{v:.4g}")}
{peers_html}<h2>Figures</h2>
{images}
</body></html>
"""
    (out / "index.html").write_text(page)
    return out / "index.html"
