"""Measured step cost against the FLOP model: is K-FAC as fast as its arithmetic?

For every SGD and kfac-fast cell of a run on a workload of Linear and Conv2d layers, the model of
:mod:`kfacbench.optim.flops` gives the FLOPs of a step by phase and of a refresh; the run gives
the time of each phase. The table holds the two ratios side by side: the measured amortized step
cost of kfac-fast over the SGD cell of the same suite, workload, batch size, compile mode and
seed, and the model's ratio of their amortized FLOPs. A measured ratio close to the model's means
K-FAC's extra work runs at the speed SGD's does; the achieved GFLOP/s per phase says which phase
falls behind (on a GPU, typically the factorisations and the launches of small kernels).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch

from kfacbench.optim.flops import (
    LayerShape,
    StepFlops,
    kfac_flops,
    layer_shapes,
    refreshes,
    sgd_flops,
)
from kfacbench.optim.inverses import bucket_ratio, plan_buckets
from kfacbench.runs.rundir import amortized_step_ms
from kfacbench.workloads import WORKLOADS

MODELLED = ("sgd", "kfac-fast")
"""Optimizers the FLOP model covers (K-FAC with re-scaling adds JVPs it does not count)."""
PAIRED = ("workload", "batch_size", "compile", "seed")
"""What a kfac-fast cell shares with the SGD cell it is divided by."""


def _inverse_methods(row: Mapping[str, Any], sizes: list[int], device: str) -> list[str]:
    """The method of each size bucket: as the cell recorded it, else its ``inverse_method``."""
    info = json.loads(row["method_info"] or "{}")
    buckets = info.get("inverse_buckets")
    if buckets:
        return [b["method"] for b in buckets]
    method = json.loads(row["hparams"] or "{}").get("inverse_method", "eigh")
    return [method] * len(plan_buckets(sizes, bucket_ratio(torch.device(device))))


@functools.cache
def model_shapes(workload: str) -> tuple[list[LayerShape], int]:
    """The preconditioned layers and the parameter count of a registered workload's model, built
    once per report (a width family's largest model takes seconds to initialise)."""
    entry = WORKLOADS[workload]
    model = entry.build_model(torch.Generator().manual_seed(0))
    return layer_shapes(model, entry.input_shape), sum(p.numel() for p in model.parameters())


def cell_flops(row: Mapping[str, Any]) -> StepFlops | None:
    """The FLOP model of one cell (``None``: an optimizer or workload the model does not cover)."""
    if row["optimizer"] not in MODELLED or row["workload"] not in WORKLOADS:
        return None
    shapes, params = model_shapes(row["workload"])
    batch = int(row["batch_size"])
    if row["optimizer"] == "sgd":
        return sgd_flops(shapes, batch, params)
    hparams = json.loads(row["hparams"] or "{}")
    device = "cuda" if row["device_kind"] == "cuda" else "cpu"
    sizes = [d for s in shapes for d in (s.d_in, s.d_out)]
    return kfac_flops(
        shapes,
        batch,
        params,
        inverse_methods=_inverse_methods(row, sizes, device),
        device=device,
        weight_sharing=hparams.get("weight_sharing", "expand"),
        cov_fraction=float(hparams.get("cov_fraction", 1.0)),
    )


def _phase_rate(flops: float, calls: float, seconds: float) -> float:
    """Achieved GFLOP/s of a phase over its calls (NaN without time)."""
    return flops * calls / seconds / 1e9 if seconds > 0 and calls > 0 else math.nan


def arithmetic_table(cells: pd.DataFrame, phases: pd.DataFrame) -> pd.DataFrame:
    """One row per modelled cell: amortized ms and GFLOP per step, the measured and the model's
    ratio to the paired SGD cell, and the achieved GFLOP/s of forward + backward, curvature,
    precondition and the refresh. Raises ``KeyError`` naming a missing column."""
    ok = cells.loc[(cells["status"] == "ok") & cells["optimizer"].isin(MODELLED)].copy()
    ok["amortized_ms"] = amortized_step_ms(ok)
    rows: list[dict[str, Any]] = []
    totals = phases.set_index(["cell_id", "phase"])[["calls", "total_s"]]
    records: list[dict[str, Any]] = ok.to_dict("records")  # type: ignore[assignment]
    for row in records:
        model = cell_flops(row)
        if model is None:
            continue
        steps = int(row["steps"])
        inv = int(row["inv_interval"]) if row["optimizer"] != "sgd" else 0
        n_refresh = refreshes(steps, inv) if inv else 0
        gflop = model.amortized(n_refresh, steps) / 1e9

        def rate(names: tuple[str, ...], flops: float, cell: str = row["cell_id"]) -> float:
            present = [n for n in names if (cell, n) in totals.index]
            if not present:
                return math.nan
            part = totals.loc[[(cell, n) for n in present]]
            return _phase_rate(flops, float(part["calls"].iloc[0]), float(part["total_s"].sum()))

        rows.append(
            {
                **{k: row[k] for k in ("cell_id", *PAIRED, "optimizer", "inv_interval", "steps")},
                "refreshes": n_refresh,
                "amortized_ms": row["amortized_ms"],
                "model_gflop": gflop,
                "gflops_fwd_bwd": rate(("forward", "backward"), model.forward + model.backward),
                "gflops_curvature": rate(("curvature",), model.curvature),
                "gflops_precondition": rate(("precondition",), model.precondition),
                "gflops_inverse": rate(("inverse",), model.inverse),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    sgd = table.loc[table["optimizer"] == "sgd"].set_index(list(PAIRED))
    keys = pd.MultiIndex.from_frame(table[list(PAIRED)])
    table["measured_ratio"] = (
        table["amortized_ms"].to_numpy() / sgd["amortized_ms"].reindex(keys).to_numpy()
    )
    table["model_ratio"] = (
        table["model_gflop"].to_numpy() / sgd["model_gflop"].reindex(keys).to_numpy()
    )
    table["over_model"] = table["measured_ratio"] / table["model_ratio"]
    return table
