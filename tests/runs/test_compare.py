"""`kfacbench compare`: cells matched by config, a planted regression caught, identical runs
pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from kfacbench import cli
from kfacbench.errors import KfacbenchError
from kfacbench.runs.compare import compare_runs

SUITE = """
name = "c"
[defaults]
device = "cpu"
data = "real"
max_steps = 30
eval_every = 15
log_every = 5
train_eval_size = 500
[sweep]
workload = ["curves_ae"]
batch_size = [100]
seed = [0]
[optimizers.sgd]
lr = [0.003, 0.01]
"""


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    suite = root / "c.toml"
    suite.write_text(SUITE)
    assert cli.main(["run", str(suite), "--out", str(root / "out"), "--cache-dir", str(root)]) == 0
    (run_dir,) = (root / "out" / "c").iterdir()
    return run_dir


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def plant(run_dir: Path, column: str, factor: float, row: int = 0) -> str:
    """Multiply ``column`` of one cell of the consolidated cells table; return its label."""
    path = run_dir / "cells.parquet"
    cells = pd.read_parquet(path)
    cells.loc[row, column] = cells.loc[row, column] * factor
    cells.to_parquet(path)
    return str(cells.loc[row, "label"])


def test_identical_runs_pass(base_run: Path, tmp_path: Path) -> None:
    same = copy_run(base_run, tmp_path / "same")
    result = compare_runs(base_run, same)
    assert len(result.table) == 2 and (result.table["ratio"] == 1.0).all()
    assert result.regressions.empty and result.geomean_ratio() == pytest.approx(1.0)
    assert (result.table["noise"] >= 0).all()  # from the step times' p10-p90 spread
    assert cli.main(["compare", str(base_run), str(same)]) == 0


def test_a_planted_step_time_regression_fails(base_run: Path, tmp_path: Path) -> None:
    slow = copy_run(base_run, tmp_path / "slow")
    label = plant(slow, "median_step_ms", 1.5)
    result = compare_runs(base_run, slow, "step_time", fail_above=0.10)
    assert list(result.regressions["label"]) == [label]
    assert result.regressions["ratio"].iloc[0] == pytest.approx(1.5)
    md = tmp_path / "cmp.md"
    median = ["--metric", "step_time"]
    assert cli.main(["compare", str(base_run), str(slow), *median, "--markdown", str(md)]) == 1
    text = md.read_text()
    assert "**regressed**" in text and label in text and "| 1.500 |" in text
    # Below the threshold it passes; the amortized step (the default) did not move at all.
    assert cli.main(["compare", str(base_run), str(slow), *median, "--fail-above", "60"]) == 0
    assert cli.main(["compare", str(base_run), str(slow)]) == 0


def test_a_slower_refresh_moves_the_amortized_step_not_the_median(
    base_run: Path, tmp_path: Path
) -> None:
    """Refreshes 1.5× as long in the whole training time: the default (amortized) metric flags
    the cell, and its median step's ratio, shown beside, stays 1."""
    slow = copy_run(base_run, tmp_path / "slow")
    label = plant(slow, "train_time_s", 1.5, row=1)
    result = compare_runs(base_run, slow, fail_above=0.10)
    assert result.metric == "amortized"
    (row,) = result.regressions.to_dict("records")
    assert row["label"] == label and row["ratio"] == pytest.approx(1.5)
    assert row["median_ratio"] == 1.0
    cells = pd.read_parquet(base_run / "cells.parquet").set_index("label")
    assert row["base"] == pytest.approx(
        cells.at[label, "train_time_s"] / cells.at[label, "steps"] * 1e3
    )
    md = tmp_path / "cmp.md"
    assert cli.main(["compare", str(base_run), str(slow), "--markdown", str(md)]) == 1
    assert "median step new / base" in md.read_text() and "| 1.500 | " in md.read_text()


def test_final_loss_and_failed_cells(base_run: Path, tmp_path: Path) -> None:
    worse = copy_run(base_run, tmp_path / "worse")
    label = plant(worse, "final_train_loss", 1.2, row=1)
    assert list(compare_runs(base_run, worse, "final_loss").regressions["label"]) == [label]
    path = worse / "cells.parquet"
    cells = pd.read_parquet(path)
    cells.loc[0, "status"] = "diverged"
    cells.to_parquet(path)
    result = compare_runs(base_run, worse, "step_time")
    assert str(cells.loc[0, "label"]) in set(result.regressions["label"])


def test_cells_match_by_config_and_errors_are_clear(base_run: Path, tmp_path: Path) -> None:
    fewer = copy_run(base_run, tmp_path / "fewer")
    cells = pd.read_parquet(fewer / "cells.parquet")
    dropped = str(cells.loc[1, "label"])
    cells.drop(index=1).to_parquet(fewer / "cells.parquet")
    for part in (fewer / "parts").glob(f"{cells.loc[1, 'cell_id']}.*"):
        part.unlink()  # else the row comes back from parts/ (the tables are reconciled on read)
    result = compare_runs(base_run, fewer)
    assert len(result.table) == 1 and result.only_base == [dropped] and result.only_new == []
    with pytest.raises(KfacbenchError, match="unknown metric"):
        compare_runs(base_run, fewer, "speed")  # type: ignore[arg-type]
    with pytest.raises(KfacbenchError, match="not a kfacbench run directory"):
        compare_runs(base_run, tmp_path)
    assert cli.main(["compare", str(base_run), str(tmp_path)]) == 2


def set_ttt(run_dir: Path, ttt: float, lo: float | None) -> str:
    """Give cell 0 a time to target (and the eval before it, unless ``lo`` is None: a run from
    before the column); return its label."""
    path = run_dir / "cells.parquet"
    cells = pd.read_parquet(path)
    cells["time_to_target_s"] = [ttt, float("nan")]
    if lo is None:
        cells = cells.drop(columns="time_to_target_lo_s")
    else:
        cells["time_to_target_lo_s"] = [lo, float("nan")]
    cells.to_parquet(path)
    return str(cells.loc[0, "label"])


def test_time_to_target_regresses_only_beyond_its_eval_interval(
    base_run: Path, tmp_path: Path
) -> None:
    """Reached at 100 s (not yet at 50 s): one eval later (150 s, not yet at 100 s) may be the
    same crossing, so it is noise, not a regression; 300 s (not yet at 250 s) surely is."""
    base = copy_run(base_run, tmp_path / "base")
    set_ttt(base, 100.0, 50.0)
    later = copy_run(base_run, tmp_path / "later")
    set_ttt(later, 150.0, 100.0)
    result = compare_runs(base, later, "time_to_target", fail_above=0.10)
    assert result.table["ratio"].tolist() == [1.5]  # cell 1 reached it in neither run: skipped
    assert result.table["noise"].tolist() == [0.5] and result.regressions.empty
    slower = copy_run(base_run, tmp_path / "slower")
    label = set_ttt(slower, 300.0, 250.0)
    assert list(compare_runs(base, slower, "time_to_target").regressions["label"]) == [label]
    # Runs recorded before the eval interval was: the time itself decides, as it did.
    old_base, old_later = copy_run(base, tmp_path / "ob"), copy_run(later, tmp_path / "ol")
    set_ttt(old_base, 100.0, None)
    set_ttt(old_later, 150.0, None)
    assert list(compare_runs(old_base, old_later, "time_to_target").regressions["label"]) == [label]
