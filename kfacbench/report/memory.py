"""The report's memory table: per workload, batch size and setting, the optimizer state (and its
curvature part), the peak device memory over the baseline (CUDA), each against the baseline
optimizer's at the same suite, workload and batch size, and the cells that ran out of memory
with the allocation that did not fit (docs/measurement.md, "Memory")."""

from __future__ import annotations

import math

import pandas as pd

from kfacbench.report.data import BASELINE
from kfacbench.report.tables import baseline_name

MEMORY_NOTE = (
    "Optimizer state after training (MiB), counted from the method's tensors on any device, and"
    " its curvature part (factors and inverses); the peak device memory over the data, model"
    " and built method (MiB, CUDA only); each as a multiple of the {name} cells of the same"
    " suite, workload and batch size; medians over seeds. A cell that ran out of memory is"
    " named with the allocation that failed."
)


def mebibytes(mib: float) -> str:
    """A size for a reader: MiB below a GiB, else GiB (TiB beyond), three significant digits
    (as torch's messages: "1.50 GiB"), no exponent."""
    unit, value = next(
        ((u, mib / scale) for u, scale in (("TiB", 2**20), ("GiB", 2**10)) if mib >= scale),
        ("MiB", mib),
    )
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f} {unit}"


def _oom_text(g: pd.DataFrame) -> str:
    """What ran out of memory in a setting: the requests that failed, over how many seeds."""
    oom = g[g["status"] == "oom"]
    if oom.empty:
        return ""
    asked = sorted({float(v) for v in oom["oom_request_mb"] if math.isfinite(float(v))})
    sizes = ", ".join(mebibytes(v) for v in asked)
    request = f": tried to allocate {sizes}" if sizes else ""
    return f"out of memory{request} ({len(oom)} of {len(g)} seeds)"


def _median(values: pd.Series) -> float:
    finite = values.astype(float).dropna()
    return float(finite.median()) if len(finite) else math.nan


def memory_table(cells: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per suite, workload, batch size and setting (cells from before the memory
    columns existed have none of them: an empty table).

    Columns: ``workload``, ``batch_size``, ``setting``, ``seeds``, ``state_mib``,
    ``curvature_mib``, ``state_vs_<baseline>``, ``peak_over_baseline_mib``,
    ``peak_vs_<baseline>`` (medians over the seeds that trained; the ratios divide by the median
    of the baseline optimizer's cells of the same suite, workload and batch size, NaN without
    one) and ``out_of_memory`` (:func:`_oom_text`)."""
    if "state_mb" not in cells or cells.empty:
        return pd.DataFrame()
    keys = ["suite", "workload", "batch_size"]
    rows = []
    for (suite, workload, batch, setting), g in cells.groupby([*keys, "setting"], sort=True):
        rows.append(
            {
                "suite": suite,
                "workload": workload,
                "batch_size": batch,
                "setting": setting,
                "optimizer": str(g["optimizer"].iloc[0]),
                "seeds": int(g["seed"].nunique()),
                "state_mib": _median(g["state_mb"]),
                "curvature_mib": _median(g["curvature_state_mb"]),
                "peak_over_baseline_mib": _median(g["peak_mem_over_baseline_mb"]),
                "out_of_memory": _oom_text(g),
            }
        )
    table = pd.DataFrame(rows)
    base = cells[cells["optimizer"] == baseline].groupby(keys)
    refs = pd.DataFrame(
        {
            "ref_state": base["state_mb"].median(),
            "ref_peak": base["peak_mem_over_baseline_mb"].median(),
        }
    )
    table = table.join(refs, on=keys)
    table[f"state_vs_{baseline}"] = table["state_mib"] / table["ref_state"]
    table[f"peak_vs_{baseline}"] = table["peak_over_baseline_mib"] / table["ref_peak"]
    first = (table["optimizer"] != baseline).astype(int)
    table = table.assign(_first=first).sort_values([*keys, "_first", "setting"])
    return table.reset_index(drop=True)[
        [
            "workload",
            "batch_size",
            "setting",
            "seeds",
            "state_mib",
            "curvature_mib",
            f"state_vs_{baseline}",
            "peak_over_baseline_mib",
            f"peak_vs_{baseline}",
            "out_of_memory",
        ]
    ]


def memory_display(table: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """The memory table as the documents show it: the columns named for a reader, the ratios
    as ``2.5×``, ``-`` where there is no number."""
    name = baseline_name(baseline)

    def ratio(values: pd.Series) -> list[str]:
        return [f"{v:.3g}×" if math.isfinite(v) else "-" for v in values.astype(float)]

    return pd.DataFrame(
        {
            "workload": table["workload"],
            "batch": table["batch_size"],
            "setting": table["setting"],
            "seeds": table["seeds"],
            "state MiB": table["state_mib"],
            "curvature MiB": table["curvature_mib"],
            f"state vs {name}": ratio(table[f"state_vs_{baseline}"]),
            "peak over baseline MiB": table["peak_over_baseline_mib"],
            f"peak vs {name}": ratio(table[f"peak_vs_{baseline}"]),
            "out of memory": table["out_of_memory"],
        }
    )
