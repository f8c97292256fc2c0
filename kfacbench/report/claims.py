"""The two papers' claims, each set against what a run measured, with a verdict.

``kfacbench report --claims`` opens its summary with this table. Each claim is checked only
against the cells and diagnostics present; a claim whose cells are missing or failed says so
("not run", with the reason a failed cell gave) rather than vanishing from the table. The
verdict rules (:data:`RULES`) are printed under the table and each row's "why" names the rule
that decided it, so a reader can disagree with a threshold without having to trust it.

Claims come from Martens & Grosse 2015 (abstract, §4.3, §13, Figs. 2–3) and Tang et al. 2021
(abstract); both papers' experiments are at GPU scale and report curves, so "reproduced" here
means the direction and rough size of each effect at CPU scale, not the papers' numbers.

Size: one function per claim of the two papers, each with the small helpers only it uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kfacbench.report.data import ReportData
from kfacbench.report.format import seconds
from kfacbench.report.tables import time_to_target_table
from kfacbench.runs.rundir import amortized_step_ms
from kfacbench.runs.store import settings_of
from kfacbench.runs.summary import REFRESH_PHASE
from kfacbench.workloads import get_workload

AUTOENCODERS = ("curves_ae", "mnist_ae", "faces_ae")
"""The deep autoencoders of the K-FAC paper's §13, in its order."""

MIN_SEEDS = 3
"""Seeds each compared setting needs for a *reproduced*: with fewer, no spread is known."""
MUCH_SOONER = 2.0
"""The time-to-target ratio that counts as "much sooner" (K-FAC abstract: "much faster")."""
LOSER_BUDGET = 3.0
"""When only the winner reached the target, the loser must have trained this many times the
winner's time to target without reaching it: a shorter budget bounds no "much sooner"."""
SEVERAL = 10.0
"""The largest K-FAC / SGD step-cost ratio still "only several times more expensive"."""
COMPARABLE = 0.8
"""The share of K-FAC's model reduction an SKFAC direction needs to count as comparable."""
ACCURACY_MARGIN = 0.02
"""How far below K-FAC an accuracy may lie and still be "comparable" (2 percentage points)."""

RULES = [
    f"reproduced: at least {MIN_SEEDS} seeds for every compared setting and an effect beyond the "
    "seeds' spread (the winner's worst seed beats the loser's best; for accuracies, the "
    "difference clears 2 standard errors)",
    "'much sooner than the best tuned SGD': the best SGD setting (soonest to the target, else the "
    "best final metric) lies inside its grid, not at either end of a swept hyperparameter; and "
    f"either both reach the target on every seed, {MUCH_SOONER:g}× apart or more, or K-FAC does "
    f"and SGD trained at least {LOSER_BUDGET:g}× K-FAC's time to target without reaching it",
    "steps to the target that differ by no more than the eval interval: not resolved",
    "consistent: the direction is right but a condition above fails ('why' names it)",
    "not reproduced: the direction is wrong; not run: the runs lack the cells ('why' says which)",
    "SKFAC's factor quality is measured at K-FAC's effective damping: λ split over the two factors "
    "by π (K-FAC §6.3, as K-FAC's factored damping), not SKFAC's √λ each, under which reduce-sum "
    "factors (|T|² times K-FAC's Ā) are damped |T|² times less than K-FAC's",
    "step costs are amortized: training time / steps, refreshes included",
]
"""The verdict rules, printed under the claims table."""


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    paper: str
    claim: str
    measured: str
    verdict: str
    """``reproduced``, ``consistent``, ``not resolved``, ``not reproduced`` or ``not run``."""
    why: str


COLUMNS = ("paper", "claim", "measured", "verdict", "why")


def claims_table(data: ReportData) -> tuple[pd.DataFrame, list[str]]:
    """Every claim, in the order of :data:`COLUMNS`, and the rules its verdicts follow."""
    rows: list[Claim] = []
    for check in CHECKS:
        rows += check(data)
    table = pd.DataFrame([[getattr(c, k) for k in COLUMNS] for c in rows], columns=list(COLUMNS))
    return table, RULES


# ---------------------------------------------------------------- helpers
def verdict(direction: bool, weak: Sequence[str], wrong: str) -> tuple[str, str]:
    """*reproduced* when the direction is right and no condition fails, *consistent* (with the
    failed conditions) when only the evidence is weak, else *not reproduced* (``wrong`` says
    why)."""
    if not direction:
        return "not reproduced", wrong
    if weak:
        return "consistent", "; ".join(weak)
    return "reproduced", "every rule holds"


def _too_few(counts: dict[str, int]) -> list[str]:
    """The rule's complaint for each side with fewer than :data:`MIN_SEEDS` seeds."""
    return [
        f"{who}: {n} seed{'s' if n != 1 else ''} (< {MIN_SEEDS})"
        for who, n in counts.items()
        if n < MIN_SEEDS
    ]


def _seeds(cells: pd.DataFrame) -> int:
    return int(cells["seed"].nunique()) if "seed" in cells else len(cells)


def _span(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return "none"
    mid = fmt(float(np.median(finite)))
    return mid if len(finite) == 1 else f"{mid} (seeds {fmt(finite[0])}–{fmt(finite[-1])})"


def _ok(cells: pd.DataFrame) -> pd.DataFrame:
    return cells[cells["status"] == "ok"]


def _missing(cells: pd.DataFrame, workload: str, what: str) -> str:
    """Why ``what`` has no result on ``workload``: the failed cells' first error, or absence."""
    failed = cells[(cells["workload"] == workload) & (cells["status"] != "ok")]
    if not failed.empty:
        error = str(failed["error"].iloc[0]) if "error" in failed else ""
        first = (
            error.splitlines()[0] if error and error != "None" else str(failed["status"].iloc[0])
        )
        return f"{what} on {workload}: {first}"
    return f"no {what} cell on {workload} in these runs"


def _steps_to_target(data: ReportData, cell_ids: Sequence[str]) -> list[float]:
    """Per cell, the step of its first eval that reached the target (inf where none did)."""
    out = []
    for cell_id in cell_ids:
        cell = data.cells[data.cells["cell_id"] == cell_id].iloc[0]
        curve = data.curves[data.curves["cell_id"] == cell_id]
        values = curve["eval_metric"].astype(float)
        reached = get_workload(str(cell["workload"])).reached
        hit = curve[[math.isfinite(v) and reached(v) for v in values]]
        out.append(float(hit["step"].min()) if not hit.empty else math.inf)
    return out


def eval_interval(data: ReportData, cell_ids: Sequence[str]) -> float:
    """The largest step gap between two evals of these cells: the resolution of a step count to
    the target (a crossing lies somewhere in the gap before the eval that saw it)."""
    curves = data.curves[data.curves["cell_id"].isin(cell_ids)]
    curves = curves[curves["eval_metric"].astype(float).notna()]
    gaps = [np.diff(np.sort(g["step"].to_numpy())) for _, g in curves.groupby("cell_id")]
    gaps = [g for g in gaps if g.size]
    return float(max(g.max() for g in gaps)) if gaps else math.nan


def _preset(cells: pd.DataFrame, workload: str, optimizer: str) -> pd.DataFrame:
    return cells[(cells["workload"] == workload) & (cells["optimizer"] == optimizer)]


def _both(
    cells: pd.DataFrame, first: str, second: str
) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(workload, cells of ``first``, cells of ``second``) for each autoencoder that has both."""
    out = []
    for workload in AUTOENCODERS:
        a, b = _preset(cells, workload, first), _preset(cells, workload, second)
        if not a.empty and not b.empty:
            out.append((workload, a, b))
    return out


def grid_edges(best: str, grid: pd.DataFrame) -> list[str]:
    """Where the best setting of an SGD grid sits at an end of a swept hyperparameter (the best
    value may lie beyond it), one complaint per such hyperparameter; fixed ones are not swept."""
    values = {str(s): json.loads(h) for s, h in zip(grid["setting"], grid["hparams"], strict=True)}
    mine, out = values[best], []

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    for key in sorted(mine):
        swept = sorted({v[key] for v in values.values() if number(v.get(key))})
        if len(swept) < 2 or not number(mine[key]):
            continue
        if mine[key] in (swept[0], swept[-1]):
            end = "smallest" if mine[key] == swept[0] else "largest"
            out.append(f"the best SGD's {key} {mine[key]:g} is the grid's {end} ({swept})")
    return out


# ---------------------------------------------------------------- K-FAC (Martens & Grosse 2015)
def _best_sgd(t: pd.DataFrame) -> Any:
    """The best SGD setting of a time-to-target table: soonest to the target on every seed, or,
    when none reached it, the best median final metric."""
    grid = t[t["optimizer"] == "sgd"]
    soonest = grid["time_to_target_s"].where(grid["outcome"] == "reached", math.inf)
    return grid.assign(soonest=soonest).sort_values(["soonest", "final"]).iloc[0]


def kfac_vs_sgd(data: ReportData) -> list[Claim]:
    """Abstract and §13: K-FAC is much faster than well-tuned SGD with momentum on the deep
    autoencoders, in wall-clock time and in progress per iteration."""
    cells, rows = data.cells, []
    for workload in AUTOENCODERS:
        claim = f"{workload}: K-FAC reaches the target much sooner than the best tuned SGD"
        mine = _ok(_preset(cells, workload, "kfac"))
        sgd_all = _preset(cells, workload, "sgd")
        if mine.empty or _ok(sgd_all).empty:
            what = "K-FAC" if mine.empty else "SGD"
            rows.append(Claim("K-FAC §13", claim, "—", "not run", _missing(cells, workload, what)))
            continue
        here = cells[cells["workload"] == workload]
        t = time_to_target_table(here)
        final = _ok(here).groupby("setting")["final_eval_metric"].median()
        sign = -1.0 if get_workload(workload).higher_is_better else 1.0
        t = t.assign(final=t["setting"].map(final).astype(float) * sign)
        kfac = t[t["optimizer"] == "kfac"].iloc[0]
        best = _best_sgd(t)
        best_cells = _ok(sgd_all[sgd_all["setting"] == best.setting])
        k_ttt = list(mine["time_to_target_s"].astype(float))
        s_ttt = list(best_cells["time_to_target_s"].astype(float))
        k_steps = _steps_to_target(data, list(mine["cell_id"]))
        s_steps = _steps_to_target(data, list(best_cells["cell_id"]))
        metric = str(mine["metric"].iloc[0]) if "metric" in mine else "metric"
        n_grid = int((t["optimizer"] == "sgd").sum())
        measured = (
            f"K-FAC {_ttt(kfac, k_ttt)}, final {metric} {sign * kfac.final:.3g}; best of "
            f"{n_grid} SGD settings ({best.setting}): {_ttt(best, s_ttt)}, final "
            f"{sign * best.final:.3g}. Steps to target: K-FAC {_span(k_steps, _count)}, "
            f"SGD {_span(s_steps, _count)}"
        )
        weak = _too_few({"K-FAC": _seeds(mine), "best SGD": _seeds(best_cells)})
        weak += grid_edges(str(best.setting), sgd_all)
        k_all, s_all = kfac.outcome == "reached", best.outcome == "reached"
        if k_all and s_all:
            ratio = float(best.time_to_target_s / kfac.time_to_target_s)
            measured += f"; SGD / K-FAC time to target {ratio:.2f}×"
            if ratio < MUCH_SOONER:
                weak.append(f"{ratio:.2f}× is not much sooner (< {MUCH_SOONER:g}×)")
            if max(k_ttt) >= min(s_ttt):
                weak.append("the seeds overlap: K-FAC's slowest is not sooner than SGD's fastest")
            rows.append(
                Claim(
                    "K-FAC abstract, §13",
                    claim,
                    measured,
                    *verdict(ratio > 1.0, weak, "the best SGD setting reached it sooner"),
                )
            )
        elif k_all:
            trained = float(best_cells["train_time_s"].min())
            bound = trained / max(k_ttt)
            measured += f"; SGD trained {bound:.2f}× K-FAC's slowest time to target"
            if bound < LOSER_BUDGET:
                weak.append(
                    f"SGD trained only {bound:.2f}× K-FAC's time to target (< {LOSER_BUDGET:g}×)"
                )
            rows.append(Claim("K-FAC abstract, §13", claim, measured, *verdict(True, weak, "")))
        elif s_all:
            rows.append(
                Claim(
                    "K-FAC abstract, §13",
                    claim,
                    measured,
                    "not reproduced",
                    "the best SGD setting reached the target and K-FAC did not on every seed",
                )
            )
        else:
            better = bool(kfac.final < best.final)
            weak.append("neither reached the target on every seed: compared by the final metric")
            rows.append(
                Claim(
                    "K-FAC abstract, §13",
                    claim,
                    measured,
                    *verdict(better, weak, "neither reached the target; SGD ended better"),
                )
            )
    return rows


def _count(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) else "not reached"


def _ttt(row: Any, per_seed: Sequence[float]) -> str:
    outcome = row.outcome
    if outcome == "reached":
        return f"{_span(per_seed, seconds)} to the target"
    if outcome == "not reached":
        return (
            f"not reached in {seconds(float(row.train_time_s))} ({row.reached_seeds} of "
            f"{row.seeds} seeds reached it)"
        )
    return str(outcome)


def _refresh_share(data: ReportData, cells: pd.DataFrame) -> str:
    """The inverse phase of ``cells``: its time per refresh and its share of training time."""
    inverse = data.phases[
        (data.phases["phase"] == REFRESH_PHASE) & data.phases["cell_id"].isin(cells["cell_id"])
    ]
    if inverse.empty:
        return ""
    share = float(inverse["total_s"].sum() / cells["train_time_s"].astype(float).sum())
    return f"; a refresh {float(inverse['median_ms'].median()):.0f} ms, {share:.0%} of training"


def kfac_step_cost(data: ReportData) -> list[Claim]:
    """Abstract: a K-FAC step is "only several times more expensive" than a stochastic
    gradient's; amortized (training time / steps), so the refreshes count."""
    cells, rows = _ok(data.cells), []
    claim = "a K-FAC step costs only several times an SGD step"
    for workload, kfac, sgd in _both(cells, "kfac", "sgd"):
        k_ms, s_ms = amortized_step_ms(kfac), amortized_step_ms(sgd)
        ratio = float(k_ms.median() / s_ms.median())
        worst = float(k_ms.max() / s_ms.min())
        measured = (
            f"{workload}: amortized {k_ms.median():.1f} ms (K-FAC, {_seeds(kfac)} seeds) / "
            f"{s_ms.median():.1f} ms (the {len(sgd)} cells of the SGD grid) = {ratio:.1f}×, "
            f"slowest K-FAC / fastest SGD cell {worst:.1f}×; median step "
            f"{kfac['median_step_ms'].median():.1f} / {sgd['median_step_ms'].median():.1f} ms"
            f"{_refresh_share(data, kfac)}"
        )
        weak = _too_few({"K-FAC": _seeds(kfac)})
        if worst > SEVERAL:
            weak.append(f"the slowest K-FAC / fastest SGD cell is {worst:.1f}× (> {SEVERAL:g}×)")
        wrong = f"{ratio:.1f}× is more than several (> {SEVERAL:g}×)"
        rows.append(
            Claim("K-FAC abstract", claim, measured, *verdict(ratio <= SEVERAL, weak, wrong))
        )
    if not rows:
        rows.append(Claim("K-FAC abstract", claim, "—", "not run", "no K-FAC and SGD cells"))
    return rows


def tridiag_vs_blockdiag(data: ReportData) -> list[Claim]:
    """§4.3/§13: the block-tridiagonal inverse approximates the inverse Fisher better and makes
    more progress per iteration than the block-diagonal one, at a somewhat higher step cost."""
    cells, rows = _ok(data.cells), []
    claim = "block-tridiagonal K-FAC makes more progress per iteration than block-diagonal"
    for workload, tri, diag in _both(cells, "kfac-tridiag", "kfac"):
        t_steps = _steps_to_target(data, list(tri["cell_id"]))
        d_steps = _steps_to_target(data, list(diag["cell_id"]))
        interval = eval_interval(data, [*tri["cell_id"], *diag["cell_id"]])
        cost = float(amortized_step_ms(tri).median() / amortized_step_ms(diag).median())
        measured = (
            f"{workload}: steps to target tridiagonal {_span(t_steps, _count)} vs block-diagonal "
            f"{_span(d_steps, _count)}, evals every {interval:.0f} steps; amortized step "
            f"{cost:.2f}× block-diagonal's"
        )
        t_mid, d_mid = float(np.median(t_steps)), float(np.median(d_steps))
        unresolved = None
        if math.isinf(t_mid) and math.isinf(d_mid):
            unresolved = "neither reached the target on most seeds"
        elif abs(d_mid - t_mid) <= interval:
            unresolved = (
                f"the medians differ by {abs(d_mid - t_mid):.0f} steps, no more than the eval "
                f"interval ({interval:.0f})"
            )
        if unresolved is not None:
            rows.append(Claim("K-FAC §4.3, §13", claim, measured, "not resolved", unresolved))
            continue
        weak = _too_few({"tridiagonal": _seeds(tri), "block-diagonal": _seeds(diag)})
        if max(t_steps) >= min(d_steps):
            weak.append("the seeds overlap: tridiagonal's worst is not below block-diagonal's best")
        rows.append(
            Claim(
                "K-FAC §4.3, §13",
                claim,
                measured,
                *verdict(t_mid < d_mid, weak, "more steps to the target"),
            )
        )
    return rows


def _ratios(diag: pd.DataFrame) -> dict[str, float]:
    """Model-reduction ratio per approximation (its name before the ``[fisher]`` tag) at the
    last checkpoint: at step 0, λ₀ = 150 dominates the curvature and every direction scores like
    the gradient, which says nothing of the curvature approximations."""
    last = diag[(diag["step"] == diag["step"].max()) & (diag["metric"] == "model_ratio")]
    last = last[last["layer"] == "all"] if "layer" in last else last
    names = last["approximation"].astype(str).str.split("[").str[0]
    return {str(n): float(v) for n, v in zip(names, last["value"], strict=True)}


def _paired(per_cell: list[dict[str, float]], a: str, b: str) -> tuple[list[float], list[float]]:
    both = [r for r in per_cell if a in r and b in r]
    return [r[a] for r in both], [r[b] for r in both]


def curvature_quality(data: ReportData) -> list[Claim]:
    """Figs. 2–3 and §4.3 (K-FAC) and the SKFAC abstract ("capture the main curvature"), from
    ``kfacbench diagnose``: each approximation's step against the exact natural-gradient step,
    by its model-reduction ratio at the last checkpoint, over the diagnosed seeds of a setting."""
    diag = data.diagnostics
    if diag is None or diag.empty:
        return [
            Claim(
                "K-FAC Figs. 2–3; SKFAC abstract",
                "the approximations capture the curvature",
                "—",
                "not run",
                "no `kfacbench diagnose` run in this report",
            )
        ]
    rows = []
    settings = diag.assign(setting=settings_of(diag["label"].astype(str)))
    for setting, g in settings.groupby("setting", sort=True):
        per_cell = [_ratios(c) for _, c in g.groupby("cell_id")]
        where = f"{setting}, step {int(g['step'].max())}, {len(per_cell)} seeds"
        k, grad = _paired(per_cell, "kfac", "gradient")
        if k:
            weak = _too_few({"diagnosed": len(k)})
            if min(k) <= max(grad):
                weak.append("the seeds overlap: K-FAC's worst is not above the gradient's best")
            rows.append(
                Claim(
                    "K-FAC §3–4, Fig. 2",
                    "K-FAC's step captures the curvature: closer to the exact natural-gradient "
                    "step than the gradient",
                    f"{where}: model-reduction ratio K-FAC {_span(k, _two)}, gradient "
                    f"{_span(grad, _two)}",
                    *verdict(
                        float(np.median(k)) > float(np.median(grad)),
                        weak,
                        "the gradient's ratio is higher",
                    ),
                )
            )
        t, k2 = _paired(per_cell, "kfac-tridiag", "kfac")
        if t:
            weak = _too_few({"diagnosed": len(t)})
            if min(np.subtract(t, k2)) <= 0:
                weak.append("not on every seed")
            rows.append(
                Claim(
                    "K-FAC §4.3, Fig. 3",
                    "the block-tridiagonal inverse approximates the natural-gradient step better "
                    "than the block-diagonal one",
                    f"{where}: model-reduction ratio tridiagonal {_span(t, _two)}, "
                    f"block-diagonal {_span(k2, _two)}",
                    *verdict(
                        float(np.median(t)) > float(np.median(k2)),
                        weak,
                        "block-diagonal's ratio is higher",
                    ),
                )
            )
        names = sorted({n for r in per_cell for n in r if n.startswith("skfac")})
        for name in names:
            s, k3 = _paired(per_cell, name, "kfac")
            shares = list(np.divide(s, k3))
            weak = _too_few({"diagnosed": len(shares)})
            if min(shares) < COMPARABLE:
                weak.append(f"not on every seed (worst {min(shares):.2f})")
            rows.append(
                Claim(
                    "SKFAC abstract",
                    "SKFAC's low-rank factors capture the main curvature (comparable to K-FAC)",
                    f"{where}: {name} ratio {_span(s, _two)} = {_span(shares, _two)} × K-FAC's "
                    "(both at K-FAC's effective damping)",
                    *verdict(
                        float(np.median(shares)) >= COMPARABLE,
                        weak,
                        f"below {COMPARABLE:g} of K-FAC's",
                    ),
                )
            )
    return rows


def _two(value: float) -> str:
    return f"{value:.2f}"


# ---------------------------------------------------------------- SKFAC (Tang et al. 2021)
SKFAC_WORKLOAD = "fashion_mnist_resnet20"


def skfac_inverse_time(data: ReportData) -> list[Claim]:
    """Abstract: SKFAC's low-rank inversion makes the inverse much cheaper than K-FAC's."""
    cells, phases, rows = _ok(data.cells), data.phases, []
    claim = "SKFAC's inverse is much faster than K-FAC's"
    kfacs = ("kfac-fast", "kfac")
    for (workload, batch), g in cells.groupby(["workload", "batch_size"]):
        sk = g[g["optimizer"].astype(str).str.startswith("skfac")]
        kf = g[g["optimizer"].isin(kfacs)]
        if sk.empty or kf.empty:
            continue
        k_ms = _per_refresh(phases, kf)
        for optimizer, s in sk.groupby("optimizer"):
            s_ms = _per_refresh(phases, s)
            if not k_ms or not s_ms:
                continue  # no refresh timed (e.g. shorter than one inversion interval)
            ratio = float(np.median(k_ms) / np.median(s_ms))
            weak = _too_few({"K-FAC": len(k_ms), str(optimizer): len(s_ms)})
            if ratio < MUCH_SOONER:
                weak.append(f"{ratio:.1f}× is not much faster (< {MUCH_SOONER:g}×)")
            if min(k_ms) <= max(s_ms):
                weak.append("the seeds overlap")
            rows.append(
                Claim(
                    "SKFAC abstract",
                    claim,
                    f"{workload} bs {batch}, a refresh's inverse: {optimizer} "
                    f"{_span(s_ms, _ms)} vs K-FAC {_span(k_ms, _ms)} = {ratio:.1f}× faster",
                    *verdict(ratio > 1.0, weak, "K-FAC's inverse is faster"),
                )
            )
    if not rows:
        rows.append(Claim("SKFAC abstract", claim, "—", "not run", "no SKFAC and K-FAC cells"))
    return rows


def _ms(value: float) -> str:
    return f"{value:.1f} ms"


def _per_refresh(phases: pd.DataFrame, cells: pd.DataFrame) -> list[float]:
    """Per cell, the median ``inverse`` phase time: the phase runs only at refreshes, so its
    median is the time of one refresh."""
    inverse = phases[phases["phase"] == REFRESH_PHASE].set_index("cell_id")["median_ms"]
    return [float(v) for v in inverse.reindex(cells["cell_id"]).dropna()]


SKFAC_WORKLOAD = "fashion_mnist_resnet20"


def skfac_accuracy(data: ReportData) -> list[Claim]:
    """Abstract: SKFAC gives performance comparable to K-FAC and bridges the wall-clock gap
    between first- and second-order methods (accuracy after equal training time, over seeds)."""
    cells = data.cells[data.cells["workload"] == SKFAC_WORKLOAD]
    ok = _ok(cells)
    stats = {
        str(o): g["final_eval_metric"].astype(float).to_numpy() for o, g in ok.groupby("optimizer")
    }
    kfac = next((stats[k] for k in ("kfac-fast", "kfac") if k in stats), None)
    skfacs = {k: v for k, v in stats.items() if k.startswith("skfac")}
    sgd = stats.get("sgd")
    comparable = "SKFAC's accuracy at equal wall-clock is comparable to K-FAC's"
    if kfac is None or not skfacs:
        return [
            Claim(
                "SKFAC abstract",
                comparable,
                "—",
                "not run",
                _missing(data.cells, SKFAC_WORKLOAD, "SKFAC/K-FAC"),
            )
        ]
    budget = float(ok["train_time_s"].median())
    margin = 100 * ACCURACY_MARGIN
    rows = []
    for name, values in skfacs.items():
        gap = float(values.mean() - kfac.mean())
        two_se = 2 * math.sqrt(_sem2(values) + _sem2(kfac))
        weak = _too_few({name: len(values), "K-FAC": len(kfac)})
        if gap - two_se < -ACCURACY_MARGIN:
            weak.append(
                f"the difference's lower 2-SE bound {100 * (gap - two_se):+.2f} pp is below "
                f"-{margin:g} pp"
            )
        rows.append(
            Claim(
                "SKFAC abstract",
                comparable,
                f"ResNet-20 / Fashion-MNIST, {seconds(budget)} each: {name} {_mean_sd(values)} "
                f"vs K-FAC {_mean_sd(kfac)}: {100 * gap:+.2f} ± {100 * two_se:.2f} pp (2 SE)",
                *verdict(gap >= -ACCURACY_MARGIN, weak, f"more than {margin:g} pp below K-FAC"),
            )
        )
        if sgd is not None:
            ahead = float(values.mean() - sgd.mean())
            two_se = 2 * math.sqrt(_sem2(values) + _sem2(sgd))
            weak = _too_few({name: len(values), "SGD": len(sgd)})
            if ahead - two_se <= 0:
                weak.append("the difference is within 2 standard errors")
            rows.append(
                Claim(
                    "SKFAC abstract",
                    "SKFAC bridges the wall-clock gap to first-order methods",
                    f"{name} {_mean_sd(values)} vs SGD {_mean_sd(sgd)} after {seconds(budget)}: "
                    f"{100 * ahead:+.2f} ± {100 * two_se:.2f} pp (2 SE)",
                    *verdict(ahead > 0, weak, "SGD's mean accuracy is higher"),
                )
            )
    return rows


def _sem2(values: np.ndarray) -> float:
    """The squared standard error of the mean (0 for a single seed: no spread is known)."""
    return float(values.var(ddof=1)) / len(values) if len(values) > 1 else 0.0


def _mean_sd(values: np.ndarray) -> str:
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    spread = f" ± {100 * sd:.2f}" if math.isfinite(sd) else ""
    return f"{100 * values.mean():.2f}{spread} % (n={len(values)}, ± sd)"


CHECKS: tuple[Callable[[ReportData], list[Claim]], ...] = (
    kfac_vs_sgd,
    kfac_step_cost,
    tridiag_vs_blockdiag,
    curvature_quality,
    skfac_inverse_time,
    skfac_accuracy,
)
"""The claims checked, in the table's order."""
