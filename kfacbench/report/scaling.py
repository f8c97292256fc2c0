"""How each method's cost grows with the work: log-log slopes per phase, the FLOP model's slopes
beside them, the crossovers, and each phase's achieved GFLOP/s.

A run of the cost-growth families (:mod:`kfacbench.workloads.scaling`: ``mlp_<W>``,
``block_<W>_<T>``) varies one axis at a time: the width W, the batch size or the sequence length
T. Along each, a phase whose time is t ≈ c·xᵇ is a straight line of slope b on log-log axes, so
b is fitted by least squares on (log x, log t) with its standard error and a 95% confidence
interval (Student's t with n − 2 degrees of freedom; from at least :data:`MIN_POINTS` distinct
x). The FLOP model (:mod:`kfacbench.optim.flops`) is fitted the same way over the same x: its
slope is what the arithmetic alone predicts (K-FAC's inverse 3 in W, its factors and forward
2), and a measured slope below it says the phase is not yet arithmetic-bound at the small end
(launch latency, memory traffic, solver overheads). SKFAC has no model line: its Woodbury path
depends on the rank and on :func:`~kfacbench.optim.lowrank.dense_pays`, which the model does
not follow.

Per-step costs are steady-state: a phase that ran on every step counts its median; one that ran
on some steps only (the refresh's ``inverse``, SKFAC's ``curvature``) counts its median once per
T_inv steps. ``amortized`` is their sum, the step a long run pays on average. The crossovers:

- **refresh vs the rest**: the x from which a method's refresh per step (inverse / T_inv) costs
  more than all its other phases together;
- **SKFAC vs K-FAC**: the x at which SKFAC's amortized step and K-FAC's swap places: where SKFAC's
  rank (the batch) stops paying.

Both are read off the measured medians, interpolated linearly in log-log coordinates between the
two neighbouring x where the order changes; outside the measured range the fitted power laws'
crossing is given as an extrapolation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from kfacbench.report.arithmetic import cell_flops
from kfacbench.workloads.scaling import shape_of

AXES = {"width": "W", "batch_size": "batch", "seq": "T"}
"""The swept axes and how the tables name them."""
PHASES = ("forward", "backward", "curvature", "inverse", "precondition", "update")
"""The phases fitted one by one (the FLOP model's phases)."""
AMORTIZED = "amortized"
"""The steady-state step: every phase's per-step cost summed."""
MIN_POINTS = 3
"""Distinct x a slope is fitted from (two points fit any line exactly: no error to give)."""
LEVEL = 0.95
"""Confidence level of a slope's interval."""
EXTRAPOLATE = 4.0
"""How far beyond the measured range (as a factor) a crossing of the fitted lines is given: a
power law fitted over a few points says little further out."""
KFAC = ("kfac-fast", "kfac", "kfac-tridiag")
SKFAC = ("skfac", "skfac-subsample")
_BASE_KEYS = ("suite", "device_name", "family", "optimizer", "hparams", "inv_interval", "compile")
"""What a line of points shares besides the axes that are held fixed."""


@dataclass(frozen=True)
class PowerFit:
    """t ≈ exp(intercept)·x^slope, fitted on logs."""

    slope: float
    intercept: float
    stderr: float
    lo: float
    hi: float
    points: int

    def at(self, x: float | np.ndarray) -> Any:
        """The fitted value at ``x``."""
        return np.exp(self.intercept) * np.asarray(x, dtype=float) ** self.slope


def fit_power(x: ArrayLike, y: ArrayLike, level: float = LEVEL) -> PowerFit:
    """Least squares of log y on log x: the slope, its standard error
    √(RSS / (n − 2) / Σ(log x − mean)²) and its ``level`` interval (Student's t, n − 2 dof).

    Raises:
        ValueError: fewer than :data:`MIN_POINTS` distinct x, or a value that is not positive
            and finite (no logarithm).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if lx.shape != ly.shape or not (np.isfinite(lx).all() and np.isfinite(ly).all()):
        raise ValueError("a power-law fit needs positive, finite x and y of equal length")
    if len(np.unique(lx)) < MIN_POINTS:
        raise ValueError(f"a slope needs at least {MIN_POINTS} distinct x")
    dx = lx - lx.mean()
    sxx = float(dx @ dx)
    slope = float(dx @ (ly - ly.mean())) / sxx
    intercept = float(ly.mean() - slope * lx.mean())
    dof = len(lx) - 2
    rss = float(np.sum((ly - intercept - slope * lx) ** 2))
    stderr = math.sqrt(rss / dof / sxx)
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    return PowerFit(slope, intercept, stderr, slope - t * stderr, slope + t * stderr, len(lx))


def crossings(x: Sequence[float], a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Every x where ``a`` and ``b`` swap order, interpolated linearly in log-log coordinates
    between the two neighbouring points (exact for two power laws); ``x`` ascending."""
    lx = np.log(np.asarray(x, dtype=float))
    d = np.log(np.asarray(a, dtype=float)) - np.log(np.asarray(b, dtype=float))
    out = []
    for i in range(len(lx) - 1):
        if (d[i] < 0) != (d[i + 1] < 0):
            t = d[i] / (d[i] - d[i + 1])
            out.append(float(np.exp(lx[i] + t * (lx[i + 1] - lx[i]))))
    return out


def fitted_crossing(fa: PowerFit, fb: PowerFit) -> float | None:
    """Where two fitted power laws meet (None when their slopes are equal)."""
    if fa.slope == fb.slope:
        return None
    return math.exp((fb.intercept - fa.intercept) / (fa.slope - fb.slope))


def _number(x: float) -> str:
    """A point on an axis: whole numbers from 100 on (``31,623``), 3 digits below."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def crossover_text(
    what_a: str, what_b: str, axis: str, x: Sequence[float], a: Sequence[float], b: Sequence[float]
) -> str:
    """Where ``a`` and ``b`` (medians at ascending ``x``) swap order, in words, else which stays
    above over the measured range and where the fitted lines would meet, if within
    :data:`EXTRAPOLATE` times beyond it."""
    name = AXES[axis]
    found = crossings(x, a, b)
    if found:
        first_below = a[0] < b[0]
        parts = []
        for at in found:
            parts.append(f"{what_a} {'overtakes' if first_below else 'falls below'} {what_b} at")
            parts[-1] += f" {name} ≈ {_number(at)}"
            first_below = not first_below
        return "; ".join(parts)
    above = a[0] >= b[0]
    text = (
        f"{what_a} stays {'above' if above else 'below'} {what_b} over {name} {x[0]:g}–{x[-1]:g}:"
        " not within the measured range"
    )
    if len(set(x)) >= MIN_POINTS:
        meet = fitted_crossing(fit_power(x, a), fit_power(x, b))
        near = meet is not None and x[0] / EXTRAPOLATE <= meet <= x[-1] * EXTRAPOLATE
        if meet is not None and near and not x[0] <= meet <= x[-1]:
            text += f" (the fitted lines meet at {name} ≈ {_number(meet)}, extrapolated)"
    return text


def per_step_ms(ms: float, calls: int, steps: int, inv_interval: float) -> float:
    """A phase's steady-state cost per step: its median if it ran every step, else its median
    once per T_inv steps (it ran at refreshes), or over the steps it ran without a T_inv."""
    if calls >= steps:
        return ms
    if inv_interval > 0:
        return ms / inv_interval
    return ms * calls / steps


def phase_costs(cells: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """One row per ok cell of a cost-growth workload and phase (and ``amortized``): the family,
    width, sequence length and batch, the median ms per call, the steady-state ms per step
    (:func:`per_step_ms`), the FLOP model's FLOPs per call (NaN where there is no model) and the
    method as the tables name it (:func:`method_labels`). Empty for runs of other workloads."""
    shapes = cells["workload"].astype(str).map(shape_of)
    ok = cells.loc[(cells["status"] == "ok") & shapes.notna()]
    if ok.empty:
        return pd.DataFrame()
    timed = phases.loc[phases["cell_id"].isin(ok["cell_id"]) & (phases["phase"] != "step")]
    by_cell = {cid: g for cid, g in timed.groupby("cell_id")}
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = ok.to_dict("records")  # type: ignore[assignment]
    for cell in records:
        shape = shape_of(str(cell["workload"]))
        group = by_cell.get(cell["cell_id"])
        if shape is None or group is None:
            continue
        inv = float(cell["inv_interval"]) if pd.notna(cell["inv_interval"]) else 0.0
        model = cell_flops(cell)
        base = {k: cell.get(k) for k in (*_BASE_KEYS, "cell_id", "batch_size", "seed")}
        base.update(family=shape.family, width=shape.width, seq=shape.seq, inv_interval=inv)
        total = 0.0
        for ph in group.to_dict("records"):
            step_ms = per_step_ms(float(ph["median_ms"]), int(ph["calls"]), int(cell["steps"]), inv)
            total += step_ms
            flops = (
                getattr(model, str(ph["phase"])) if model and ph["phase"] in PHASES else math.nan
            )
            rows.append(
                base | {"phase": ph["phase"], "ms": ph["median_ms"], "step_ms": step_ms,
                        "flops": flops}
            )  # fmt: skip
        # The model's steady state: one refresh per T_inv steps (none for SGD).
        amortized = model.amortized(1 if inv else 0, int(inv) or 1) if model else math.nan
        rows.append(base | {"phase": AMORTIZED, "ms": total, "step_ms": total, "flops": amortized})
    if not rows:
        return pd.DataFrame()
    costs = pd.DataFrame(rows)
    return costs.assign(method=method_labels(costs))


def fixed_text(family: str, values: Mapping[str, Any]) -> str:
    """The held axes of a line, as the tables name them (``T 128, batch 8``)."""
    parts = [
        f"{AXES[a]} {int(v)}" for a, v in values.items() if not (a == "seq" and family == "mlp")
    ]
    return ", ".join(parts)


def method_labels(costs: pd.DataFrame) -> pd.Series:
    """Each row's method as the tables name it: the optimizer and its T_inv, its
    hyperparameters where the optimizer ran with several, its suite and device where the
    costs come from several."""
    label = costs["optimizer"].astype(str) + costs["inv_interval"].map(
        lambda v: f" T_inv {int(v)}" if v else ""
    )
    several = costs.groupby("optimizer")["hparams"].transform("nunique") > 1
    label = label.where(~several, label + " " + costs["hparams"].astype(str))
    where = costs["suite"].astype(str) + " on " + costs["device_name"].astype(str)
    return label if where.nunique() == 1 else label + " [" + where + "]"


def lines_along(costs: pd.DataFrame, axis: str) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    """The lines of points along ``axis`` (every other axis held): (their key, their rows) for
    each line with at least :data:`MIN_POINTS` distinct x."""
    fixed = [a for a in AXES if a != axis]
    keys = [k for k in (*_BASE_KEYS, *fixed) if k in costs]
    out = []
    for key, rows in costs.groupby(keys, dropna=False, sort=True):
        if rows[axis].nunique() >= MIN_POINTS:
            out.append((dict(zip(keys, key, strict=True)), rows))
    return out


def slope_table(costs: pd.DataFrame) -> pd.DataFrame:
    """One row per axis, line and phase with a fit: the measured slope b with its standard error
    and interval, and the FLOP model's slope over the same x (NaN where there is no model).
    ``ms`` is fitted for the phases (per call: the inverse per refresh), ``step_ms`` for
    ``amortized``."""
    if costs.empty:
        return pd.DataFrame()
    rows = []
    for axis in AXES:
        for key, line in lines_along(costs, axis):
            fixed = fixed_text(key["family"], {a: key[a] for a in AXES if a != axis})
            for phase in (*PHASES, AMORTIZED):
                points = line[(line["phase"] == phase) & (line["ms"] > 0)]
                if points[axis].nunique() < MIN_POINTS:
                    continue
                fit = fit_power(points[axis], points["ms"])
                model = points.groupby(axis)["flops"].first()
                model = model[model > 0]
                rows.append(
                    {
                        "axis": AXES[axis],
                        "family": key["family"],
                        "fixed": fixed,
                        "method": points["method"].iloc[0],
                        "phase": phase,
                        "x_lo": points[axis].min(),
                        "x_hi": points[axis].max(),
                        "points": fit.points,
                        "slope": fit.slope,
                        "stderr": fit.stderr,
                        "lo": fit.lo,
                        "hi": fit.hi,
                        "model_slope": (
                            fit_power(model.index, model.to_numpy()).slope
                            if len(model) >= MIN_POINTS
                            else math.nan
                        ),
                    }
                )
    return pd.DataFrame(rows)


def _medians(line: pd.DataFrame, axis: str, phase: str) -> pd.Series:
    """Per x, the median over seeds of ``phase``'s per-step ms."""
    return line[line["phase"] == phase].groupby(axis)["step_ms"].median()


def _crossover(axis: str, a: pd.Series, b: pd.Series, what_a: str, what_b: str) -> str | None:
    """:func:`crossover_text` of two per-x medians at the x both have (None: too few)."""
    both = pd.concat([a, b], axis=1, join="inner").dropna()
    both = both[(both > 0).all(axis=1)]
    if len(both) < MIN_POINTS:
        return None
    xs = [float(v) for v in both.index]
    return crossover_text(what_a, what_b, axis, xs, list(both.iloc[:, 0]), list(both.iloc[:, 1]))


def crossover_table(costs: pd.DataFrame) -> pd.DataFrame:
    """One row per axis, group of lines (the held axes) and crossover: each method's refresh
    per step against the rest of its step, and each SKFAC method's amortized step against each
    K-FAC method's, in words (:func:`crossover_text`)."""
    if costs.empty:
        return pd.DataFrame()
    rows = []
    for axis in AXES:
        held = [k for k in _BASE_KEYS if k not in ("optimizer", "hparams", "inv_interval")]
        groups: dict[tuple[Any, ...], list[pd.DataFrame]] = {}
        for key, line in lines_along(costs, axis):
            group = tuple(key.get(k) for k in (*held, *(a for a in AXES if a != axis)))
            groups.setdefault(group, []).append(line)
        for lines in groups.values():
            first = lines[0]
            fixed = fixed_text(
                str(first["family"].iloc[0]),
                {a: first[a].iloc[0] for a in AXES if a != axis},
            )
            where = {"axis": AXES[axis], "family": first["family"].iloc[0], "fixed": fixed}
            for line in lines:
                method = str(line["method"].iloc[0])
                if (line["phase"] == "inverse").any() and line["inv_interval"].iloc[0] > 0:
                    refresh = _medians(line, axis, "inverse")
                    rest = _medians(line, axis, AMORTIZED) - refresh
                    found = _crossover(
                        axis, refresh, rest, f"{method}'s refresh / T_inv", "the rest of its step"
                    )
                    if found:
                        rows.append(where | {"crossover": "refresh vs the rest", "finding": found})
            for s in (ln for ln in lines if ln["optimizer"].iloc[0] in SKFAC):
                for k in (ln for ln in lines if ln["optimizer"].iloc[0] in KFAC):
                    found = _crossover(
                        axis,
                        _medians(s, axis, AMORTIZED),
                        _medians(k, axis, AMORTIZED),
                        f"{s['method'].iloc[0]}'s step",
                        f"{k['method'].iloc[0]}'s",
                    )
                    if found:
                        rows.append(where | {"crossover": "SKFAC vs K-FAC", "finding": found})
    return pd.DataFrame(rows)


def gemm_rates(envs: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The measured float32 GEMM rate (GFLOP/s) per device name, from the runs' ``env.json``
    (median where several runs measured one device; runs from before it was measured have
    none)."""
    rates: dict[str, list[float]] = {}
    for env in envs:
        if env.get("gemm_gflops") is not None:
            rates.setdefault(str(env["device_name"]), []).append(float(env["gemm_gflops"]))
    return {name: float(np.median(values)) for name, values in rates.items()}


def throughput(costs: pd.DataFrame) -> pd.DataFrame:
    """``costs`` with each modelled phase's achieved GFLOP/s: its model FLOPs per call over its
    median ms per call (``amortized``: per step), rows without a model left out."""
    rated = costs.dropna(subset=["flops"])
    rated = rated[(rated["flops"] > 0) & (rated["ms"] > 0)]
    return rated.assign(gflops=rated["flops"] / (rated["ms"] / 1e3) / 1e9)


def slope_display(slopes: pd.DataFrame) -> pd.DataFrame:
    """The slopes as a report shows them: a row per axis, line and method, a column per phase
    holding ``b [lo, hi] (model)``: the measured slope, its interval, the FLOP model's slope."""

    def text(row: pd.Series) -> str:
        shown = f"{row['slope']:.2f} [{row['lo']:.2f}, {row['hi']:.2f}]"
        return shown + (f" ({row['model_slope']:.2f})" if pd.notna(row["model_slope"]) else "")

    keys = ["axis", "family", "fixed", "method"]
    shown = slopes.assign(
        text=slopes.apply(text, axis=1),
        range=slopes["x_lo"].map("{:g}".format) + "–" + slopes["x_hi"].map("{:g}".format),
    )
    wide = shown.pivot_table(
        index=[*keys, "range"], columns="phase", values="text", aggfunc="first", sort=False
    )
    order = [p for p in (*PHASES, AMORTIZED) if p in wide.columns]
    wide = wide[order].fillna("-").reset_index()
    return wide.rename(columns={"fixed": "held", "range": "x", AMORTIZED: "amortized step"})
