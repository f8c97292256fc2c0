"""The timing figures (loss curves, time to target, phases, scaling, kernels, performance
profile) and :func:`build_figures`, which decides which of them a report's runs support."""

from __future__ import annotations

import math
import re
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.text import Annotation
from matplotlib.ticker import (
    NullLocator,
    PercentFormatter,
)

from kfacbench.core.loop import LoopConfig
from kfacbench.report.data import BASELINE, ReportData
from kfacbench.report.diagnostic_figures import diagnostic_figures
from kfacbench.report.format import plural, seconds
from kfacbench.report.plotting import (
    Figures,
    fit_notes,
    median_band,
    optimizer_colors,
    plain_log_ticks,
    setting_colors,
    setting_order,
    setting_styles,
    short_labels,
    wants_log_axis,
)
from kfacbench.report.scaling_figures import cost_growth_figures
from kfacbench.report.tables import (
    PHASE_ORDER,
    TAU_MAX,
    baseline_name,
    errored_workloads,
    not_races,
    performance_profile,
    phase_table,
    speedup,
    time_to_target_table,
    time_to_target_text,
)
from kfacbench.runs.rundir import amortized_step_ms

_WIDTH = re.compile(r"^wide_ae_(\d+)$")


DIVERGE_FACTOR = LoopConfig.diverge_factor
"""The loop's divergence bound, as a multiple of a cell's first loss."""


INITIAL_LOSS = re.compile(r"× the initial loss ([-+0-9.eE]+)")
"""The loop's divergence message names the loss it compared against (the first step's)."""


def clip_diverged(curves: pd.DataFrame) -> pd.DataFrame:
    """Losses of diverged cells clipped at their divergence bound (``DIVERGE_FACTOR`` × the
    initial loss their ``error`` names, else × their first logged loss): a loss of 1e6 would
    otherwise set the axis, and every converging curve would lie flat at its bottom."""
    diverged = curves["status"] == "diverged"
    if not diverged.any():
        return curves
    first = curves.sort_values("step").groupby("cell_id")["train_loss"].transform("first")
    named = (
        curves["error"].astype(str).str.extract(INITIAL_LOSS, expand=False).astype(float)
        if "error" in curves
        else pd.Series(np.nan, index=curves.index)
    )
    bound = DIVERGE_FACTOR * named.fillna(first.reindex(curves.index))
    clipped = curves["train_loss"].where(~diverged | (curves["train_loss"] <= bound), bound)
    return curves.assign(train_loss=clipped.where(np.isfinite(clipped), bound))


def loss_figures(data: ReportData, colors: dict[str, Any], figs: Figures) -> None:
    """Training loss vs wall-clock and vs steps, one figure per workload."""
    styles = setting_styles(data.cells)
    shades = setting_colors(data.cells, colors)
    ranks = setting_order(data.cells)
    curves = clip_diverged(
        data.curves.dropna(subset=["train_loss"]).merge(
            data.cells[
                ["cell_id", "workload", "optimizer", "setting", "status"]
                + (["error"] if "error" in data.cells else [])
            ],
            on="cell_id",
        )
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
                grid, med, low, high = median_band(runs[setting], x, log)
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
                for run in runs[setting]:
                    if (run["status"] == "diverged").any():  # where it blew up, at the bound
                        end = run.iloc[-1]
                        ax.plot(
                            [end[x]],
                            [end["train_loss"]],
                            marker="X",
                            ms=9,
                            ls="none",
                            color=shades[setting],
                            markeredgecolor="0.1",
                        )
            if log:
                ax.set_xscale("log")
                plain_log_ticks(ax.xaxis)
            ax.set_xlabel(f"{what}, {'log' if log else 'linear'} scale")
            ax.grid(True, which="major", alpha=0.3)
        axes[0].set_ylabel("training loss (minibatch mean)")
        if (wcurves["train_loss"] > 0).all():
            axes[0].set_yscale("log")
            plain_log_ticks(axes[0].yaxis)
        diverged = (
            "; ✕: diverged, drawn at the divergence bound"
            if (wcurves["status"] == "diverged").any()
            else ""
        )
        fig.suptitle(f"{workload}: training loss (median over seeds; band: min to max{diverged})")
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


def time_to_target_figure(
    table: pd.DataFrame,
    cells: pd.DataFrame,
    colors: dict[str, Any],
    figs: Figures,
    baseline: str = BASELINE,
) -> None:
    """One bar per setting, one panel per workload (each on its own time axis): solid to its
    time to target, labelled with the speed-up over the best ``baseline`` setting, hatched to
    the time it trained when it did not reach it."""
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
    notes: list[tuple[Axes, float, Annotation]] = []
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        rows = table[table["workload"] == workload].reset_index(drop=True)
        for i, row in enumerate(rows.itertuples(index=False)):
            color = shades[row.setting]
            if row.outcome == "reached":
                end, note = row.time_to_target_s, seconds(row.time_to_target_s)
                if short := speedup(row, table, baseline).short:
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
            text.set_in_layout(False)  # room is made by the axis limit (fit_notes), not layout
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
    name = baseline_name(baseline)
    for _ in range(2):  # the layout moves the axes, and the notes must end inside them
        fig.tight_layout()
        fit_notes(fig, notes)
    figs.add(
        "time_to_target",
        fig,
        "Time to target per setting: solid bars reached the target (with the speed-up over the "
        f"best {name} setting, or its bound when {name} did not reach it), the line on a bar "
        "spanning "
        "the eval interval in which the target was crossed; hatched bars did not reach it, and "
        "end at the time the setting trained.",
    )


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
    """Amortized step time (training time / steps, refreshes included) vs each swept axis
    (batch size, inversion interval, width): the median step would hide exactly what a longer
    inversion interval saves."""
    cells = data.cells[data.cells["status"] == "ok"].copy()
    cells["amortized_ms"] = amortized_step_ms(cells)
    cells["width"] = cells["workload"].map(
        lambda w: int(m.group(1)) if (m := _WIDTH.match(w)) else math.nan
    )
    cells["family"] = cells["workload"].map(lambda w: "wide_ae" if _WIDTH.match(w) else w)
    if cells["suite"].nunique() > 1:  # a line joins cells of one suite only: like with like
        for column in ("workload", "family"):
            cells[column] = cells[column].astype(str) + " (" + cells["suite"].astype(str) + ")"
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
            y="amortized_ms",
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
            plain_log_ticks(ax.yaxis, (1.0, 2.0, 3.0, 5.0))
        grid.set_titles("{col_name}")
        grid.set_axis_labels(f"{xlabel}, log scale", "ms / step (amortized), log scale")
        grid.figure.suptitle(
            f"Amortized step time vs {name}\n(median over each optimizer's other settings)",
            y=1.02,
            va="bottom",
        )
        figs.add(
            f"scaling_{axis}",
            grid.figure,
            f"Amortized step time (training time / steps, refreshes included) vs {name}, per "
            f"optimizer (a point per {name} it ran at), one panel per workload and suite.",
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
    ax.set_title(f"Performance profile over {plural(table['workload'].nunique(), 'workload')}")
    figs.add(
        "performance_profile",
        fig,
        "Fraction of workloads on which each optimizer reached the target within τ times the "
        "fastest optimizer's time (not reached: never within τ).",
    )


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
        skipped = not_races(data.cells)
        races = data.cells[~data.cells["workload"].astype(str).isin(skipped)]
        ttt = time_to_target_table(races, data.baseline)
        loss_figures(data, colors, figs)
        if skipped:
            figs.omit(
                "time to target of " + ", ".join(sorted(skipped)),
                "; ".join(sorted(set(skipped.values()))),
            )
        if not races.empty:
            time_to_target_figure(ttt, races, colors, figs, data.baseline)
        phase_figure(data, figs)
        scaling_figures(data, colors, figs)
        cost_growth_figures(data, figs)
        kernel_figure(data, figs)
        errored = errored_workloads(data.cells) & set(ttt.get("workload", ()))
        performance_profile_figure(
            ttt[~ttt["workload"].isin(errored)] if errored else ttt, colors, figs
        )
        if errored:
            figs.omit(
                "the performance profile's " + ", ".join(sorted(errored)),
                "a cell of each ended in an error: the profile would count a missing result",
            )
    diagnostic_figures(data, colors, figs)
    return figs
