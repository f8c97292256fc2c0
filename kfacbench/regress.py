"""Speed-regression checks against a committed baseline (``kfacbench regress``).

Absolute step times do not survive a change of machine, nor the load of a shared CI runner, so
the regression record is *normalised*: every phase's median time of every cell divided by the
median SGD step of the same workload and batch size measured in the same run (DeepOBS' overhead
ratio, applied per phase). A K-FAC inverse that gets 20% slower moves its ratio by 20% whatever
the machine's speed that minute; a machine that is 20% slower for everything moves nothing.

Baselines are parquet files keyed by machine kind (``cpu``, ``cuda-nvidia-h100-80gb-hbm3``, ...,
from the run's ``env.json``), so a CPU baseline is never compared with a GPU run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from kfacbench.core.timing import STEP
from kfacbench.errors import KfacbenchError
from kfacbench.store import atomic_write_parquet, load_tables, settings_of

KEYS = ["workload", "batch_size", "setting", "phase"]
"""What identifies one line of the regression record."""


def machine_kind(run_dir: Path) -> str:
    """``cpu``, or ``cuda-<gpu model>`` (lower case, dashes) from the run's ``env.json``."""
    try:
        env = json.loads((run_dir / "env.json").read_text())
    except (OSError, ValueError) as exc:
        raise KfacbenchError(f"cannot read {run_dir / 'env.json'}: {exc}") from None
    if env.get("device_kind") != "cuda":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", str(env.get("device_name", "gpu")).lower()).strip(
        "-"
    )


def normalised_phases(run_dir: Path) -> pd.DataFrame:
    """Per setting and phase (the whole ``step`` included): the median ms and its ratio to the
    SGD step of the same workload and batch size in the same run.

    Raises:
        KfacbenchError: a workload and batch size without an SGD cell to normalise by.
    """
    tables = load_tables(run_dir)
    cells = tables["cells"][tables["cells"]["status"] == "ok"].copy()
    cells["setting"] = settings_of(cells["label"])
    phases = tables["phases"].merge(
        cells[["cell_id", "workload", "batch_size", "optimizer", "setting"]], on="cell_id"
    )
    sgd = phases[(phases["optimizer"] == "sgd") & (phases["phase"] == STEP)]
    sgd_step = sgd.groupby(["workload", "batch_size"])["median_ms"].median().rename("sgd_step_ms")
    merged = phases.merge(sgd_step.reset_index(), on=["workload", "batch_size"], how="left")
    missing = merged[merged["sgd_step_ms"].isna()][["workload", "batch_size"]].drop_duplicates()
    if not missing.empty:
        pairs = ", ".join(f"{w} bs={b}" for w, b in missing.itertuples(index=False))
        raise KfacbenchError(
            f"{run_dir}: no SGD cell to normalise by for {pairs}; a regression suite needs one"
            " SGD cell per workload and batch size"
        )
    merged["ratio"] = merged["median_ms"] / merged["sgd_step_ms"]
    record = merged.groupby([*KEYS, "optimizer"], as_index=False)[
        ["median_ms", "sgd_step_ms", "ratio"]
    ].median()
    return record.sort_values(KEYS, ignore_index=True)


def write_baseline(record: pd.DataFrame, path: Path) -> None:
    """Store a regression record as the baseline (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(path, record)


def check(record: pd.DataFrame, baseline: pd.DataFrame, fail_above: float) -> pd.DataFrame:
    """Join the current record with the baseline and flag ratios above ``1 + fail_above`` times
    the baseline's. Lines missing on either side are kept with a NaN change, never flagged."""
    joined = baseline[[*KEYS, "ratio"]].merge(
        record[[*KEYS, "optimizer", "ratio"]],
        on=KEYS,
        how="outer",
        suffixes=("_base", "_new"),
    )
    joined["change"] = joined["ratio_new"] / joined["ratio_base"]
    joined["regressed"] = joined["change"] > 1 + fail_above
    return joined.sort_values("change", ascending=False, ignore_index=True)
