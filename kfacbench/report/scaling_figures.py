"""The cost-growth figures: each phase's time, and its achieved GFLOP/s, against width, batch
and sequence length, with the fitted power laws, the FLOP model at the device's GEMM rate, and
that rate itself (:mod:`kfacbench.report.scaling` has the numbers).

Drawn only for runs of the cost-growth families with at least three values on an axis: a report
on any other run has none of them and says nothing about them.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from kfacbench.optim import METHODS
from kfacbench.report.data import ReportData
from kfacbench.report.plotting import Figures
from kfacbench.report.scaling import (
    AMORTIZED,
    AXES,
    MIN_POINTS,
    PHASES,
    fit_power,
    fixed_text,
    gemm_rates,
    lines_along,
    phase_costs,
    throughput,
)

AXIS_LABELS = {
    "width": "width W",
    "batch_size": "batch size (examples)",
    "seq": "sequence length T (positions)",
}


def _palette() -> dict[str, Any]:
    colors = dict(zip(PHASES, sns.color_palette("Set2", len(PHASES)), strict=True))
    return colors | {AMORTIZED: (0.1, 0.1, 0.1)}


def _panels(
    costs: pd.DataFrame, axis: str
) -> tuple[list[str], list[str], dict[tuple[str, str], pd.DataFrame]]:
    """Rows (the held axes of a family, and the run where there are several), columns (the
    methods) and each panel's points along ``axis``."""
    several = costs.groupby(["suite", "device_name"], dropna=False).ngroups > 1
    panels: dict[tuple[str, str], pd.DataFrame] = {}
    for key, line in lines_along(costs, axis):
        row = (
            f"{key['family']}, {fixed_text(key['family'], {a: key[a] for a in AXES if a != axis})}"
        )
        if several:
            row += f" [{key['suite']} on {key['device_name']}]"
        panels[(row, str(line["method"].iloc[0]))] = line
    rows = list(dict.fromkeys(r for r, _ in panels))
    order = {name: i for i, name in enumerate(METHODS)}  # registry order, as every figure
    optimizer = dict(zip(costs["method"], costs["optimizer"], strict=True))
    methods = sorted(
        dict.fromkeys(m for _, m in panels), key=lambda m: (order.get(optimizer[m], len(order)), m)
    )
    return rows, methods, panels


def _grid(rows: list[str], methods: list[str]) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(
        len(rows), len(methods), figsize=(4.4 * len(methods), 3.6 * len(rows)), squeeze=False
    )
    return fig, axes


def _log_axes(ax: Axes, xs: np.ndarray, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.minorticks_off()
    ax.set_title(title, loc="left", fontsize=9)


def _time_figure(axis: str, costs: pd.DataFrame, rates: dict[str, float], figs: Figures) -> None:
    rows, methods, panels = _panels(costs, axis)
    colors = _palette()
    fig, axes = _grid(rows, methods)
    modelled = False
    for (i, row), (j, method) in ((r, m) for r in enumerate(rows) for m in enumerate(methods)):
        ax = axes[i, j]
        line = panels.get((row, method))
        if line is None:
            ax.set_axis_off()
            continue
        rate = rates.get(str(line["device_name"].iloc[0]))
        xs = np.sort(line[axis].unique()).astype(float)
        for phase in (*PHASES, AMORTIZED):
            points = line[(line["phase"] == phase) & (line["ms"] > 0)]
            if points.empty:
                continue
            med = points.groupby(axis)["ms"].median()
            width = 2.2 if phase == AMORTIZED else 1.4
            ax.plot(med.index, med.to_numpy(), "o", color=colors[phase], markersize=4)
            if med.index.nunique() >= MIN_POINTS:
                fit = fit_power(points[axis], points["ms"])
                ax.plot(xs, fit.at(xs), "-", color=colors[phase], linewidth=width)
            model = points.groupby(axis)["flops"].first().dropna()
            if rate and not model.empty:  # the time the model's FLOPs take at the GEMM rate
                modelled = True
                ax.plot(model.index, model / (rate * 1e9) * 1e3, ":", color=colors[phase])
        _log_axes(ax, xs, f"{method}\n{row}")
        ax.set_xlabel(f"{AXIS_LABELS[axis]}, log scale")
        ax.set_ylabel("ms, log scale")
    handles = [Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    handles += [
        Line2D([], [], color="grey", label="fitted power law"),
        Line2D([], [], color="grey", linestyle=":", label="FLOP model at the GEMM rate"),
    ]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"Time per phase vs {AXIS_LABELS[axis]} (amortized: per step)")
    fig.tight_layout()
    model_note = (
        "dotted: the FLOP model's operations at the device's measured GEMM rate, the time the"
        " phase would take running at it"
        if modelled
        else "no FLOP-model line: no modelled method, or the runs did not measure a GEMM rate"
    )
    figs.add(
        f"cost_growth_{axis}",
        fig,
        f"Median ms per call of each phase (the inverse: per refresh; amortized: the"
        f" steady-state step, refreshes once per T_inv) against {AXIS_LABELS[axis]}, one panel"
        f" per method and held axes; solid: the least-squares power law; {model_note}.",
    )


def _throughput_figure(
    axis: str, costs: pd.DataFrame, rates: dict[str, float], figs: Figures
) -> None:
    rated = throughput(costs)
    rows, methods, panels = _panels(rated, axis)
    if not panels:
        return
    colors = _palette()
    fig, axes = _grid(rows, methods)
    for (i, row), (j, method) in ((r, m) for r in enumerate(rows) for m in enumerate(methods)):
        ax = axes[i, j]
        line = panels.get((row, method))
        if line is None:
            ax.set_axis_off()
            continue
        xs = np.sort(line[axis].unique()).astype(float)
        for phase in (*PHASES, AMORTIZED):
            med = line[line["phase"] == phase].groupby(axis)["gflops"].median()
            if not med.empty:
                width = 2.2 if phase == AMORTIZED else 1.4
                ax.plot(med.index, med.to_numpy(), "o-", color=colors[phase], linewidth=width)
        rate = rates.get(str(line["device_name"].iloc[0]))
        if rate:
            ax.axhline(rate, color="black", linestyle="--", linewidth=1.0)
        _log_axes(ax, xs, f"{method}\n{row}")
        ax.set_xlabel(f"{AXIS_LABELS[axis]}, log scale")
        ax.set_ylabel("GFLOP/s, log scale")
    handles = [Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    handles.append(Line2D([], [], color="black", linestyle="--", label="measured GEMM rate"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.suptitle(f"Achieved GFLOP/s per phase vs {AXIS_LABELS[axis]}")
    fig.tight_layout()
    figs.add(
        f"throughput_{axis}",
        fig,
        f"Each phase's FLOPs (the FLOP model of kfacbench/optim/flops.py) over its median time"
        f" against {AXIS_LABELS[axis]}, for the methods the model covers; dashed: the device's"
        " float32 GEMM rate measured before the cells (env.json). A phase near the line runs at"
        " the hardware's limit; one far below is latency-bound or runs slower kernels.",
    )


def cost_growth_figures(data: ReportData, figs: Figures) -> None:
    """Per swept axis with at least :data:`MIN_POINTS` values: time per phase and achieved
    GFLOP/s per phase (nothing for runs without a cost-growth workload)."""
    if data.cells.empty:
        return
    costs = phase_costs(data.cells, data.phases)
    if costs.empty:
        return
    rates = gemm_rates(data.envs)
    drawn = False
    for axis in AXES:
        if lines_along(costs, axis):
            drawn = True
            _time_figure(axis, costs, rates, figs)
            _throughput_figure(axis, costs, rates, figs)
    if not drawn:
        figs.omit(
            "cost growth per phase",
            f"needs at least {MIN_POINTS} widths, batch sizes or sequence lengths of one family"
            " with the other axes held",
        )
