"""Compare two runs cell by cell: the building block of regression checks.

Cells are matched by id, the hash of their resolved config (:attr:`kfacbench.suite.Cell.id`), so
the same cell run on another commit or machine is compared with itself; cells present in only one
run are counted and listed, not compared. For each matched cell the metric's ratio NEW / BASE is
reported with a noise estimate, and a cell regresses when the ratio exceeds ``1 + fail_above``.

Metrics (all lower-is-better):

- ``amortized`` (the default): the step cost, training time / steps, every refresh of a
  second-order method included; the median step's ratio stands beside it (a change to the
  refresh moves the first, not the second). Its noise is the step-time spread below, which
  bounds how much one step moves; the mean over all steps moves less.
- ``step_time``: the median step time (the non-refresh step of a method that refreshes). Its
  noise is the half-width of the p10-p90 spread of the step times within each run, relative to
  the median, the larger of the two runs: a ratio inside ``1 ± noise`` is indistinguishable from
  no change on that machine.
- ``time_to_target``: training seconds to the workload's target. A cell that reached it in BASE
  and not in NEW regresses (ratio ∞); cells that reached it in neither are skipped. The time is
  read at evals, so each run only shows that the target was crossed after the eval before
  (``time_to_target_lo_s``) and by this one: the noise is the wider of the two runs' eval
  intervals relative to their times, and a cell regresses only when NEW's eval before already
  came later than ``1 + fail_above`` times BASE's time (one eval later is not a regression).
- ``final_loss``: the final training-set loss (no noise estimate: one value per run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from kfacbench.core.timing import STEP
from kfacbench.errors import KfacbenchError
from kfacbench.runs.rundir import amortized_step_ms, load_tables

Metric = Literal["amortized", "step_time", "time_to_target", "final_loss"]
METRICS: tuple[Metric, ...] = ("amortized", "step_time", "time_to_target", "final_loss")
_COLUMN = {
    "amortized": "amortized_ms",
    "step_time": "median_step_ms",
    "time_to_target": "time_to_target_s",
    "final_loss": "final_train_loss",
}
_UNIT = {"amortized": "ms", "step_time": "ms", "time_to_target": "s", "final_loss": ""}
CELLS_REQUIRED = ("cell_id", "label", "status")
"""Columns of ``cells`` every comparison uses (the metric's own column is added to them)."""
NOISE_REQUIRED = ("cell_id", "phase", "median_ms", "p10_ms", "p90_ms")
"""Columns of ``phases`` that the step-time noise estimate uses."""
AMORTIZED_REQUIRED = ("train_time_s", "steps", "median_step_ms")
"""Columns of ``cells`` the amortized step and the median beside it are read from."""


def required_columns(metric: Metric) -> dict[str, tuple[str, ...]]:
    """The tables and columns a comparison of ``metric`` reads."""
    if metric == "amortized":
        return {"cells": (*CELLS_REQUIRED, *AMORTIZED_REQUIRED), "phases": NOISE_REQUIRED}
    required: dict[str, tuple[str, ...]] = {"cells": (*CELLS_REQUIRED, _COLUMN[metric])}
    if metric == "step_time":
        required["phases"] = NOISE_REQUIRED
    return required


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare_runs`.

    Attributes:
        metric: the metric compared.
        table: one row per matched cell: ``cell_id``, ``label``, ``base``, ``new``, ``ratio``
            (NEW / BASE; ∞ when NEW failed, diverged or no longer reaches the target; NaN when
            BASE itself failed), ``noise`` (relative, NaN where there is none), ``regressed``
            and ``median_ratio`` (``amortized``: the median step's NEW / BASE; NaN otherwise).
        only_base, only_new: labels of cells present in one run only.
        fail_above: the relative threshold used.
    """

    metric: Metric
    table: pd.DataFrame
    only_base: list[str]
    only_new: list[str]
    fail_above: float

    @property
    def regressions(self) -> pd.DataFrame:
        """The rows that regressed."""
        return self.table[self.table["regressed"]]

    def geomean_ratio(self) -> float:
        """Geometric mean of the finite ratios (NaN when there is none)."""
        ratios = self.table["ratio"]
        finite = ratios[ratios.map(lambda r: math.isfinite(r) and r > 0)]
        if finite.empty:
            return math.nan
        return float(math.exp(finite.map(math.log).mean()))

    def markdown(self) -> str:
        """The comparison as a Markdown table with a summary line (CI comments, READMEs)."""
        unit = _UNIT[self.metric]
        suffix = f" ({unit})" if unit else ""
        median = self.metric == "amortized"
        head = f"| cell | base{suffix} | new{suffix} | new / base | noise ± |"
        head += " median step new / base | |" if median else " |"
        lines = [
            f"**{self.metric}**: geometric-mean ratio {self.geomean_ratio():.3f} over"
            f" {len(self.table)} matched cells; {len(self.regressions)} above the"
            f" +{self.fail_above:.0%} threshold.",
            "",
            head,
            "|---|---:|---:|---:|---:|" + ("---:|---|" if median else "---|"),
        ]
        for r in self.table.to_dict("records"):
            noise = "" if math.isnan(r["noise"]) else f"{r['noise']:.1%}"
            flag = "**regressed**" if r["regressed"] else ""
            beside = f" {r['median_ratio']:.3f} |" if median else ""
            lines.append(
                f"| {r['label']} | {_fmt(r['base'])} | {_fmt(r['new'])} | {r['ratio']:.3f}"
                f" | {noise} |{beside} {flag} |"
            )
        for name, labels in (("BASE", self.only_base), ("NEW", self.only_new)):
            if labels:
                lines.append(f"\nOnly in {name}: " + ", ".join(labels))
        return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{value:.4g}"


def _step_noise(phases: pd.DataFrame) -> pd.Series:
    """Per cell, the half-width of the step times' p10-p90 spread relative to their median."""
    steps = phases[phases["phase"] == STEP].set_index("cell_id")
    return (steps["p90_ms"] - steps["p10_ms"]) / (2 * steps["median_ms"])


def compare_runs(
    base_dir: Path, new_dir: Path, metric: Metric = "amortized", fail_above: float = 0.10
) -> Comparison:
    """Compare ``metric`` between two run directories (see the module docstring).

    Args:
        base_dir: the reference run.
        new_dir: the run under test.
        metric: ``amortized``, ``step_time``, ``time_to_target`` or ``final_loss``.
        fail_above: relative increase counted as a regression (0.10: +10%).

    Raises:
        KfacbenchError: a missing or damaged run directory (a
            :class:`~kfacbench.errors.RunDirError`), an unknown metric, or no common cell.
    """
    if metric not in METRICS:
        raise KfacbenchError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    column = _COLUMN[metric]
    runs = [load_tables(path, required_columns(metric)) for path in (base_dir, new_dir)]
    for t in runs:
        cells = t["cells"]
        if metric == "amortized":
            cells[column] = amortized_step_ms(cells)
        # Runs from before the column: no interval known, the time itself counts.
        if metric == "time_to_target" and "time_to_target_lo_s" not in cells:
            cells["time_to_target_lo_s"] = cells[column]
    base, new = (t["cells"].set_index("cell_id") for t in runs)
    common = [c for c in base.index if c in new.index]
    if not common:
        raise KfacbenchError(
            f"{base_dir} and {new_dir} have no cell in common (cells match by config hash)"
        )
    noise = pd.Series(math.nan, index=common)
    if metric in ("amortized", "step_time"):
        noise_b, noise_n = (_step_noise(t["phases"]) for t in runs)
        noise = pd.concat([noise_b.reindex(common), noise_n.reindex(common)], axis=1).max(axis=1)
    if metric == "time_to_target":
        widths = [1 - t["time_to_target_lo_s"] / t[column] for t in (base, new)]
        noise = pd.concat([w.reindex(common) for w in widths], axis=1).max(axis=1)
    rows = []
    for cell in common:
        b, n = float(base[column][cell]), float(new[column][cell])
        if metric == "time_to_target" and math.isnan(b):
            continue  # not reached in BASE: nothing to regress from
        if base.at[cell, "status"] != "ok":
            ratio = math.nan  # no valid reference: shown, never a regression
        elif new.at[cell, "status"] != "ok" or not math.isfinite(n):
            ratio = math.inf  # diverged, failed, or target no longer reached
        else:
            ratio = n / b if b > 0 else math.nan
        # Time to target: NEW crossed after its eval before; only that is surely later.
        certain = ratio
        if metric == "time_to_target" and math.isfinite(ratio):
            certain = float(new["time_to_target_lo_s"][cell]) / b
        rows.append(
            {
                "cell_id": cell,
                "label": str(new.at[cell, "label"]),
                "base": b,
                "new": n,
                "ratio": ratio,
                "noise": float(noise.get(cell, math.nan)),
                "regressed": certain > 1 + fail_above,
                "median_ratio": (
                    float(new["median_step_ms"][cell]) / float(base["median_step_ms"][cell])
                    if metric == "amortized"
                    else math.nan
                ),
            }
        )
    columns = ["cell_id", "label", "base", "new", "ratio", "noise", "regressed", "median_ratio"]
    table = pd.DataFrame(rows, columns=columns)
    return Comparison(
        metric=metric,
        table=table.sort_values("ratio", ascending=False, ignore_index=True),
        only_base=[str(base.at[c, "label"]) for c in base.index if c not in new.index],
        only_new=[str(new.at[c, "label"]) for c in new.index if c not in base.index],
        fail_above=fail_above,
    )
