"""The report's tables, each a pure function of :class:`~kfacbench.report.data.ReportData`:
time to target with the speed-up over the best setting of the baseline optimizer (SGD unless the
report names another), step cost (amortized first, against the baseline of the same suite,
batch size and compile mode), kfacbench against its peers on identical settings, the phases,
and the performance profile's curve."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kfacbench.core.timing import STEP
from kfacbench.machine_load import busy_cells, warning_line
from kfacbench.optim.peers import COUNTERPARTS
from kfacbench.report.data import BASELINE, ReportData
from kfacbench.report.format import seconds
from kfacbench.runs.rundir import amortized_step_ms
from kfacbench.runs.store import settings_of

TIMING_ONLY = "timing-only run"

_NAMES = {"sgd": "SGD", "adamw": "AdamW"}


def baseline_name(optimizer: str) -> str:
    """How the documents name a baseline optimizer (``SGD``, ``AdamW``, else its own name)."""
    return _NAMES.get(optimizer, optimizer)


def not_races(cells: pd.DataFrame) -> dict[str, str]:
    """The workloads whose cells are no race to a target, each with the reason: synthetic data
    (a loss on random labels has no meaningful target), or no setting reached the target (a
    table of "not reached" ranks nothing). The time-to-target table and figure leave them out;
    their headline is the step cost and the phases."""
    reasons = {}
    for workload, g in cells.groupby("workload"):
        mode = g["data_mode"].astype(str) if "data_mode" in g else pd.Series("real", index=g.index)
        reached = (g["status"] == "ok") & g["time_to_target_s"].astype(float).notna()
        if (mode == "synthetic").all():
            reasons[str(workload)] = f"{TIMING_ONLY} (synthetic data)"
        elif not reached.any():
            reasons[str(workload)] = f"{TIMING_ONLY} (no setting reached the target)"
    return reasons


def errored_workloads(cells: pd.DataFrame) -> set[str]:
    """Workloads with a cell that ended in an error (a crash or missing data, not a
    divergence): a comparison across workloads that counts them compares missing results."""
    return {str(w) for w in cells.loc[cells["status"] == "error", "workload"]}


def time_to_target_table(cells: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Every setting of every workload: whether it reached the target, when, and its speed-up
    over the workload's best setting of the ``baseline`` optimizer (below: SGD), or the bound the
    run does show.

    Columns, besides ``workload``, ``optimizer``, ``setting``, ``seeds``, ``reached_seeds``,
    ``failed_seeds``, ``amortized_ms`` (training time / steps, refreshes included) and
    ``median_step_ms`` (medians over the ok seeds):

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
    - ``speedup_vs_baseline``: the best SGD setting's time to target over this one's, NaN
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
                "amortized_ms": (
                    float(amortized_step_ms(g[ok]).median()) if ok.any() else math.nan
                ),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    speedups = [speedup(row, table, baseline) for row in table.itertuples(index=False)]
    table["speedup_vs_baseline"] = [s.exact for s in speedups]
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
            "speedup_vs_baseline",
            "speedup",
            "amortized_ms",
            "median_step_ms",
        ]
    ]


@dataclass(frozen=True)
class Speedup:
    """A setting's speed-up over the best baseline setting of its workload."""

    exact: float
    """The ratio when both reached the target, else NaN."""
    text: str
    """For the tables: the ratio, or the bound the run shows and why, in words."""
    short: str
    """For the figure's note beside a bar ("" where the bar's own note says it all)."""


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan


def speedup(row: Any, table: pd.DataFrame, baseline: str = BASELINE) -> Speedup:
    """One setting's speed-up over the best setting of the ``baseline`` optimizer on its workload
    (below: SGD): the exact ratio when both reached the target, else the bound the run shows,
    said in words."""
    name = baseline_name(baseline)
    sgd = table[(table["workload"] == row.workload) & (table["optimizer"] == baseline)]
    if sgd.empty:
        return Speedup(math.nan, f"no {name} run on this workload", "")
    best = float(sgd["time_to_target_s"].min())  # NaN when no SGD setting reached it
    mine = float(row.time_to_target_s)
    if row.outcome not in ("reached", "not reached"):
        return Speedup(math.nan, f"none ({row.outcome})", "")
    if math.isfinite(mine) and math.isfinite(best):
        ratio = best / mine
        if ratio == 1.0 and row.optimizer == baseline:
            return Speedup(ratio, f"1.00× (best {name})", f"best {name}")
        return Speedup(ratio, f"{ratio:.2f}×", f"{ratio:.2f}× best {name}")
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
            f"unbounded: {name} did not reach the target ({failures})",
            f"{name}: {failures}",
        )
    budgets = sgd.loc[sgd["outcome"] == "not reached", "train_time_s"]
    low, high = float(budgets.min()), float(budgets.max())
    same = math.isclose(low, high, rel_tol=0.05)
    spent = seconds(low) if same else f"{seconds(low)} to {seconds(high)}"
    ratio = sgd_bound / mine
    return Speedup(
        math.nan,
        f"> {ratio:.2f}× ({name} did not reach the target in "
        f"{'its budget' if same else 'its budgets'}, {spent})",
        f"> {ratio:.2f}× {name} ({name}: not reached in {spent})",
    )


def time_to_target_text(row: Any) -> str:
    """A setting's time to target for a reader: the time, or what happened instead."""
    if row.outcome == "reached":
        lo = getattr(row, "time_to_target_lo_s", math.nan)
        return seconds(row.time_to_target_s) + (
            f" (not yet at {seconds(lo)})" if math.isfinite(lo) else ""
        )
    if row.outcome != "not reached":
        if row.failed_seeds < row.seeds:
            return f"{row.outcome} ({row.failed_seeds} of {row.seeds} seeds)"
        after = f" after {seconds(row.train_time_s)}" if math.isfinite(row.train_time_s) else ""
        return f"{row.outcome}{after}"
    missed = row.seeds - row.reached_seeds
    seeds = f" by {missed} of {row.seeds} seeds" if row.reached_seeds else ""
    return f"not reached{seeds} in {seconds(row.train_time_s)}"


def best_baseline(table: pd.DataFrame, baseline: str = BASELINE) -> dict[str, str]:
    """Per workload, the baseline setting every speed-up divides by: the one with the shortest
    time to target, or, when none reached it, the one whose training time bounds the baseline's
    time to target from below (the shortest lower bound: a failed setting's is infinite)."""
    best = {}
    for workload, sgd in table[table["optimizer"] == baseline].groupby("workload"):
        reached = sgd.dropna(subset=["time_to_target_s"])
        if not reached.empty:
            pick = reached.sort_values("time_to_target_s")
        else:
            pick = sgd.sort_values("ttt_lower_bound_s")  # the bound the speed-up is stated by
        best[str(workload)] = str(pick["setting"].iloc[0])
    return best


def time_to_target_display(table: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """The time-to-target table as the documents show it: every value in words or numbers,
    none as ``nan``, each speed-up beside the baseline setting it divides by."""
    if table.empty:
        return table
    vs = best_baseline(table, baseline)
    name = baseline_name(baseline)
    return pd.DataFrame(
        {
            "workload": table["workload"],
            "optimizer": table["optimizer"],
            "setting": table["setting"],
            "seeds": table["seeds"],
            "time to target": [time_to_target_text(r) for r in table.itertuples(index=False)],
            f"speed-up vs best {name}": table["speedup"],
            f"best {name}": [vs.get(str(w), "-") for w in table["workload"]],
            "ms/step (amortized)": [
                f"{v:.4g}" if math.isfinite(v) else "-" for v in table["amortized_ms"]
            ],
            "median step (ms)": [
                f"{v:.4g}" if math.isfinite(v) else "-" for v in table["median_step_ms"]
            ],
        }
    )


def phase_table(data: ReportData) -> pd.DataFrame:
    """Amortised ms per step of each phase per setting (median over seeds)."""
    phases = data.phases[data.phases["phase"] != STEP].merge(
        data.cells[["cell_id", "workload", "optimizer", "setting", "steps"]], on="cell_id"
    )
    phases["ms_per_step"] = phases["total_s"] * 1e3 / phases["steps"].clip(lower=1)
    medians = phases.groupby(["workload", "optimizer", "setting", "phase"])["ms_per_step"].median()
    return medians.reset_index().sort_values(["workload", "optimizer", "setting"])


PHASE_ORDER = ("forward", "backward", "curvature", "inverse", "precondition", "rescale", "update")


TAU_MAX = 4.0
"""Largest ratio to the best time-to-target shown by the performance profile (AlgoPerf's r_max)."""


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


def step_time_table(data: ReportData) -> pd.DataFrame:
    """Step cost per setting against the baseline (``data.baseline``, SGD unless the report
    names another) of the same suite, batch size and compile mode.

    Amortized first (training time / steps, refreshes included), the median step beside it,
    medians over the seeds of the setting. The denominator is the baseline setting of the same
    suite, workload, batch size and compile mode with the lowest amortized step, named in
    ``vs``: a compiled SGD or another suite's never divides an eager cell. The ratio columns
    are ``vs_<baseline>`` and ``vs_<baseline>_median``.
    """
    baseline = data.baseline
    ok = data.cells[data.cells["status"] == "ok"].copy()
    ok["compile"] = ok["compile"].fillna("off") if "compile" in ok else "off"
    ok["cuda_graph"] = ok["cuda_graph"].fillna(False).astype(bool) if "cuda_graph" in ok else False
    ok["amortized_ms"] = amortized_step_ms(ok)
    keys = ["suite", "workload", "batch_size", "compile", "cuda_graph"]
    table = ok.groupby([*keys, "optimizer", "setting"], as_index=False).agg(
        seeds=("seed", "nunique"),
        amortized_ms=("amortized_ms", "median"),
        median_step_ms=("median_step_ms", "median"),
    )
    sgd = table[table["optimizer"] == baseline].sort_values("amortized_ms")
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
                f"vs_{baseline}": rec["amortized_ms"] / ref["amortized_ms"]
                if ref is not None
                else math.nan,
                "median_step_ms": rec["median_step_ms"],
                f"vs_{baseline}_median": (
                    rec["median_step_ms"] / ref["median_step_ms"] if ref is not None else math.nan
                ),
                "vs": ref["setting"]
                if ref is not None
                else f"no {baseline_name(baseline)} cell of this suite",
            }
        )
    return pd.DataFrame(rows)


def final_metric_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Where each setting of a real-data workload ended: the final eval metric (median over
    seeds, their range), the final training loss, its training time and steps, best first.

    The headline of an equal-time comparison (no target, every cell given the same training
    time) and the end point of a race; synthetic-data workloads have no metric and are left out.
    Cells that diverged or failed are counted in ``not ok``, not in the medians.
    """
    mode = cells["data_mode"].astype(str) if "data_mode" in cells else "real"
    real = cells.loc[mode != "synthetic"]
    rows = []
    for (workload, setting), g in real.groupby(["workload", "setting"], sort=False):
        ok = g.loc[g["status"] == "ok"]
        values = ok["final_eval_metric"].astype(float).dropna()
        rows.append(
            {
                "workload": workload,
                "setting": setting,
                "seeds": int(g["seed"].nunique()),
                "not ok": int((g["status"] != "ok").sum()),
                "train_s": float(ok["train_time_s"].median()) if len(ok) else math.nan,
                "steps": float(ok["steps"].median()) if len(ok) else math.nan,
                "metric": str(g["metric"].iloc[0]),
                "final": float(values.median()) if len(values) else math.nan,
                "range": f"{values.min():.4g}–{values.max():.4g}" if len(values) > 1 else "",
                "final_train_loss": float(ok["final_train_loss"].median()) if len(ok) else math.nan,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    # Accuracy: higher first; errors, losses, bits per byte: lower first.
    sign = np.where(table["metric"] == "accuracy", -1.0, 1.0)
    table["_key"] = sign * table["final"].to_numpy()
    table = table.sort_values(["workload", "_key"], kind="stable", na_position="last")
    return table.drop(columns="_key").reset_index(drop=True)


PAIR_KEYS = (
    "suite", "workload", "batch_size", "inv_interval", "data_mode", "device_name", "tf32", "amp",
)  # fmt: skip
"""What a kfacbench preset and a peer cell must share to be compared: one suite, every axis of
the setting; the seeds of a setting are its replicates. Compiled cells are never paired (the
peers run eager)."""


def graph_table(data: ReportData) -> pd.DataFrame:
    """Whole-step CUDA graphs against eager steps (the ``cuda_graph`` setting), per setting run
    both ways in the same suite, workload, batch size and compile mode: the amortized step
    (training time / steps, refreshes and eager warm-up steps included) and the median step
    (a replayed one, where most steps are), each eager / graphed, medians over seeds. Only cells
    that replayed steps count as graphed (on a CPU the setting runs eagerly). Empty without
    such pairs."""
    if "cuda_graph" not in data.cells:
        return pd.DataFrame()
    ok = data.cells[data.cells["status"] == "ok"].copy()
    ok["graphed"] = ok["cuda_graph"].fillna(False).astype(bool)
    ok = ok[~ok["graphed"] | (ok["graphed_steps"].fillna(0) > 0)]
    ok["compile"] = ok["compile"].fillna("off") if "compile" in ok else "off"
    ok["amortized_ms"] = amortized_step_ms(ok)
    ok["base_setting"] = ok["setting"].str.replace(r" cuda_graph(?= \[|$)", "", regex=True)
    keys = ["suite", "workload", "batch_size", "compile", "optimizer", "base_setting"]
    per = ok.groupby([*keys, "graphed"], as_index=False).agg(
        seeds=("seed", "nunique"),
        amortized_ms=("amortized_ms", "median"),
        median_step_ms=("median_step_ms", "median"),
    )
    share = ok[ok["graphed"]].assign(share=lambda f: f["graphed_steps"] / f["steps"])
    shares = share.groupby(keys)["share"].median()
    eager = per[~per["graphed"]].set_index(keys)
    graphed = per[per["graphed"]].set_index(keys)
    both = eager.index.intersection(graphed.index)
    rows = []
    for key in both:
        e, g = eager.loc[key], graphed.loc[key]
        rows.append(
            {
                "workload": key[1],
                "optimizer": key[4],
                "setting": key[5],
                "seeds": int(min(e["seeds"], g["seeds"])),
                "eager_ms": e["amortized_ms"],
                "graphed_ms": g["amortized_ms"],
                "speedup": e["amortized_ms"] / g["amortized_ms"],
                "eager_median_ms": e["median_step_ms"],
                "graphed_median_ms": g["median_step_ms"],
                "speedup_median": e["median_step_ms"] / g["median_step_ms"],
                "graphed_share": shares.get(key, math.nan),
            }
        )
    return pd.DataFrame(rows)


def peer_table(data: ReportData) -> pd.DataFrame:
    """kfacbench's presets against the peers that implement the same method, paired on identical
    settings (:data:`PAIR_KEYS`, and equal values of every hyperparameter both name): the
    amortized step (training time / steps, refreshes included) first, the median step beside
    it, each as ``ours / peer`` with its ratio, medians over the seeds of each setting. Every
    row names the two settings it divides. Empty without such pairs."""
    ok = data.cells[data.cells["status"] == "ok"].copy()
    if "compile" in ok:
        ok = ok[ok["compile"].fillna("off") == "off"]
    if "cuda_graph" in ok:
        ok = ok[~ok["cuda_graph"].fillna(False).astype(bool)]
    ok["amortized_ms"] = amortized_step_ms(ok)
    ok["setting_label"] = settings_of(ok["label"].astype(str))
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


def busy_warnings(cells: pd.DataFrame) -> list[str]:
    """The busy-machine warning and the cells it concerns (their times are not comparable:
    every figure and table built on them may be off by the other processes' share)."""
    line = warning_line(cells)
    if line is None:
        return []
    labels = ", ".join(str(label) for label in busy_cells(cells)["label"])
    return [f"{line}. Busy cells: {labels}"]
