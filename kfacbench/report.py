"""Plotted comparison reports: seaborn figures (PNG + SVG), one self-contained HTML page, Markdown.

``kfacbench report RUN_DIR [RUN_DIR ...] -o DIR`` reads the tables of one or more runs and writes:

- ``loss_<workload>.{png,svg}``: training loss vs wall-clock time and vs steps, the median over
  seeds with a min-max band (curves are interpolated onto a common grid per setting, since seeds
  do not log at the same seconds); an axis is logarithmic when the longest curve spans more than
  :data:`LOG_AXIS_RATIO` times the shortest (one long run would squeeze the others into a corner);
- ``time_to_target.{png,svg}``: every setting, one panel per workload: a bar to its median
  time-to-target with the speed-up over the best SGD setting, or a hatched bar to the time it
  trained without reaching the target (so a setting that lost still shows, with what it cost);
- ``phases.{png,svg}``: the per-step time broken down by phase (amortised: a phase's total time
  over the cell's steps, so refreshes every T steps count 1/T), stacked;
- ``scaling_<axis>.{png,svg}``: step time vs batch size, vs inversion interval and vs layer width
  (the ``wide_ae_W`` workloads), for whichever of these axes the runs swept;
- ``kernels.{png,svg}``: the top kernels per optimizer and phase, when a kernels table exists;
- ``performance_profile.{png,svg}``: across workloads, the fraction of workloads on which each
  optimizer's time-to-target is within τ of the best (AlgoPerf's performance profile, τ ≤ 4);
- from ``kfacbench diagnose`` run directories (``diagnostics.parquet``):
  ``diagnostics_quality_<suite>`` (cosine and model ratio of every approximation's direction
  against the exact natural gradient, along training, one line per approximation in the colour
  of the optimizer that takes it), ``diagnostics_dense_<cell-id>`` (|F|, |F̃|, |F̃ − F| and the
  damped inverses |(F + λI)⁻¹|, |F̃⁻¹|, |F̂⁻¹| of the dense layers at the last checkpoint, as in
  Martens & Grosse's Figs. 2–3) and ``diagnostics_rank_<cell-id>`` (SKFAC's factor errors against
  rank, per layer and reduction); a report may hold diagnose runs only;
- ``index.html`` (figures embedded as data URIs: no network needed) and ``summary.md``.

A figure that would carry no information for the runs given (a performance profile of one
workload, a scaling plot of an axis that was not swept) is not drawn; both documents list it
with the reason, so its absence is not mistaken for a failure.

Every figure gives an optimizer the same colour (:func:`optimizer_colors`), drawn exactly (no
seaborn desaturation of bars); settings of one optimizer keep its hue and differ in lightness
(:func:`setting_colors`), the best setting in exactly the optimizer's colour.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.ticker import (
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
    PercentFormatter,
)
from seaborn.external import husl

from kfacbench.core.timing import STEP
from kfacbench.diagnose import diagnostics_frame
from kfacbench.diagnose_dense import read_heatmaps
from kfacbench.errors import KfacbenchError
from kfacbench.machine_load import busy_cells, warning_line
from kfacbench.optim import METHODS
from kfacbench.optim.peers import COUNTERPARTS
from kfacbench.rundir import amortized_step_ms, load_tables, read_env, read_table
from kfacbench.store import settings_of

TAU_MAX = 4.0
"""Largest ratio to the best time-to-target shown by the performance profile (AlgoPerf's r_max)."""
LOG_AXIS_RATIO = 4.0
"""A loss figure's x axis is logarithmic when its longest curve ends more than this many times
later than its shortest: on a linear axis the short curves would fill under a quarter of it."""
_WIDTH = re.compile(r"^wide_ae_(\d+)$")
# Solid for a best setting; dotted last, as it vanishes beside (and on top of) a solid line.
_DASHES = ["-", "--", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1)), ":"]


def optimizer_colors(optimizers: Sequence[str] = ()) -> dict[str, Any]:
    """One colour per optimizer, the same in every figure and report: registered methods in
    registry order, then any other name (a peer) after them."""
    names = list(METHODS) + sorted(set(optimizers) - set(METHODS))
    # The colourblind palette has 10 colours and repeats itself after them: further names get
    # the dark variants of the same hues (still told apart by lightness), then evenly spaced hues.
    palette = sns.color_palette("colorblind", 10) + sns.color_palette("dark", 10)
    if len(names) > len(palette):
        palette += sns.color_palette("husl", len(names) - len(palette))
    return dict(zip(names, palette[: len(names)], strict=True))


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
    envs, suites = [], []
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
        if (run_dir / "env.json").exists():
            envs.append(read_env(run_dir))
        if (run_dir / "suite.toml").exists():
            # Shown as text only: damage shows as such, never stops the report.
            suites.append((str(run_dir), (run_dir / "suite.toml").read_text(errors="replace")))
    if not parts["cells"] and not parts["diagnostics"]:
        raise KfacbenchError(
            "a report needs at least one run directory with cells.parquet (`kfacbench run`) or"
            " diagnostics.parquet (`kfacbench diagnose`)"
        )
    for name in timed:  # a diagnostics-only report: empty timing tables with their columns
        parts[name] = parts[name] or [pd.DataFrame(columns=list(REQUIRED[name]))]
    cells = pd.concat(parts["cells"], ignore_index=True).drop_duplicates("cell_id", keep="last")
    cells["setting"] = settings_of(cells["label"].astype(str))
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
    )


# ---------------------------------------------------------------- figures
@dataclass
class Figures:
    """The figures of a report, in page order, and those left out with the reason."""

    drawn: list[tuple[str, Figure, str]] = field(default_factory=list)
    """(file name, figure, caption)."""
    omitted: list[tuple[str, str]] = field(default_factory=list)
    """(what the figure would have shown, why it is not drawn)."""

    def add(self, name: str, fig: Figure, caption: str) -> None:
        """Keep ``fig`` under ``name``, its titles wrapped to fit it (:func:`fit_titles`)."""
        fit_titles(fig)
        self.drawn.append((name, fig, caption))

    def omit(self, what: str, why: str) -> None:
        self.omitted.append((what, why))

    def close(self) -> None:
        for _, fig, _ in self.drawn:
            plt.close(fig)


def _save(fig: Figure, out: Path, name: str) -> str:
    fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    plt.close(fig)
    return name


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _seconds(value: float) -> str:
    """Seconds for a reader: 3 significant digits (30.0 beside 29.3, not 30), whole seconds
    from 100 s, no exponent notation for the times a benchmark meets."""
    if abs(value) >= 99.95:  # rounds to 3 digits or more: whole seconds
        return f"{value:.0f} s"
    return f"{value:#.3g} s" if abs(value) >= 0.01 else f"{value:.2g} s"


def title_texts(fig: Figure) -> list[Text]:
    """The figure's titles: its suptitle and every axes' centre, left and right title."""
    texts = [t for t in fig.texts if t.get_text()]  # fig.suptitle adds to fig.texts
    for ax in fig.axes:
        for loc in ("center", "left", "right"):
            text = _axes_title(ax, loc)
            if text.get_text():
                texts.append(text)
    return texts


def _axes_title(ax: Axes, loc: str) -> Text:
    # Axes keeps its three titles as separate Text artists; only the centre one is public.
    return {"center": ax.title, "left": ax._left_title, "right": ax._right_title}[loc]  # type: ignore[attr-defined]


def fit_titles(fig: Figure) -> None:
    """Wrap every title that is wider than the figure into lines that fit.

    ``bbox_inches="tight"`` would otherwise widen the saved image around an overlong title and
    leave the plot small inside it, or the title would overhang the plot it names.
    """
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    right = fig.bbox.x1
    for text in title_texts(fig):
        for _ in range(8):
            box = text.get_window_extent(renderer)
            allowed = (
                right - max(box.x0, fig.bbox.x0)
                if text.get_horizontalalignment() == "left"
                else fig.bbox.width
            )
            if box.x0 >= fig.bbox.x0 - 0.5 and box.x1 <= right + 0.5:
                break
            lines = text.get_text().splitlines()
            longest = max(len(line) for line in lines)
            width = max(12, int(longest * min(allowed / max(box.width, 1.0), 0.95)))
            text.set_text(
                "\n".join(textwrap.fill(line, width, break_long_words=False) for line in lines)
            )


def _shades(color: Any, n: int) -> list[tuple[float, float, float]]:
    """``n`` colours of ``color``'s hue and saturation at distinct lightness, the first exactly
    ``color``: each next one at the HUSL lightness farthest from those taken, within a range that
    stays visible on white (HUSL lightness is perceptual, so equal steps look equal)."""
    base = tuple(float(c) for c in matplotlib.colors.to_rgb(color))
    hue, saturation, lightness = husl.rgb_to_husl(*base)
    candidates = np.linspace(28.0, 74.0, 24)
    taken = [lightness]
    shades: list[tuple[float, float, float]] = [base]  # type: ignore[list-item]
    for _ in range(n - 1):
        pick = max(candidates, key=lambda c: min(abs(c - t) for t in taken))
        taken.append(float(pick))
        rgb = np.clip(husl.husl_to_rgb(hue, saturation, float(pick)), 0.0, 1.0)
        shades.append((float(rgb[0]), float(rgb[1]), float(rgb[2])))
    return shades


def setting_order(cells: pd.DataFrame) -> dict[str, int]:
    """Each setting's rank among its optimizer's settings on the same workload, best first:
    all seeds ok before any failure, then the sooner median time-to-target, then the lower
    median final training loss, then the name. The best gets the optimizer's own colour and
    line style, so the identity holds where it matters."""
    frame = pd.DataFrame(
        {
            "workload": cells["workload"],
            "optimizer": cells["optimizer"],
            "setting": cells["setting"],
            "failed": cells["status"] != "ok",
            "ttt": cells["time_to_target_s"].where(cells["status"] == "ok"),
            "loss": cells.get("final_train_loss", math.nan),
        }
    )
    per = (
        frame.groupby(["workload", "optimizer", "setting"])
        .agg(failed=("failed", "any"), ttt=("ttt", "median"), loss=("loss", "median"))
        .reset_index()
    )
    ranks: dict[str, int] = {}
    for _, group in per.groupby(["workload", "optimizer"]):
        ordered = group.sort_values(["failed", "ttt", "loss", "setting"], na_position="last")
        ranks.update({str(s): i for i, s in enumerate(ordered["setting"])})
    return ranks


def setting_colors(cells: pd.DataFrame, colors: dict[str, Any]) -> dict[str, Any]:
    """A colour per setting: its optimizer's hue, lightness varied per setting
    (:func:`_shades`), the best setting (:func:`setting_order`) exactly the optimizer's colour."""
    ranks = setting_order(cells)
    out: dict[str, Any] = {}
    settings = cells.drop_duplicates("setting")
    for (_, optimizer), group in settings.groupby(["workload", "optimizer"]):
        ordered = sorted((str(s) for s in group["setting"]), key=lambda s: ranks[s])
        out.update(zip(ordered, _shades(colors[str(optimizer)], len(ordered)), strict=True))
    return out


def _styles(cells: pd.DataFrame) -> dict[str, Any]:
    """A line style per setting, cycling within each optimizer from the best setting (solid):
    a second cue beside lightness, for print and colour-blind readers."""
    ranks = setting_order(cells)
    return {str(s): _DASHES[r % len(_DASHES)] for s, r in ranks.items()}


def _median_band(
    runs: list[pd.DataFrame], x: str, log: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median, min and max of the seeds' loss curves on a common grid of ``x``, over the range
    every seed has logged (no flat extrapolation before the first logged point); the grid is
    geometric when the axis is logarithmic, so early points are not all in the first pixel."""
    start = max(float(r[x].min()) for r in runs)
    end = min(float(r[x].max()) for r in runs)
    if end <= start:
        grid = np.array([start])
    elif log and start > 0:
        grid = np.geomspace(start, end, 120)
    else:
        grid = np.linspace(start, end, 120)
    values = np.stack([np.interp(grid, r[x], r["train_loss"]) for r in runs])
    return grid, np.median(values, 0), values.min(0), values.max(0)


def wants_log_axis(spans: Sequence[tuple[float, float]]) -> bool:
    """Whether curves spanning ``(start, end)`` each are shown better on a log axis: when the
    longest ends more than :data:`LOG_AXIS_RATIO` times later than the shortest (on a linear
    axis the short ones would fill a sliver of it), and every curve starts above zero."""
    if len(spans) < 2 or min(start for start, _ in spans) <= 0:
        return False
    ends = [end for _, end in spans]
    return max(ends) > LOG_AXIS_RATIO * min(ends)


def _plain_log_ticks(axis: Any, subs: tuple[float, ...] = (1.0, 2.0, 5.0)) -> None:
    """Label a log axis at ``subs`` (1, 2 and 5) per decade in plain numbers (50, 100, 200),
    which a reader compares at a glance, rather than at decades as 10^2 (a loss range rarely
    spans one)."""
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def short_labels(settings: list[str], prefix: str) -> tuple[dict[str, str], str]:
    """Legend labels of ``settings`` without ``prefix`` (the workload) and without the
    ``key=value`` parts every setting shares, and those shared parts (for the legend's title):
    ``sgd bs=32 lr=0.1`` and ``adamw bs=32 lr=0.001`` become ``sgd lr=0.1``, ``adamw lr=0.001``
    with ``bs=32`` in common."""
    parts = {s: s.removeprefix(prefix).split() for s in settings}
    shared = set.intersection(*(set(p[1:]) for p in parts.values())) if len(parts) > 1 else set()
    first = next(iter(parts.values()), [])
    common = " ".join(t for t in first[1:] if t in shared)
    short = {s: " ".join(p[:1] + [t for t in p[1:] if t not in shared]) for s, p in parts.items()}
    return short, common


def loss_figures(data: ReportData, colors: dict[str, Any], figs: Figures) -> None:
    """Training loss vs wall-clock and vs steps, one figure per workload."""
    styles = _styles(data.cells)
    shades = setting_colors(data.cells, colors)
    ranks = setting_order(data.cells)
    curves = data.curves.dropna(subset=["train_loss"]).merge(
        data.cells[["cell_id", "workload", "optimizer", "setting"]], on="cell_id"
    )
    if curves.empty:
        figs.omit("training loss", "no cell logged a training loss")
    order = {name: i for i, name in enumerate(colors)}
    for workload, wcurves in curves.groupby("workload"):
        groups = sorted(
            ((str(o), str(s), g) for (o, s), g in wcurves.groupby(["optimizer", "setting"])),
            key=lambda item: (order[item[0]], ranks[item[1]]),
        )
        runs = {
            s: [g.sort_values("step") for _, g in group.groupby("cell_id")]
            for _, s, group in groups
        }
        short, common = short_labels([s for _, s, _ in groups], f"{workload} ")
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        for ax, x, what in zip(
            axes,
            ("train_time_s", "step"),
            ("training time (s, evals excluded)", "steps"),
            strict=True,
        ):
            spans = [
                (max(float(r[x].min()) for r in rs), min(float(r[x].max()) for r in rs))
                for rs in runs.values()
            ]
            log = wants_log_axis(spans)
            for _, setting, _ in groups:
                grid, med, low, high = _median_band(runs[setting], x, log)
                ax.plot(
                    grid,
                    med,
                    color=shades[setting],
                    linestyle=styles[setting],
                    linewidth=2.0 if ranks[setting] == 0 else 1.6,
                    label=short[setting],
                )
                if len(runs[setting]) > 1:
                    ax.fill_between(grid, low, high, color=shades[setting], alpha=0.15)
            if log:
                ax.set_xscale("log")
                _plain_log_ticks(ax.xaxis)
            ax.set_xlabel(f"{what}, {'log' if log else 'linear'} scale")
            ax.grid(True, which="major", alpha=0.3)
        axes[0].set_ylabel("training loss (minibatch mean)")
        if (wcurves["train_loss"] > 0).all():
            axes[0].set_yscale("log")
            _plain_log_ticks(axes[0].yaxis)
        fig.suptitle(f"{workload}: training loss (median over seeds; band: min to max)")
        fig.tight_layout()
        # Below the axes, in as many columns as the longest label allows: settings of several
        # optimizers make labels of 60+ characters, which beside the axes would squeeze them.
        handles, labels = axes[0].get_legend_handles_labels()
        longest = max(len(label) for label in labels)
        fig.legend(
            handles,
            labels,
            title="setting" + (f" (all: {common})" if common else ""),
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=max(1, min(len(labels), 3, 120 // (longest + 8))),
            frameon=False,
            fontsize=plt.rcParams["axes.labelsize"],
            handlelength=3.0,
        )
        figs.add(
            f"loss_{workload}",
            fig,
            f"{workload}: training loss vs training time and vs steps. One hue per optimizer; "
            "its settings differ in lightness (the best in the optimizer's own colour, solid).",
        )


def time_to_target_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Every setting of every workload: whether it reached the target, when, and its speed-up
    over the workload's best SGD setting, or the bound the run does show.

    Columns, besides ``workload``, ``optimizer``, ``setting``, ``seeds``, ``reached_seeds``,
    ``failed_seeds`` and ``median_step_ms``:

    - ``outcome``: ``reached`` (every seed did), ``not reached``, or the failure (e.g.
      ``diverged``) when a seed failed: a failed cell never reaches the target;
    - ``time_to_target_s``: the median over seeds, NaN unless every seed reached the target;
    - ``time_to_target_lo_s``: the median over seeds of the eval before, which had not reached
      it (the crossing lies in between: the resolution the eval interval gives); NaN likewise,
      and for runs recorded before the column existed;
    - ``train_time_s``: the median time the ok seeds trained, which is the budget a setting that
      did not reach the target spent (when every seed failed: how long they trained);
    - ``ttt_lower_bound_s``: the median over seeds of each seed's time to target, or of its
      training time when it did not reach the target (inf when it failed): a lower bound on the
      median time to target;
    - ``speedup_vs_best_sgd``: the best SGD setting's time to target over this one's, NaN
      unless both reached it;
    - ``speedup``: the same for a reader, or the bound the run shows where only one side
      reached the target: when no SGD setting did, SGD's time to target is above its training
      time, so a setting that reached the target at t is more than ``train_time / t`` faster.
    """
    rows = []
    for (workload, optimizer, setting), g in cells.groupby(["workload", "optimizer", "setting"]):
        ok = (g["status"] == "ok").to_numpy()
        ttt = g["time_to_target_s"].astype(float).to_numpy()
        lo = g.get("time_to_target_lo_s", pd.Series(math.nan, index=g.index)).astype(float)
        reached = ok & np.isfinite(ttt)
        trained = (
            g["train_time_s"].astype(float).to_numpy()
            if "train_time_s" in g
            else np.full(len(g), math.nan)
        )
        failed = sorted({str(s) for s in g["status"][~ok]})
        bound = np.where(reached, ttt, np.where(ok, trained, np.inf))
        rows.append(
            {
                "workload": workload,
                "optimizer": optimizer,
                "setting": setting,
                "seeds": len(g),
                "reached_seeds": int(reached.sum()),
                "failed_seeds": int((~ok).sum()),
                "outcome": "reached" if reached.all() else "/".join(failed) or "not reached",
                "time_to_target_s": float(np.median(ttt)) if reached.all() else math.nan,
                "time_to_target_lo_s": float(np.median(lo)) if reached.all() else math.nan,
                "train_time_s": _median(trained[ok] if ok.any() else trained),
                "ttt_lower_bound_s": float(np.median(bound)),
                "median_step_ms": (
                    float(g["median_step_ms"][ok].median()) if ok.any() else math.nan
                ),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    speedups = [_speedup(row, table) for row in table.itertuples(index=False)]
    table["speedup_vs_best_sgd"] = [s.exact for s in speedups]
    table["speedup"] = [s.text for s in speedups]
    rank = table["outcome"].map(lambda o: 0 if o == "reached" else 1 if o == "not reached" else 2)
    key = table["time_to_target_s"].fillna(table["train_time_s"])
    order = np.lexsort((table["setting"], key.fillna(np.inf), rank, table["workload"]))
    return table.iloc[order].reset_index(drop=True)[
        [
            "workload",
            "optimizer",
            "setting",
            "seeds",
            "reached_seeds",
            "failed_seeds",
            "outcome",
            "time_to_target_s",
            "time_to_target_lo_s",
            "train_time_s",
            "ttt_lower_bound_s",
            "speedup_vs_best_sgd",
            "speedup",
            "median_step_ms",
        ]
    ]


@dataclass(frozen=True)
class Speedup:
    """A setting's speed-up over the best SGD setting of its workload."""

    exact: float
    """The ratio when both reached the target, else NaN."""
    text: str
    """For the tables: the ratio, or the bound the run shows and why, in words."""
    short: str
    """For the figure's note beside a bar ("" where the bar's own note says it all)."""


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def _speedup(row: Any, table: pd.DataFrame) -> Speedup:
    """One setting's speed-up over the best SGD setting of its workload: the exact ratio when
    both reached the target, else the bound the run shows, said in words."""
    sgd = table[(table["workload"] == row.workload) & (table["optimizer"] == "sgd")]
    if sgd.empty:
        return Speedup(math.nan, "no SGD run on this workload", "")
    best = float(sgd["time_to_target_s"].min())  # NaN when no SGD setting reached it
    mine = float(row.time_to_target_s)
    if row.outcome not in ("reached", "not reached"):
        return Speedup(math.nan, f"none ({row.outcome})", "")
    if math.isfinite(mine) and math.isfinite(best):
        ratio = best / mine
        if ratio == 1.0 and row.optimizer == "sgd":
            return Speedup(ratio, "1.00× (best SGD)", "best SGD")
        return Speedup(ratio, f"{ratio:.2f}×", f"{ratio:.2f}× best SGD")
    if math.isfinite(best):
        # This setting trained ttt_lower_bound_s without reaching the target: slower than that.
        bound = best / row.ttt_lower_bound_s
        return Speedup(math.nan, f"< {bound:.2f}× (not reached in its budget)", "")
    sgd_bound = float(sgd["ttt_lower_bound_s"].min())
    if not math.isfinite(mine):
        return Speedup(math.nan, "unknown: neither reached the target", "")
    if not math.isfinite(sgd_bound):
        failures = "/".join(sorted(set(sgd["outcome"])))
        return Speedup(
            math.nan,
            f"unbounded: SGD did not reach the target ({failures})",
            f"SGD: {failures}",
        )
    budgets = sgd.loc[sgd["outcome"] == "not reached", "train_time_s"]
    low, high = float(budgets.min()), float(budgets.max())
    same = math.isclose(low, high, rel_tol=0.05)
    spent = _seconds(low) if same else f"{_seconds(low)} to {_seconds(high)}"
    ratio = sgd_bound / mine
    return Speedup(
        math.nan,
        f"> {ratio:.2f}× (SGD did not reach the target in {'its budget' if same else 'its budgets'}"
        f", {spent})",
        f"> {ratio:.2f}× SGD (SGD: not reached in {spent})",
    )


def time_to_target_text(row: Any) -> str:
    """A setting's time to target for a reader: the time, or what happened instead."""
    if row.outcome == "reached":
        lo = getattr(row, "time_to_target_lo_s", math.nan)
        return _seconds(row.time_to_target_s) + (
            f" (not yet at {_seconds(lo)})" if math.isfinite(lo) else ""
        )
    if row.outcome != "not reached":
        if row.failed_seeds < row.seeds:
            return f"{row.outcome} ({row.failed_seeds} of {row.seeds} seeds)"
        after = f" after {_seconds(row.train_time_s)}" if math.isfinite(row.train_time_s) else ""
        return f"{row.outcome}{after}"
    missed = row.seeds - row.reached_seeds
    seeds = f" by {missed} of {row.seeds} seeds" if row.reached_seeds else ""
    return f"not reached{seeds} in {_seconds(row.train_time_s)}"


def time_to_target_display(table: pd.DataFrame) -> pd.DataFrame:
    """The time-to-target table as the documents show it: every value in words or numbers,
    none as ``nan``."""
    if table.empty:
        return table
    return pd.DataFrame(
        {
            "workload": table["workload"],
            "optimizer": table["optimizer"],
            "setting": table["setting"],
            "seeds": table["seeds"],
            "time to target": [time_to_target_text(r) for r in table.itertuples(index=False)],
            "speed-up vs best SGD": table["speedup"],
            "median step (ms)": [
                f"{v:.4g}" if math.isfinite(v) else "-" for v in table["median_step_ms"]
            ],
        }
    )


def time_to_target_figure(
    table: pd.DataFrame, cells: pd.DataFrame, colors: dict[str, Any], figs: Figures
) -> None:
    """One bar per setting, one panel per workload (each on its own time axis): solid to its
    time to target, hatched to the time it trained when it did not reach it."""
    if table.empty:
        figs.omit("time to target", "the runs have no cells")
        return
    shades = setting_colors(cells, colors)
    workloads = sorted(table["workload"].unique())
    counts = [int((table["workload"] == w).sum()) for w in workloads]
    fig, axes = plt.subplots(
        len(workloads),
        1,
        figsize=(11, 0.5 * sum(counts) + 1.4 * len(workloads) + 0.6),
        gridspec_kw={"height_ratios": counts},
        squeeze=False,
    )
    notes: list[tuple[Axes, float, Text]] = []
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        rows = table[table["workload"] == workload].reset_index(drop=True)
        for i, row in enumerate(rows.itertuples(index=False)):
            color = shades[row.setting]
            if row.outcome == "reached":
                end, note = row.time_to_target_s, _seconds(row.time_to_target_s)
                if short := _speedup(row, table).short:
                    note += f": {short}"
                bar = ax.barh(i, end, height=0.7, color=color)
                if math.isfinite(row.time_to_target_lo_s):  # where the crossing can lie
                    ax.plot([row.time_to_target_lo_s, end], [i, i], color="0.15", linewidth=1.2)
                    ax.plot([row.time_to_target_lo_s], [i], marker="|", color="0.15", ms=8)
            else:
                trained = row.train_time_s if math.isfinite(row.train_time_s) else 0.0
                end, note = trained, time_to_target_text(row)
                bar = ax.barh(
                    i,
                    end,
                    height=0.7,
                    facecolor=(*matplotlib.colors.to_rgb(color), 0.12),
                    edgecolor=color,
                    hatch="///" if row.outcome == "not reached" else "xx",
                    linewidth=1.2,
                )
            bar.patches[0].set_label(row.setting)  # names the bar for readers of the figure
            text = ax.annotate(
                note,
                (end, i),
                xytext=(5, 0),
                textcoords="offset points",
                va="center",
                fontsize=plt.rcParams["xtick.labelsize"],
            )
            text.set_in_layout(False)  # room is made by the axis limit (_fit_notes), not layout
            notes.append((ax, float(end), text))
        names, common = short_labels(list(rows["setting"]), f"{workload} ")
        ax.set_yticks(range(len(rows)), [names[s] for s in rows["setting"]])
        ax.set_ylim(len(rows) - 0.5, -0.5)
        title = f"{workload} (all: {common})" if common else workload
        ax.set_title(title, loc="left", fontsize=plt.rcParams["axes.labelsize"])
        ax.set_xlabel("training time (s; median over seeds)")
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
    present = [o for o in colors if o in set(table["optimizer"])]
    handles: list[Any] = [Rectangle((0, 0), 1, 1, color=colors[o]) for o in present]
    handles.append(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="0.3", hatch="///"))
    labels = [*present, "did not reach the target:\nbar = time it trained"]
    if not table["outcome"].isin(("reached", "not reached")).all():
        handles.append(Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="0.3", hatch="xx"))
        labels.append("failed (diverged, oom, error)")
    if table["time_to_target_lo_s"].notna().any():
        handles.append(Line2D([0], [0], color="0.15", marker="|", markersize=8, linewidth=1.2))
        labels.append("crossed between the eval\nbefore (|) and the bar's end")
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle("Time to target, every setting (solid: reached; hatched: not reached)")
    for _ in range(2):  # the layout moves the axes, and the notes must end inside them
        fig.tight_layout()
        _fit_notes(fig, notes)
    figs.add(
        "time_to_target",
        fig,
        "Time to target per setting: solid bars reached the target (with the speed-up over the "
        "best SGD setting, or its bound when SGD did not reach it), the line on a bar spanning "
        "the eval interval in which the target was crossed; hatched bars did not reach it, and "
        "end at the time the setting trained.",
    )


def _fit_notes(fig: Figure, notes: Sequence[tuple[Axes, float, Text]]) -> None:
    """Widen each axis so that the notes beside the bars end inside it: a note starts at its
    bar's end ``x`` and is ``w`` pixels long, so the axis must reach ``x·W / (W - w)``."""
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    limits: dict[Axes, float] = {}
    for ax, x, text in notes:
        width = ax.bbox.width
        room = width - text.get_window_extent(renderer).width - 12.0
        need = x * width / max(room, 0.25 * width)
        limits[ax] = max(limits.get(ax, 0.0), need, x * 1.05)
    for ax, right in limits.items():
        ax.set_xlim(0.0, right if right > 0 else 1.0)


def phase_table(data: ReportData) -> pd.DataFrame:
    """Amortised ms per step of each phase per setting (median over seeds)."""
    phases = data.phases[data.phases["phase"] != STEP].merge(
        data.cells[["cell_id", "workload", "optimizer", "setting", "steps"]], on="cell_id"
    )
    phases["ms_per_step"] = phases["total_s"] * 1e3 / phases["steps"].clip(lower=1)
    medians = phases.groupby(["workload", "optimizer", "setting", "phase"])["ms_per_step"].median()
    return medians.reset_index().sort_values(["workload", "optimizer", "setting"])


PHASE_ORDER = ("forward", "backward", "curvature", "inverse", "precondition", "rescale", "update")


def phase_figure(data: ReportData, figs: Figures) -> None:
    """Stacked per-phase bars, one panel per workload (each with its own time axis)."""
    table = phase_table(data)
    if table.empty:
        figs.omit("phases", "the runs recorded no phase timings")
        return
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
        ax.set_title(workload, loc="left", fontsize=plt.rcParams["axes.labelsize"])
        ax.set_xlabel("ms per step (amortised over the cell's steps; median over seeds)")
        ax.invert_yaxis()
    handles = [Rectangle((0, 0), 1, 1, color=palette[p]) for p in phases]
    fig.legend(handles, phases, title="phase", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Where a step's time goes, by phase")
    fig.tight_layout()
    figs.add(
        "phases",
        fig,
        "Per-step time by phase; a phase run every T steps counts 1/T of its time per step.",
    )


_SCALING_AXES = (
    ("batch_size", "batch size", "batch size (examples)", "workload"),
    ("inv_interval", "inversion interval", "inversion interval T_inv (steps)", "workload"),
    ("width", "layer width", "hidden width W of wide_ae_W", "family"),
)


def scaling_figures(data: ReportData, colors: dict[str, Any], figs: Figures) -> None:
    """Step time vs each swept axis (batch size, inversion interval, width)."""
    cells = data.cells[data.cells["status"] == "ok"].copy()
    cells["width"] = cells["workload"].map(
        lambda w: int(m.group(1)) if (m := _WIDTH.match(w)) else math.nan
    )
    cells["family"] = cells["workload"].map(lambda w: "wide_ae" if _WIDTH.match(w) else w)
    for axis, name, xlabel, facet in _SCALING_AXES:
        swept = cells.dropna(subset=[axis])
        varied = swept.groupby(facet)[axis].nunique()
        used = swept
        swept = swept[swept[facet].isin(varied[varied >= 2].index)]
        if swept.empty:
            if not used.empty:  # an axis the runs have, at one value: say why no figure
                figs.omit(
                    f"step time vs {name}",
                    f"each {'workload' if facet == 'workload' else 'width family'} ran at one "
                    f"{name}",
                )
            continue
        grid = sns.relplot(
            swept,
            x=axis,
            y="median_step_ms",
            hue="optimizer",
            hue_order=[o for o in colors if o in set(swept["optimizer"])],
            palette={k: v for k, v in colors.items() if k in set(swept["optimizer"])},
            col=facet,
            kind="line",
            marker="o",
            markersize=7,
            linewidth=2.0,
            estimator="median",
            errorbar=None,
            facet_kws={"sharey": False, "sharex": False},
            height=3.8,
            aspect=1.2,
            col_wrap=min(3, swept[facet].nunique()),
        )
        grid.set(xscale="log", yscale="log")
        for ax in grid.axes.flat:  # label the swept values themselves, not log decades
            values = sorted(swept[axis].unique())
            ax.set_xticks(values, [f"{v:g}" for v in values])
            ax.xaxis.set_minor_locator(NullLocator())
        for ax in grid.axes.flat:  # short axes: labels at 1, 2, 3 and 5 per decade
            _plain_log_ticks(ax.yaxis, (1.0, 2.0, 3.0, 5.0))
        grid.set_titles("{col_name}")
        grid.set_axis_labels(f"{xlabel}, log scale", "median step time (ms), log scale")
        grid.figure.suptitle(
            f"Step time vs {name}\n(median over each optimizer's other settings)",
            y=1.02,
            va="bottom",
        )
        figs.add(
            f"scaling_{axis}",
            grid.figure,
            f"Median step time vs {name}, per optimizer (a point per {name} it ran at).",
        )


def kernel_figure(data: ReportData, figs: Figures, top: int = 3) -> None:
    """The ``top`` kernels (or CPU operators) of every phase, one panel per optimizer, bars
    coloured by kernel category."""
    if data.kernels is None or data.kernels.empty:
        figs.omit("top kernels", "no profiled run in this report (made by kfacbench profile)")
        return
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
        saturation=1.0,  # the bars in exactly the legend's colours
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
    figs.add("kernels", grid.figure, f"The top {top} kernels or operators of each phase.")


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


def performance_profile_figure(table: pd.DataFrame, colors: dict[str, Any], figs: Figures) -> None:
    """The performance profile, when it can say something: with one workload its curves are
    steps from 0 to 1 that repeat the time-to-target figure and hide one another."""
    what = "performance profile"
    reached = table.dropna(subset=["time_to_target_s"]) if not table.empty else table
    workloads = int(reached["workload"].nunique()) if not reached.empty else 0
    if workloads < 2:
        figs.omit(
            what,
            f"needs at least 2 workloads with a target reached; this report has {workloads}",
        )
        return
    optimizers = [o for o in colors if o in set(table["optimizer"])]
    if len(optimizers) < 2:
        figs.omit(what, "compares optimizers and this report has one")
        return
    profile = performance_profile(table)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, name in enumerate(optimizers):
        g = profile[profile["optimizer"] == name]
        # Coinciding curves are common (equal fractions): draw each thinner than the one
        # beneath it, so a curve on top of another leaves the lower one's edges visible.
        width = 1.6 + 3.2 * (len(optimizers) - 1 - i) / max(len(optimizers) - 1, 1)
        ax.step(
            g["tau"], g["fraction"], where="post", color=colors[name], label=name,
            linewidth=width, zorder=2 + i,
        )  # fmt: skip
    ax.set_xlabel("τ (time-to-target / best time-to-target)")
    ax.set_ylabel("fraction of workloads within τ")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(1.0, TAU_MAX)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.set_title(f"Performance profile over {_plural(table['workload'].nunique(), 'workload')}")
    figs.add(
        "performance_profile",
        fig,
        "Fraction of workloads on which each optimizer reached the target within τ times the "
        "fastest optimizer's time (not reached: never within τ).",
    )


# ---------------------------------------------------------------- curvature diagnostics
MAX_DIAGNOSED_CELLS = 8
"""Cells of a report given their own curvature figures (quality, dense heatmaps, rank), at most:
the first by label; the others are listed as not drawn (diagnostics.parquet holds them all)."""

_APPROXIMATION_STYLES = {
    "gradient": ("sgd", "-"),
    "kfac": ("kfac", "-"),
    "kfac-exact-damping": ("kfac", "--"),
    "kfac-tridiag": ("kfac-tridiag", "-"),
    "skfac": ("skfac", "-"),
    "skfac-sum": ("skfac", "-"),
    "skfac-subsample": ("skfac-subsample", "-"),
}
"""Each approximation of ``kfacbench diagnose`` (without its ``[fisher]`` tag): the optimizer
whose colour it is drawn in (the one that takes that step; SGD's for the gradient), and a line
style that tells apart two approximations of one optimizer."""

_RANK_METRICS = (
    ("factor_a_error", "factor Ā"),
    ("factor_g_error", "factor G"),
    ("kronecker_error", "Ā ⊗ G"),
    ("inverse_error", "damped inverse on ∇h"),
)


def approximation_style(name: str, optimizer: str, colors: dict[str, Any]) -> tuple[Any, Any]:
    """Colour and line style of an approximation (:data:`_APPROXIMATION_STYLES`): ``run``, the
    cell's own optimizer with its stale inverses, is that optimizer's colour, dotted."""
    base = name.split("[")[0]
    if base == "run":
        return colors.get(optimizer, "0.2"), ":"
    owner, style = _APPROXIMATION_STYLES.get(base, ("", "-."))
    return colors.get(owner, "0.45"), style


def _diagnosed(table: pd.DataFrame, figs: Figures, what: str) -> list[tuple[str, str, str]]:
    """``(cell id, label, optimizer)`` of the cells of ``table`` to draw, the first
    :data:`MAX_DIAGNOSED_CELLS` by label, with the others listed as not drawn."""
    cells = table.drop_duplicates("cell_id").sort_values("label")
    if len(cells) > MAX_DIAGNOSED_CELLS:
        figs.omit(
            f"{what} of {_plural(len(cells) - MAX_DIAGNOSED_CELLS, 'more cell')}",
            f"at most {MAX_DIAGNOSED_CELLS} cells are drawn; diagnostics.parquet holds them all",
        )
    return [
        (str(r.cell_id), str(r.label), str(r.optimizer))
        for r in cells.head(MAX_DIAGNOSED_CELLS).itertuples(index=False)
    ]


def quality_figures(diag: pd.DataFrame, colors: dict[str, Any], figs: Figures) -> None:
    """Cosine and model-reduction ratio of every approximation's direction against the exact
    natural gradient, along training: one row of panels per cell, one figure per suite."""
    scores = diag[(diag["layer"] == "all") & diag["metric"].isin(["cosine", "model_ratio"])]
    if scores.empty:
        figs.omit("curvature quality along training", "the diagnose runs recorded no scores")
        return
    for suite, frame in scores.groupby("suite"):
        shown = _diagnosed(frame, figs, f"{suite}: curvature quality")
        fig, axes = plt.subplots(
            len(shown), 2, figsize=(12, 2.9 * len(shown) + 1.0), squeeze=False, sharex="row"
        )
        handles: dict[str, Any] = {}
        for row, (cell_id, label, optimizer) in enumerate(shown):
            cell = frame[frame["cell_id"] == cell_id]
            for ax, metric, what in zip(
                axes[row],
                ("cosine", "model_ratio"),
                ("cosine with δ*", "model ratio M(α*Δ) / M(δ*)"),
                strict=True,
            ):
                for name, g in cell[cell["metric"] == metric].groupby("approximation"):
                    color, style = approximation_style(str(name), optimizer, colors)
                    g = g.sort_values("step")
                    (line,) = ax.plot(
                        g["step"], g["value"], color=color, linestyle=style, marker="o",
                        markersize=4, linewidth=1.8, label=str(name),
                    )  # fmt: skip
                    handles.setdefault(str(name), line)
                ax.set_ylabel(what)
                ax.grid(True, alpha=0.3)
            axes[row, 0].set_title(label, loc="left", fontsize=plt.rcParams["axes.labelsize"])
        for ax in axes[-1]:
            ax.set_xlabel("training step")
        names = sorted(handles)
        fig.legend(
            [handles[n] for n in names], names, title="direction", loc="center left",
            bbox_to_anchor=(1.0, 0.5), frameon=False,
        )  # fmt: skip
        fig.suptitle(f"{suite}: each approximation's step against the exact natural gradient")
        fig.tight_layout()
        figs.add(
            f"diagnostics_quality_{suite}",
            fig,
            "Cosine and model-reduction ratio (the fraction of the exact quadratic model's "
            "reduction achieved at the best step length) of each approximation's direction "
            "against δ* = −(F + λI)⁻¹∇h, on the fixed diagnostic batch at each checkpoint. "
            "Colours are the optimizers that take that step (the gradient: SGD's); `run` is the "
            "cell's own optimizer with the inverses it holds (dotted).",
        )


def _dense_titles(rows: pd.DataFrame) -> dict[str, str]:
    """Each heatmap's title, with the relative errors recorded for it."""
    keys = zip(
        rows["approximation"].astype(str).str.split("[").str[0],
        rows["metric"].astype(str),
        strict=True,
    )
    values = dict(zip(keys, rows["value"].astype(float), strict=True))

    def errors(name: str, what: str) -> str:
        whole = values.get((name, what), math.nan)
        diag = values.get((name, f"{what}_diag"), math.nan)
        off = values.get((name, f"{what}_off"), math.nan)
        text = f"error {whole:.3g}\n(diagonal blocks {diag:.3g}"
        return text + (f", off {off:.3g})" if math.isfinite(off) else ")")

    return {
        "fisher": "|F|, exact Fisher",
        "kronecker": f"|F̃|, K-FAC, all blocks\n{errors('kfac', 'fisher_error')}",
        "kronecker_difference": "|F̃ − F|",
        "inverse_exact": "|(F + λI)⁻¹|, exact",
        "inverse_kfac": f"|F̃⁻¹|, block-diagonal\n{errors('kfac', 'inverse_error')}",
        "inverse_tridiag": f"|F̂⁻¹|, block-tridiagonal\n{errors('kfac-tridiag', 'inverse_error')}",
    }


DENSE_PIXELS = 256
"""Largest side of a heatmap as drawn: the stored maps (up to 512) are max-pooled further, so a
page of heatmaps stays a few hundred kB (at 512 pixels of noise-like entries, two such figures
made an 8 MB page)."""


def max_pool(values: np.ndarray, factor: int) -> np.ndarray:
    """``values`` max-pooled over ``factor`` × ``factor`` tiles (edge tiles partial)."""
    if factor == 1:
        return values
    rows, cols = -(-values.shape[0] // factor), -(-values.shape[1] // factor)
    padded = np.full((rows * factor, cols * factor), -np.inf, dtype=values.dtype)
    padded[: values.shape[0], : values.shape[1]] = values
    return padded.reshape(rows, factor, cols, factor).max(axis=(1, 3))


def dense_figures(data: ReportData, figs: Figures) -> None:
    """Martens & Grosse's Figs. 2–3 for each cell at its last checkpoint: |F|, |F̃| and their
    difference, and the damped inverses |(F + λI)⁻¹|, |F̃⁻¹|, |F̂⁻¹|, over the dense layers."""
    assert data.diagnostics is not None
    diag = data.diagnostics
    dense = diag[diag["layer"].astype(str).str.startswith("dense:")]
    if dense.empty:
        figs.omit(
            "dense Fisher heatmaps",
            "no dense diagnostics in these runs (no run of Linear layers within --dense-budget,"
            " or --no-dense)",
        )
        return
    base = matplotlib.colormaps["magma_r"]
    cmap = base.with_extremes(bad=base(0.0))  # exact zeros (blocks left out) as the smallest
    for cell_id, label, _ in _diagnosed(dense, figs, "dense heatmaps"):
        rows = dense[dense["cell_id"] == cell_id]
        step = int(rows["step"].max())
        path = data.heatmaps.get((cell_id, step))
        if path is None:
            figs.omit(f"dense heatmaps of {label}", f"no heatmap file for step {step} in dense/")
            continue
        maps = read_heatmaps(path)
        rows = rows[rows["step"] == step]
        titles = _dense_titles(rows)
        shown = max(1, -(-maps["fisher"].shape[0] // DENSE_PIXELS))  # display pooling
        offsets = maps["offsets"] / (int(maps["pool"]) * shown)
        names = [str(n) for n in maps["layers"]]
        fig, axes = plt.subplots(2, 3, figsize=(12, 8.5), layout="constrained")
        grid = (
            ("fisher", "kronecker", "kronecker_difference"),
            ("inverse_exact", "inverse_kfac", "inverse_tridiag"),
        )
        for row, keys in enumerate(grid):
            top = float(maps[keys[0]].max())  # the exact matrix's scale for the whole row
            norm = matplotlib.colors.LogNorm(vmin=max(top, 1e-300) * 1e-4, vmax=max(top, 1e-300))
            for ax, key in zip(axes[row], keys, strict=True):
                values = np.ma.masked_less_equal(max_pool(maps[key], shown), 0.0)
                image = ax.imshow(values, cmap=cmap, norm=norm, interpolation="nearest")
                for edge in offsets[1:-1]:
                    ax.axhline(edge - 0.5, color="0.5", linewidth=0.6)
                    ax.axvline(edge - 0.5, color="0.5", linewidth=0.6)
                centres = (offsets[:-1] + offsets[1:]) / 2 - 0.5
                ax.set_xticks(centres, names)
                ax.set_yticks(centres, names)
                ax.grid(False)
                ax.set_title(titles[key], fontsize=plt.rcParams["axes.labelsize"])
            fig.colorbar(image, ax=list(axes[row]), shrink=0.85, label="|entry|, log scale")
        params = int(maps["offsets"][-1])
        span = f"{names[0]}..{names[-1]}" if len(names) > 1 else names[0]
        fig.suptitle(
            f"{label}, step {step}: layers {span} ({params:,} parameters), "
            f"λ = {float(maps['damping']):.3g}"
        )
        figs.add(
            f"diagnostics_dense_{cell_id}",
            fig,
            f"{label} at step {step}: the exact Fisher F of layers {span} against K-FAC's "
            "Kronecker approximation F̃ with every block (Martens & Grosse Fig. 2), and the exact "
            "damped inverse against K-FAC's block-diagonal (factored damping) and "
            "block-tridiagonal inverses (Fig. 3). |entries| max-pooled to at most 256 pixels, on "
            "a log scale spanning 4 decades below the exact matrix's largest entry, per row; "
            "errors are relative Frobenius norms.",
        )


def rank_figures(diag: pd.DataFrame, figs: Figures) -> None:
    """SKFAC's errors against the rank of its factors (examples used), one line per layer, one
    row of panels per reduction, for each cell at its last checkpoint."""
    ranked = diag[diag["rank"].notna()]
    if ranked.empty:
        figs.omit("SKFAC's error against rank", "not measured in these runs (--no-rank)")
        return
    for cell_id, label, _ in _diagnosed(ranked, figs, "SKFAC's error against rank"):
        rows = ranked[ranked["cell_id"] == cell_id]
        step = int(rows["step"].max())
        rows = rows[rows["step"] == step]
        reductions = sorted(rows["approximation"].unique())
        layers = list(dict.fromkeys(rows["layer"].astype(str)))
        palette = sns.color_palette("viridis", len(layers))
        fig, axes = plt.subplots(
            len(reductions), len(_RANK_METRICS), figsize=(16, 3.6 * len(reductions) + 1.0),
            squeeze=False, sharex=True,
        )  # fmt: skip
        ranks = sorted(int(r) for r in rows["rank"].unique())
        for i, reduction in enumerate(reductions):
            for ax, (metric, what) in zip(axes[i], _RANK_METRICS, strict=True):
                panel = rows[(rows["approximation"] == reduction) & (rows["metric"] == metric)]
                for color, layer in zip(palette, layers, strict=True):
                    line = panel[panel["layer"] == layer].sort_values("rank")
                    ax.plot(
                        line["rank"].astype(float), line["value"], color=color, marker="o",
                        markersize=3.5, linewidth=1.5, label=layer,
                    )  # fmt: skip
                ax.set_xscale("log", base=2)
                ax.set_xticks(ranks, [str(r) for r in ranks])
                ax.xaxis.set_minor_locator(NullLocator())
                ax.set_ylim(bottom=0.0)
                ax.set_title(what, fontsize=plt.rcParams["axes.labelsize"])
                ax.grid(True, alpha=0.3)
            axes[i, 0].set_ylabel(f"{reduction}\nrelative error vs K-FAC")
        for ax in axes[-1]:
            ax.set_xlabel("rank r (examples), log scale")
        handles, names = axes[0, 0].get_legend_handles_labels()
        fig.legend(
            handles, names, title="layer", loc="center left", bbox_to_anchor=(1.0, 0.5),
            frameon=False,
        )  # fmt: skip
        fig.suptitle(f"{label}, step {step}: SKFAC's rank-r factors against K-FAC's")
        fig.tight_layout()
        figs.add(
            f"diagnostics_rank_{cell_id}",
            fig,
            f"{label} at step {step}: SKFAC's factors from the first r examples of the diagnostic "
            f"batch against K-FAC's from all {ranks[-1]}, per layer: relative Frobenius errors of "
            "Ā, G and Ā ⊗ G, and of the damped inverse (√λ on each factor, both sides) applied "
            "to the layer's gradient.",
        )


def diagnostic_figures(data: ReportData, colors: dict[str, Any], figs: Figures) -> None:
    """The figures of ``kfacbench diagnose`` runs, when the report has any."""
    if data.diagnostics is None:
        figs.omit("curvature diagnostics", "no diagnose run in this report (kfacbench diagnose)")
        return
    quality_figures(data.diagnostics, colors, figs)
    dense_figures(data, figs)
    rank_figures(data.diagnostics, figs)


def build_figures(data: ReportData) -> Figures:
    """Every figure of the report, as open matplotlib figures (the caller saves and closes
    them), with those left out and why."""
    sns.set_theme(style="whitegrid", context="notebook")
    optimizers = set(data.cells["optimizer"].astype(str))
    if data.diagnostics is not None:
        optimizers |= set(data.diagnostics["optimizer"].astype(str))
    colors = optimizer_colors(sorted(optimizers))
    figs = Figures()
    if data.cells.empty:
        figs.omit(
            "training loss, time to target, phases, scaling and performance profile",
            "no timed run in this report (kfacbench run)",
        )
        kernel_figure(data, figs)
    else:
        ttt = time_to_target_table(data.cells)
        loss_figures(data, colors, figs)
        time_to_target_figure(ttt, data.cells, colors, figs)
        phase_figure(data, figs)
        scaling_figures(data, colors, figs)
        kernel_figure(data, figs)
        performance_profile_figure(ttt, colors, figs)
    diagnostic_figures(data, colors, figs)
    return figs


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
    """Step cost per setting against the SGD of the same suite, batch size and compile mode.

    Amortized first (training time / steps, refreshes included), the median step beside it,
    medians over the seeds of the setting. The denominator is the SGD setting of the same suite,
    workload, batch size and compile mode with the lowest amortized step, named in ``vs``: a
    compiled SGD or another suite's never divides an eager cell.
    """
    ok = data.cells[data.cells["status"] == "ok"].copy()
    ok["compile"] = ok["compile"].fillna("off") if "compile" in ok else "off"
    ok["amortized_ms"] = amortized_step_ms(ok)
    keys = ["suite", "workload", "batch_size", "compile"]
    table = ok.groupby([*keys, "optimizer", "setting"], as_index=False).agg(
        seeds=("seed", "nunique"),
        amortized_ms=("amortized_ms", "median"),
        median_step_ms=("median_step_ms", "median"),
    )
    sgd = table[table["optimizer"] == "sgd"].sort_values("amortized_ms")
    sgd = sgd.drop_duplicates(keys).set_index(keys)
    rows = []
    for rec in table.to_dict("records"):
        key = tuple(rec[k] for k in keys)
        ref = sgd.loc[key] if key in sgd.index else None
        rows.append(
            {
                "suite": rec["suite"],
                "workload": rec["workload"],
                "setting": rec["setting"],
                "seeds": rec["seeds"],
                "amortized_ms": rec["amortized_ms"],
                "vs_sgd": rec["amortized_ms"] / ref["amortized_ms"]
                if ref is not None
                else math.nan,
                "median_step_ms": rec["median_step_ms"],
                "vs_sgd_median": (
                    rec["median_step_ms"] / ref["median_step_ms"] if ref is not None else math.nan
                ),
                "vs": ref["setting"] if ref is not None else "no SGD cell of this suite",
            }
        )
    return pd.DataFrame(rows)


PAIR_KEYS = (
    "suite", "workload", "batch_size", "inv_interval", "data_mode", "device_name", "tf32", "amp",
)  # fmt: skip
"""What a kfacbench preset and a peer cell must share to be compared: one suite, every axis of
the setting; the seeds of a setting are its replicates. Compiled cells are never paired (the
peers run eager)."""


def _setting_label(label: str) -> str:
    """A cell's label without its seed: the name of its setting."""
    return re.sub(r" seed=\S+$", "", label)


def peer_table(data: ReportData) -> pd.DataFrame:
    """kfacbench's presets against the peers that implement the same method, paired on identical
    settings (:data:`PAIR_KEYS`, and equal values of every hyperparameter both name): the
    amortized step (training time / steps, refreshes included) first, the median step beside
    it, each as ``ours / peer`` with its ratio, medians over the seeds of each setting. Every
    row names the two settings it divides. Empty without such pairs."""
    ok = data.cells[data.cells["status"] == "ok"].copy()
    if "compile" in ok:
        ok = ok[ok["compile"].fillna("off") == "off"]
    ok["amortized_ms"] = amortized_step_ms(ok)
    ok["setting_label"] = ok["label"].map(_setting_label)
    keys = [k for k in PAIR_KEYS if k in ok]
    per = ok.groupby([*keys, "optimizer", "setting_label", "hparams"], dropna=False).agg(
        amortized_ms=("amortized_ms", "median"),
        median_step_ms=("median_step_ms", "median"),
        seeds=("seed", "nunique"),
    )
    per = per.reset_index()
    rows = []
    for peer, ours in COUNTERPARTS.items():
        theirs, mine = per[per["optimizer"] == peer], per[per["optimizer"] == ours]
        for pair in mine.merge(theirs, on=keys, suffixes=("", "_peer")).to_dict("records"):
            a, b = json.loads(pair["hparams"]), json.loads(pair["hparams_peer"])
            if any(a[k] != b[k] for k in a.keys() & b.keys()):
                continue  # a hyperparameter both name differs: not the same setting
            rows.append(
                {
                    "workload": pair["workload"],
                    "batch_size": pair["batch_size"],
                    "kfacbench": pair["setting_label"],
                    "peer": pair["setting_label_peer"],
                    "seeds": f"{pair['seeds']} / {pair['seeds_peer']}",
                    "amortized_ms": f"{pair['amortized_ms']:.4g} / {pair['amortized_ms_peer']:.4g}",
                    "amortized_ratio": pair["amortized_ms"] / pair["amortized_ms_peer"],
                    "median_step_ms": (
                        f"{pair['median_step_ms']:.4g} / {pair['median_step_ms_peer']:.4g}"
                    ),
                    "median_ratio": pair["median_step_ms"] / pair["median_step_ms_peer"],
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


TTT_NOTE = (
    "Every setting, with its median time to the target over seeds, or what happened instead. "
    "The speed-up is the best SGD setting's time to target over this setting's; when only one "
    "of the two reached the target, the other's time is at least the time it trained, which "
    "bounds the speed-up (> or <)."
)


CLAIMS_NOTE = (
    "Each claim of the two papers (Martens & Grosse 2015; Tang et al. 2021), the value these runs "
    "measured, and the verdict by the rule given: the papers' experiments are GPU-sized, so a "
    "verdict is about the direction and rough size of an effect at this scale."
)


NO_TIMED_RUN = (
    "No timed run in this report (kfacbench run): it shows curvature diagnostics only "
    "(kfacbench diagnose)."
)


def write_report(
    run_dirs: Sequence[Path],
    out: Path,
    claims: Callable[[ReportData], pd.DataFrame] | None = None,
) -> Path:
    """Write the figures, ``index.html`` and ``summary.md`` for ``run_dirs`` into ``out``.

    Args:
        run_dirs: the run directories (``run``, ``profile`` and ``diagnose`` runs).
        out: the report folder.
        claims: builds the table that opens both documents (``kfacbench.claims.claims_table``:
            each paper claim against what the runs measured), or ``None`` for none.

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
    built = build_figures(data)
    figures = [(_save(fig, out, name), caption) for name, fig, caption in built.drawn]
    omitted = built.omitted
    env = _environment_lines(data)
    names = set(data.cells["suite"].astype(str))
    if data.diagnostics is not None:
        names |= set(data.diagnostics["suite"].astype(str))
    suites = ", ".join(sorted(names))
    warnings = busy_warnings(data.cells)
    timed = not data.cells.empty
    claims_md: list[str] = []
    claims_html = ""
    if claims is not None:
        table = claims(data)
        claims_md = [
            "## The papers' claims, measured here",
            "",
            CLAIMS_NOTE,
            "",
            _markdown_table(table),
            "",
        ]
        claims_html = (
            f"<h2>The papers' claims, measured here</h2>\n<p>{html.escape(CLAIMS_NOTE)}</p>\n"
            f"{table.to_html(index=False, classes='claims')}\n"
        )
    if timed:
        ttt = time_to_target_display(time_to_target_table(data.cells))
        steps = step_time_table(data)
        peers = peer_table(data)
        timed_md = [
            "## Time to target",
            "",
            TTT_NOTE,
            "",
            _markdown_table(ttt),
            "## Step cost (amortized = training time / steps, refreshes included; median step"
            " beside; ratios to the SGD named in `vs`: same suite, batch size and compile mode)",
            "",
            _markdown_table(steps),
            *(
                [
                    "## kfacbench vs peers (ms: kfacbench / peer, paired on identical"
                    " settings; amortized = training time / steps, refreshes included)",
                    "",
                    _markdown_table(peers),
                ]
                if not peers.empty
                else []
            ),
        ]
        peers_html = (
            "<h2>kfacbench vs peers</h2>\n"
            + peers.to_html(index=False, float_format=lambda v: f"{v:.3g}")
            + "\n"
            if not peers.empty
            else ""
        )
        timed_html = (
            f"<h2>Time to target</h2>\n<p>{html.escape(TTT_NOTE)}</p>\n"
            f"{ttt.to_html(index=False, classes='ttt')}\n<h2>Step cost</h2>\n"
            f"{steps.to_html(index=False, float_format=lambda v: f'{v:.4g}')}\n{peers_html}"
        )
    else:
        timed_md = [NO_TIMED_RUN, ""]
        timed_html = f"<p>{html.escape(NO_TIMED_RUN)}</p>\n"
    md = [
        f"# kfacbench report: {suites}",
        "",
        *claims_md,
        *(f"- {line}" for line in env),
        f"- runs: {', '.join(str(p) for p in run_dirs)}",
        "",
        *(f"> **Warning**: {line}\n" for line in warnings),
        *timed_md,
        "## Figures",
        "",
        *(f"![{name}]({name}.png)\n\n{caption}\n" for name, caption in figures),
        *(["Not drawn for these runs:", ""] if omitted else []),
        *(f"- {what}: {why}" for what, why in omitted),
        "",
    ]
    (out / "summary.md").write_text("\n".join(md))
    images = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((out / f"{name}.png").read_bytes()).decode()}">'
        f"<figcaption>{html.escape(caption)} ({html.escape(name)}.png)</figcaption></figure>"
        for name, caption in figures
    )
    omitted_html = (
        "<p>Not drawn for these runs:</p>\n<ul>"
        + "".join(f"<li>{html.escape(what)}: {html.escape(why)}</li>" for what, why in omitted)
        + "</ul>\n"
        if omitted
        else ""
    )
    suites_html = "\n".join(
        f"<details><summary>suite as run: {html.escape(path)}</summary>"
        f"<pre>{html.escape(text)}</pre></details>"
        for path, text in data.suites
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
table.ttt td {{ white-space: nowrap; }}
table.ttt td:nth-child(5), table.ttt td:nth-child(6) {{ text-align: left; }}
table.ttt td:nth-child(6) {{ white-space: normal; }}
table.claims td {{ text-align: left; vertical-align: top; }}
</style></head><body>
<h1>kfacbench report: {html.escape(suites)}</h1>
{claims_html}<ul>{"".join(f"<li>{html.escape(line)}</li>" for line in env)}</ul>
{"".join(f'<p class="warning">Warning: {html.escape(line)}</p>' for line in warnings)}
{suites_html}
{timed_html}<h2>Figures</h2>
{images}
{omitted_html}
</body></html>
"""
    (out / "index.html").write_text(page)
    return out / "index.html"
