"""The runner end to end through the CLI: tables, failure isolation, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from kfacbench import cli
from kfacbench.core.problem import Problem
from kfacbench.optim import METHODS, HParam, MethodContext, MethodSpec
from kfacbench.store import CELL_COLUMNS, load_tables

SUITE = """
name = "{name}"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = {steps}
eval_every = 5
log_every = 5
train_eval_size = 500
[sweep]
workload = ["curves_ae"]
batch_size = [50]
seed = {seeds}
[optimizers.sgd]
lr = {lrs}
{extra}
"""


def write_suite(
    tmp_path: Path,
    *,
    name: str = "t",
    steps: int = 10,
    seeds: str = "[0]",
    lrs: str = "[0.01, 0.1]",
    extra: str = "",
) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(SUITE.format(name=name, steps=steps, seeds=seeds, lrs=lrs, extra=extra))
    return path


def only_run_dir(out: Path, suite: str) -> Path:
    (run_dir,) = (out / suite).iterdir()
    return run_dir


def test_run_writes_the_tables(tmp_path: Path) -> None:
    suite = write_suite(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    run_dir = only_run_dir(out, "t")
    tables = load_tables(run_dir)
    cells = tables["cells"]
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert len(cells) == 2 and set(cells["status"]) == {"ok"}
    assert set(cells["data_source"]) == {"synthetic"}
    assert cells["time_to_target_s"].isna().all()  # targets are defined on real data only
    assert cells["inv_interval"].isna().all()  # SGD: the axis collapsed
    assert (cells["median_step_ms"] > 0).all() and (cells["steps"] == 10).all()
    assert set(tables["curves"]["cell_id"]) == set(cells["cell_id"])
    assert set(tables["phases"]["phase"]) == {"forward", "backward", "update", "step"}
    env = json.loads((run_dir / "env.json").read_text())
    assert env["device_kind"] == "cpu" and env["torch_version"] == torch.__version__
    assert (run_dir / "suite.toml").read_text() == suite.read_text()
    assert cli.main(["show", str(run_dir)]) == 0


def boom(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> Any:
    raise ValueError("kaboom")


def oom(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> Any:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")


def test_failures_are_recorded_and_the_suite_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hp = {"x": HParam(1, "unused")}
    monkeypatch.setitem(METHODS, "boom", MethodSpec("boom", "raises", hp, False, boom))
    monkeypatch.setitem(METHODS, "oom", MethodSpec("oom", "out of memory", hp, False, oom))
    # weight decay 1e5 at lr 0.1 multiplies the weights by -1e4 per step: inf within 10 steps
    extra = "weight_decay = [0.0, 1e5]\n[optimizers.boom]\n[optimizers.oom]\n"
    suite = write_suite(tmp_path, lrs="0.1", extra=extra)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    run_dir = only_run_dir(out, "t")
    cells = load_tables(run_dir)["cells"].set_index("optimizer")
    assert cells.loc["boom", "status"] == "error"
    assert cells.loc["boom", "error"] == "ValueError: kaboom"
    assert cells.loc["oom", "status"] == "oom"
    sgd = cells.loc["sgd"].set_index("label")
    assert sorted(sgd["status"]) == ["diverged", "ok"]
    assert (run_dir / "errors").is_dir()  # tracebacks of unexpected errors are kept


def test_dry_run_and_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path, seeds="[0, 1]")
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--dry-run"]) == 0
    assert "4 cells" in capsys.readouterr().out
    assert not out.exists()
    assert cli.main(["run", str(suite), "--out", str(out), "--only", "*lr=0.1*"]) == 0
    assert len(load_tables(only_run_dir(out, "t"))["cells"]) == 2


def test_bad_suite_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suite = write_suite(tmp_path)
    suite.write_text(suite.read_text().replace("curves_ae", "no_such_workload"))
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(suite) in err and "no_such_workload" in err


def kfacbench(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kfacbench.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.slow
def test_resume_after_a_killed_run_runs_every_cell_exactly_once(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, name="r", steps=80, seeds="[0, 1, 2]")
    out = tmp_path / "out"
    proc = kfacbench("run", str(suite), "--out", str(out))
    deadline = time.monotonic() + 120
    parts: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(out.glob("r/*/parts/*.cells.parquet"))
        if parts:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make cells longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run_dir(out, "r")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("parts/*.cells.parquet")}
    assert 1 <= len(before) < 6

    resumed = kfacbench("run", str(suite), "--out", str(out), "--resume")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert f"{len(before)} of 6 cells already done" in log
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert len(cells) == 6 and cells["cell_id"].is_unique and set(cells["status"]) == {"ok"}
    after = {p.name: p.stat().st_mtime_ns for p in run_dir.glob("parts/*.cells.parquet")}
    assert all(after[name] == mtime for name, mtime in before.items())  # not redone
    curves = pd.read_parquet(run_dir / "curves.parquet")
    assert not curves.duplicated(["cell_id", "step"]).any()


def test_resume_refuses_a_foreign_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = write_suite(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--resume", str(tmp_path)]) == 2
    assert "not a kfacbench run directory" in capsys.readouterr().err
    assert cli.main(["run", str(suite), "--out", str(out), "--resume"]) == 2
    assert "no earlier run of suite 't'" in capsys.readouterr().err
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    other = write_suite(tmp_path, name="other")
    run_dir = only_run_dir(out, "t")
    assert cli.main(["run", str(other), "--out", str(out), "--resume", str(run_dir)]) == 2
    assert "that run is of suite 't', not 'other'" in capsys.readouterr().err
