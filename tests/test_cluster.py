"""Cells as submitit jobs (`kfacbench run --submitit`): the local executor end to end, and a
job that dies before writing its cell."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from shared_suites import PROFILED

from kfacbench import cli, cluster
from kfacbench.optim import METHODS
from kfacbench.runner import RunOptions
from kfacbench.runs.store import RunStore
from kfacbench.suite import load_suite
from kfacbench.workloads import WORKLOADS

pytest.importorskip("submitit", reason="needs the cluster extra (pip install 'kfacbench[cluster]')")

SUITE = PROFILED.format(name="jobs")


def test_local_executor_runs_every_cell_into_one_run_directory(tmp_path: Path) -> None:
    suite = tmp_path / "jobs.toml"
    suite.write_text(SUITE)
    out = tmp_path / "runs"
    assert cli.main(["run", str(suite), "--submitit", "local", "--out", str(out)]) == 0
    (run_dir,) = (out / "jobs").iterdir()
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert sorted(cells["optimizer"]) == ["sgd", "skfac"]
    assert set(cells["status"]) == {"ok"}
    assert cells["flush_denormal"].all()  # each job, a process of its own, flushed subnormals
    assert not pd.read_parquet(run_dir / "phases.parquet").empty
    assert list((run_dir / "jobs").glob("*_log.out"))  # submitit's per-job logs
    # Resuming submits nothing: every cell has its parts.
    assert cli.main(["run", str(suite), "--resume", str(run_dir), "--submitit", "local"]) == 0


class _DeadJob:
    job_id = "4242_0"

    def done(self) -> bool:
        return True

    def exception(self) -> Exception:
        return RuntimeError("Job 4242_0 (task: 0) with path ... has timed out (DUE TO TIME LIMIT)")


class _DeadExecutor:
    def batch(self) -> Any:
        return nullcontext()

    def submit(self, *args: Any) -> _DeadJob:
        return _DeadJob()


def test_a_job_that_died_is_recorded_as_an_error_cell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cluster, "_executor", lambda folder, options: _DeadExecutor())
    suite = tmp_path / "jobs.toml"
    suite.write_text(SUITE)
    out = tmp_path / "runs"
    # exit 1: the run finished, but its cells ended as errors
    assert cli.main(["run", str(suite), "--submitit", "slurm", "--out", str(out)]) == 1
    (run_dir,) = (out / "jobs").iterdir()
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert set(cells["status"]) == {"error"}
    assert all(e.startswith("job 4242_0: RuntimeError") for e in cells["error"])
    assert all("TIME LIMIT" in e for e in cells["error"])


def test_submitit_and_nproc_do_not_combine(tmp_path: Path) -> None:
    suite = tmp_path / "jobs.toml"
    suite.write_text(SUITE)
    argv = ["run", str(suite), "--submitit", "local", "--nproc", "2", "--out", str(tmp_path)]
    assert cli.main(argv) == 2


def test_a_job_leaves_the_other_jobs_temporary_files_alone(tmp_path: Path) -> None:
    """Cluster jobs write into one run directory at once. A job that removed "stale" temporary
    files deleted another job's live one mid-write (FileNotFoundError in CI); now only the
    launcher removes them, before submitting."""
    store = RunStore(tmp_path / "run")
    store.write_text("suite.toml", SUITE)
    suite = load_suite(store.run_dir / "suite.toml", workloads=WORKLOADS, methods=METHODS)
    live = store.run_dir / ".env.json.another-job.tmp"  # another job's write in flight
    live.write_text("{")
    status = cluster.run_one(str(store.run_dir), suite.cells[0].id, RunOptions(device="cpu"))
    assert status == "ok" and live.exists()
    # A run of its own (no other writers) does remove a killed writer's leftovers.
    assert store.remove_stale_files() == 1 and not live.exists()
