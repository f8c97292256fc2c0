"""`kfacbench regress`: normalised phase ratios, baselines by machine kind, caught slowdowns."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from kfacbench import cli
from kfacbench.errors import KfacbenchError
from kfacbench.optim.skfac import SKFAC
from kfacbench.regress import check, machine_kind, normalised_phases

SUITE = """
name = "rg"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 30
eval_every = 30
log_every = 10
train_eval_size = 200
[sweep]
workload = ["curves_ae"]
batch_size = [128]
inv_interval = [5]
[optimizers.sgd]
lr = 0.01
[optimizers.skfac]
lr = 0.01
damping = 1.0
"""


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("regress") / "rg.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def baseline_run(suite: Path) -> Path:
    out = suite.parent / "runs"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    (run_dir,) = (out / "rg").iterdir()
    return run_dir


def test_ratios_are_normalised_by_the_sgd_step_of_the_same_run(baseline_run: Path) -> None:
    record = normalised_phases(baseline_run)
    sgd_step = record[(record["optimizer"] == "sgd") & (record["phase"] == "step")]
    assert sgd_step["ratio"].tolist() == [1.0]
    skfac = record[record["optimizer"] == "skfac"].set_index("phase")
    assert {"forward", "backward", "curvature", "inverse", "precondition", "update", "step"} <= set(
        skfac.index
    )
    assert skfac.loc["step", "ratio"] == pytest.approx(
        skfac.loc["step", "median_ms"] / sgd_step["median_ms"].iloc[0]
    )
    assert machine_kind(baseline_run) == "cpu"


def test_a_uniformly_slower_machine_is_not_a_regression(baseline_run: Path) -> None:
    record = normalised_phases(baseline_run)
    slower = record.assign(
        median_ms=record["median_ms"] * 1.3, sgd_step_ms=record["sgd_step_ms"] * 1.3
    )
    slower["ratio"] = slower["median_ms"] / slower["sgd_step_ms"]
    assert not check(slower, record, 0.10)["regressed"].any()


def test_a_planted_phase_slowdown_is_caught(baseline_run: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.parquet"
    assert (
        cli.main(
            ["regress", "--run", str(baseline_run), "--baseline", str(base), "--update-baseline"]
        )
        == 0
    )
    assert cli.main(["regress", "--run", str(baseline_run), "--baseline", str(base)]) == 0
    slow = shutil.copytree(baseline_run, tmp_path / "slow")
    phases = pd.read_parquet(slow / "phases.parquet")
    cells = pd.read_parquet(slow / "cells.parquet")
    skfac_id = cells.loc[cells["optimizer"] == "skfac", "cell_id"].iloc[0]
    hit = (phases["cell_id"] == skfac_id) & (phases["phase"] == "inverse")
    phases.loc[hit, "median_ms"] *= 2.0
    phases.to_parquet(slow / "phases.parquet")
    result = check(normalised_phases(slow), pd.read_parquet(base), 0.25)
    bad = result[result["regressed"]]
    assert list(zip(bad["optimizer"], bad["phase"], strict=True)) == [("skfac", "inverse")]
    assert cli.main(["regress", "--run", str(slow), "--baseline", str(base)]) == 1


def test_an_injected_delay_fails_the_check(
    suite: Path, baseline_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real slowdown in the code (a 20 ms sleep in SKFAC's preconditioning) is caught by a
    fresh run of the suite against the baseline of the unchanged code."""
    base = tmp_path / "base.parquet"
    assert (
        cli.main(
            ["regress", "--run", str(baseline_run), "--baseline", str(base), "--update-baseline"]
        )
        == 0
    )
    real = SKFAC._precondition

    def slowed(self: SKFAC) -> list:  # type: ignore[type-arg]
        time.sleep(0.02)
        return real(self)

    monkeypatch.setattr(SKFAC, "_precondition", slowed)
    code = cli.main(["regress", str(suite), "--baseline", str(base), "--out", str(tmp_path / "o")])
    assert code == 1
    (run_dir,) = (tmp_path / "o" / "rg").iterdir()
    result = check(normalised_phases(run_dir), pd.read_parquet(base), 0.25).set_index(
        ["optimizer", "phase"]
    )
    assert result.loc[("skfac", "precondition"), "change"] > 3  # the sleep, not noise


def test_missing_baseline_and_missing_sgd_are_clear_errors(
    baseline_run: Path, tmp_path: Path
) -> None:
    assert (
        cli.main(["regress", "--run", str(baseline_run), "--baseline", str(tmp_path / "x.parquet")])
        == 2
    )
    no_sgd = shutil.copytree(baseline_run, tmp_path / "nosgd")
    cells = pd.read_parquet(no_sgd / "cells.parquet")
    cells[cells["optimizer"] != "sgd"].to_parquet(no_sgd / "cells.parquet")
    with pytest.raises(KfacbenchError, match="no SGD cell"):
        normalised_phases(no_sgd)
