"""The runner end to end through the CLI: tables, failure isolation, resume after a kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from kfacbench import cli, runner
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS, HParam, MethodContext, MethodSpec
from kfacbench.optim.sgd import SGD
from kfacbench.runner import DataCache, RunOptions, one_line, prepare_cell
from kfacbench.runs.rundir import load_tables
from kfacbench.runs.schema import CELL_COLUMNS
from kfacbench.runs.store import TMP_SUFFIX, RunStore
from kfacbench.workloads import WORKLOADS

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
    # Where each cell's wall time went: the parts are measured apart and fit inside it.
    parts = cells["train_time_s"] + cells["eval_s"] + cells["build_s"] + cells["compile_s"]
    parts += cells["ops_probe_s"]  # counting ops on untimed steps after training
    assert (cells["eval_s"] > 0).all() and (cells["build_s"] > 0).all()
    assert (cells["ops_probe_s"] > 0).all()
    assert (parts <= cells["wall_s"]).all() and (cells["wall_s"] < parts + 1.0).all()
    assert set(tables["curves"]["cell_id"]) == set(cells["cell_id"])
    assert set(tables["phases"]["phase"]) == {"forward", "backward", "update", "step"}
    env = json.loads((run_dir / "env.json").read_text())
    assert env["device_kind"] == "cpu" and env["torch_version"] == torch.__version__
    assert env["gemm_gflops"] > 0  # measured before the cells
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
    assert cli.main(["run", str(suite), "--out", str(out)]) == 1  # the boom cell is an error
    run_dir = only_run_dir(out, "t")
    cells = load_tables(run_dir)["cells"].set_index("optimizer")
    assert cells.loc["boom", "status"] == "error"
    assert cells.loc["boom", "error"] == "ValueError: kaboom"
    assert cells.loc["oom", "status"] == "oom"
    assert cells.loc["oom", "oom_request_mb"] == 2048  # "Tried to allocate 2 GiB"
    assert math.isnan(cells.loc["boom", "oom_request_mb"])
    sgd = cells.loc["sgd"].set_index("label")
    assert sorted(sgd["status"]) == ["diverged", "ok"]
    assert (run_dir / "errors").is_dir()  # tracebacks of unexpected errors are kept


CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 170.00 MiB. GPU 0 has a total capacity of 31.37 GiB"
    " of which 73.81 MiB is free. Including non-PyTorch memory, this process has 31.29 GiB memory"
    " in use. Of the allocated memory 30.80 GiB is allocated by PyTorch, and 2.80 MiB is reserved"
    " by PyTorch but unallocated. If reserved but unallocated memory is large try setting"
    " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation"
    " for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
"""torch's message, as a GPU run printed it."""


class OomAtStep2(SGD):
    """SGD that runs out of memory at its third step: on CUDA (the message raised as torch
    raises it) or on the host (a real 1 EiB request, beyond any address space)."""

    def __init__(self, problem: Problem, where: str) -> None:
        super().__init__(problem, lr=0.01)
        self.where = where

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        if self.steps == 2:
            if self.where == "cuda":
                raise torch.OutOfMemoryError(CUDA_OOM)
            torch.empty(2**60, dtype=torch.uint8)
        return super().step(x, y, timer)


def test_an_out_of_memory_step_records_the_request_and_the_suite_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for where in ("cuda", "cpu"):

        def build(p: Problem, hp: Mapping[str, Any], ctx: MethodContext, w: str = where) -> Any:
            return OomAtStep2(p, w)

        name = f"oom-{where}"
        monkeypatch.setitem(METHODS, name, MethodSpec(name, "runs out", {}, False, build))
    extra = "[optimizers.oom-cuda]\n[optimizers.oom-cpu]\n[optimizers.adamw]\n"
    suite = write_suite(tmp_path, lrs="0.01", extra=extra)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0  # out of memory is a result
    cells = load_tables(only_run_dir(out, "t"))["cells"].set_index("optimizer")
    # AdamW, the suite's last cell, ran after the two that ran out of memory.
    cells = cells.loc[["sgd", "oom-cuda", "oom-cpu", "adamw"]]
    assert list(cells["status"]) == ["ok", "oom", "oom", "ok"]
    assert cells.loc["oom-cuda", "oom_request_mb"] == 170.0
    assert cells.loc["oom-cpu", "oom_request_mb"] == 2**40  # 2**60 bytes
    assert "DefaultCPUAllocator" in cells.loc["oom-cpu", "error"]
    assert cells.loc["oom-cpu", "batch_size"] == 50 and cells.loc["oom-cpu", "steps"] == 0
    # The state of the cells that trained: SGD's momentum, AdamW's two moments and step counts.
    params = sum(
        p.numel() for p in WORKLOADS["curves_ae"].build_model(torch.Generator()).parameters()
    )
    tensors = len(list(WORKLOADS["curves_ae"].build_model(torch.Generator()).parameters()))
    assert cells.loc["sgd", "state_mb"] == 4 * params / 2**20
    assert cells.loc["adamw", "state_mb"] == (8 * params + 4 * tensors) / 2**20
    assert (cells.loc[["sgd", "adamw"], "curvature_state_mb"] == 0).all()
    assert cells.loc[["oom-cuda", "oom-cpu"], "state_mb"].isna().all()
    assert cells["oom_request_mb"].isna().tolist() == [True, False, False, True]
    info = json.loads(cells.loc["adamw", "method_info"])
    assert info["state_bytes"]["first_order"] == 8 * params


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


def test_a_run_records_its_command_and_commit_in_a_manifest(tmp_path: Path) -> None:
    suite, out = write_suite(tmp_path, steps=2, seeds="[0, 1]"), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out), "--only", "*seed=0"]) == 0
    run_dir = only_run_dir(out, "t")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    assert manifest["command"] == f"kfacbench run {suite} --out {out} --only '*seed=0'"
    assert manifest["commit"] == env["git_commit"]
    assert manifest["dirty"] == str(env["git_commit"]).endswith("-dirty")
    assert manifest["machine"]["device_name"] == env["device_name"]
    assert cli.main(["run", str(suite), "--out", str(out), "--resume"]) == 0
    resumed = json.loads((run_dir / "manifest.json").read_text())
    assert resumed["command"] == manifest["command"]
    assert resumed["resumed_by"] == [f"kfacbench run {suite} --out {out} --resume"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("kfacbench: error: ") and "\n" not in err, captured
    assert "Traceback" not in captured.out
    return err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--nproc", "0"], "--nproc: expected an integer >= 1, got 0"),
        (["--dist-timeout", "nan"], "--dist-timeout: expected finite seconds > 0"),
        (["--cpus-per-job", "x"], "expected an integer, got 'x'"),
    ],
)
def test_bad_arguments_are_one_line_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], fragment: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", str(write_suite(tmp_path)), "--out", str(out), *args])
    assert exit_info.value.code == 2
    assert fragment in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_fails_before_any_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert cli.main(["run", str(write_suite(tmp_path)), "--out", str(out), "--device", "cuda"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)
    assert not out.exists()  # a later bare --resume cannot pick an empty run


def test_out_naming_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert cli.main(["run", str(write_suite(tmp_path)), "--out", str(out)]) == 2
    assert f"--out {out}: exists and is not a directory" in one_error_line(capsys)
    assert out.read_text() == "keep me"


def test_a_damaged_suite_toml_refuses_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite, out = write_suite(tmp_path, steps=2), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    run_dir = only_run_dir(out, "t")
    (run_dir / "suite.toml").write_bytes(b"name = [\x00\xff")
    assert cli.main(["run", str(suite), "--out", str(out), "--resume"]) == 2
    assert f"{run_dir / 'suite.toml'} is damaged" in one_error_line(capsys)


def test_resume_restores_a_row_lost_while_the_tables_were_written(tmp_path: Path) -> None:
    """A kill between a cell's parts and the rebuilt tables left cells.parquet one row short;
    --resume found every cell done and never rebuilt them. It now does."""
    suite, out = write_suite(tmp_path, steps=2), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    run_dir = only_run_dir(out, "t")
    cells = pd.read_parquet(run_dir / "cells.parquet")
    cells.iloc[:1].to_parquet(run_dir / "cells.parquet", index=False)
    (run_dir / f".curves.parquet.abc{TMP_SUFFIX}").write_bytes(b"interrupted write")
    assert cli.main(["run", str(suite), "--out", str(out), "--resume"]) == 0
    assert sorted(pd.read_parquet(run_dir / "cells.parquet")["cell_id"]) == sorted(cells["cell_id"])
    assert not list(run_dir.glob(f".*{TMP_SUFFIX}"))


def test_a_cell_whose_results_cannot_be_stored_is_an_error_and_the_suite_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = RunStore.write_cell
    calls: list[str] = []

    def flaky(self: RunStore, row: Mapping[str, Any], curves: Any, phases: Any) -> None:
        calls.append(str(row["status"]))
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real(self, row, curves, phases)

    monkeypatch.setattr(RunStore, "write_cell", flaky)
    suite, out = write_suite(tmp_path, steps=2), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 1  # a cell ended as error
    run_dir = only_run_dir(out, "t")
    cells = pd.read_parquet(run_dir / "cells.parquet").sort_values("started_at", kind="stable")
    assert list(cells["status"]) == ["error", "ok"]
    assert cells["error"].iloc[0] == (
        "could not store the results: OSError: [Errno 28] No space left on device"
    )
    first = cells["cell_id"].iloc[0]
    assert pd.read_parquet(run_dir / "parts" / f"{first}.curves.parquet").empty  # no orphans


def test_a_blown_up_bernoulli_autoencoder_is_diverged(tmp_path: Path) -> None:
    """SGD at lr 1e6 on CURVES: the cross-entropy grows by orders of magnitude and never
    overflows; it used to be recorded ``ok``."""
    suite, out = write_suite(tmp_path, steps=60, lrs="[0.01, 1e6]"), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    cells = pd.read_parquet(only_run_dir(out, "t") / "cells.parquet").set_index("label")
    blown = cells.loc["curves_ae sgd bs=50 lr=1000000.0 seed=0"]
    assert blown["status"] == "diverged" and blown["steps"] < 60
    assert "exceeds diverge_factor 10 × the initial loss" in blown["error"]
    assert cells.loc["curves_ae sgd bs=50 lr=0.01 seed=0", "status"] == "ok"


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="machine load is read from /proc")
def test_a_cell_timed_on_a_busy_machine_is_flagged_and_rerun(
    tmp_path: Path, spinners: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Other processes spinning on every CPU while the cell trains: the cells table says so,
    `run` and `show` warn, and `--resume --rerun-busy` runs the cell again (keeping the first)."""
    extra = "[workloads.curves_ae]\nmax_seconds = 1.0\nmax_steps = 100000\n"
    suite, out = write_suite(tmp_path, lrs="0.01", extra=extra), tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    run_dir = only_run_dir(out, "t")
    cell = pd.read_parquet(run_dir / "cells.parquet").iloc[0]
    assert bool(cell["busy"]) and cell["other_cpu_share"] > 0.25, cell["busy_reason"]
    assert cell["busy_reason"] and cell["torch_threads"] >= 1 and cell["load_window_s"] >= 1.0
    assert "1 of 1 cells ran on a busy machine" in " ".join(text.split())
    assert cli.main(["show", str(run_dir)]) == 0
    assert "--rerun-busy" in " ".join(capsys.readouterr().out.split())

    cell_id = cell["cell_id"]
    before = (run_dir / "parts" / f"{cell_id}.cells.parquet").read_bytes()
    assert cli.main(["run", str(suite), "--out", str(out), "--resume", "--rerun-busy"]) == 0
    assert (run_dir / "parts" / "busy" / f"{cell_id}.cells.parquet").read_bytes() == before
    assert (run_dir / "parts" / f"{cell_id}.cells.parquet").read_bytes() != before
    assert len(pd.read_parquet(run_dir / "cells.parquet")) == 1


def test_rerun_busy_needs_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(write_suite(tmp_path)), "--rerun-busy"]) == 2
    assert "give --resume too" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["profile", "regress", "diagnose"])
def test_other_commands_check_the_device_before_any_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "out"
    argv = [command, str(write_suite(tmp_path)), "--out", str(out), "--device", "cuda"]
    assert cli.main([*argv, "--damping", "1"] if command == "diagnose" else argv) == 2
    assert "CUDA is not available" in one_error_line(capsys)
    assert not out.exists()


def test_release_cuda_says_when_the_context_is_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed CUDA cell: a usable context is emptied (""), a poisoned one (a device-side
    assert raises again at the next sync) is reported in one line, so the run stops for --resume
    in a new process instead of failing every later cell."""
    from kfacbench import runner

    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    assert runner.release_cuda(torch.device("cuda")) == "" and emptied == [True]

    def poisoned(device: object = None) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered\nCompile with ...")

    monkeypatch.setattr(torch.cuda, "synchronize", poisoned)
    assert runner.release_cuda(torch.device("cuda")) == (
        "RuntimeError: CUDA error: device-side assert triggered Compile with ..."
    )


def test_compiled_cells_record_compile_time_and_compiled_phases(tmp_path: Path) -> None:
    extra = "[optimizers.adamw]\n"
    suite = write_suite(tmp_path, lrs="0.1", extra=extra)
    text = suite.read_text().replace("seed = [0]", 'seed = [0]\ncompile = ["off", "default"]')
    suite.write_text(text)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 1  # AdamW has no compiled regions
    tables = load_tables(only_run_dir(out, "t"))
    cells = tables["cells"].set_index(["optimizer", "compile"])
    assert cells.loc[("sgd", "off"), "compile_s"] == 0.0
    assert cells.loc[("sgd", "default"), "compile_s"] > 0.0
    assert cells.loc[("sgd", "default"), "status"] == "ok"
    assert cells.loc[("adamw", "off"), "status"] == "ok"
    assert cells.loc[("adamw", "default"), "status"] == "error"
    assert "has no compiled regions" in cells.loc[("adamw", "default"), "error"]
    phases = tables["phases"].merge(tables["cells"][["cell_id", "optimizer", "compile"]])
    sgd = phases[phases["optimizer"] == "sgd"].set_index(["compile", "phase"])["compiled"]
    assert set(sgd.loc["off"]) == {"no"}
    assert sgd.loc[("default", "update")] == "all" and sgd.loc[("default", "step")] == "part"
    # Inductor's fused kernels are not the ops the counter sees: compiled cells are not counted.
    counted = phases.set_index("compile")["ops_per_step"]
    assert counted.loc["default"].isna().all() and counted.loc["off"].notna().all()


def test_cuda_graph_cells_run_eagerly_on_a_cpu_and_refuse_what_they_cannot_graph(
    tmp_path: Path,
) -> None:
    """On a CPU a cuda_graph cell trains as its eager twin (no step replayed, the column says
    the setting was not in effect); a method without graph hooks (AdamW) and a compiled cell
    are one-line errors naming the setting."""
    suite = write_suite(tmp_path, lrs="0.1", extra="[optimizers.adamw]\n")
    text = suite.read_text().replace("seed = [0]", "seed = [0]\ncuda_graph = [false, true]")
    suite.write_text(text)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 1  # AdamW has no graph hooks
    cells = load_tables(only_run_dir(out, "t"))["cells"]
    cells = cells.set_index([cells["optimizer"], cells["label"].str.contains("cuda_graph")])
    sgd, adamw = cells.loc["sgd"], cells.loc["adamw"]
    assert sgd.loc[True, "status"] == "ok" and sgd.loc[True, "graphed_steps"] == 0
    assert not sgd["cuda_graph"].any()  # recorded as not in effect on this device
    assert sgd.loc[True, "final_train_loss"] == sgd.loc[False, "final_train_loss"]
    assert adamw.loc[True, "status"] == "error" and adamw.loc[False, "status"] == "ok"
    assert "cuda_graph" in adamw.loc[True, "error"]
    compiled = suite.read_text().replace("cuda_graph = [false, true]", 'compile = "default"')
    suite.write_text(compiled.replace("[optimizers.adamw]\n", "") + "")
    text = suite.read_text().replace("[defaults]", "[defaults]\ncuda_graph = true")
    suite.write_text(text)
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "c")]) == 1
    (row,) = load_tables(only_run_dir(tmp_path / "c", "t"))["cells"].to_dict("records")
    assert "compile = 'off'" in row["error"]


def test_compile_in_a_data_parallel_run_is_a_one_line_error(tmp_path: Path) -> None:
    suite = write_suite(tmp_path, lrs="0.1")
    suite.write_text(suite.read_text().replace("max_steps", 'compile = "default"\nmax_steps'))
    (cell,) = cli.read_suite(str(suite)).cells
    with pytest.raises(KfacbenchError, match="not supported in data-parallel runs"):
        prepare_cell(cell, torch.device("cpu"), DataCache(RunOptions()), dist=object())  # type: ignore[arg-type]


def test_an_error_message_names_no_folder_of_the_machine() -> None:
    """torch quotes stack traces in its errors (a CUDA-graph error of the first GPU run named
    `/work/main/kfacbench/optim/sgd.py`); the error column keeps the paths from the package on."""
    source = Path(runner.__file__).resolve().parent / "optim" / "sgd.py"
    site = Path(sysconfig.get_paths()["purelib"]).resolve() / "torch" / "nn" / "modules.py"
    exc = RuntimeError(f'Stack trace: File "{source}", line 102 File "{site}", line 7')
    assert one_line(exc) == (
        'RuntimeError: Stack trace: File "kfacbench/optim/sgd.py", line 102 '
        'File "site-packages/torch/nn/modules.py", line 7'
    )


def test_phases_record_the_ops_of_untimed_probe_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SGD and K-FAC-fast on curves_ae: each phase row carries its ops per plain step and per
    refresh step, counted after the timed run on a fresh copy. The same cells with
    ``count_ops = false`` keep their ids, train the same curves (the probe changes no result)
    and have NaN counts."""
    runs = {}
    for name, override in (
        ("counted", ""),
        ("uncounted", "[workloads.curves_ae]\ncount_ops = false\n"),
    ):
        extra = f"[optimizers.kfac-fast]\n{override}"
        suite = write_suite(tmp_path, name=name, lrs="0.01", extra=extra)
        out = tmp_path / name
        assert cli.main(["run", str(suite), "--out", str(out)]) == 0
        runs[name] = load_tables(only_run_dir(out, name))
    counted, uncounted = runs["counted"], runs["uncounted"]
    optimizer = counted["cells"].set_index("cell_id")["optimizer"]
    ops = counted["phases"].assign(optimizer=lambda f: f["cell_id"].map(optimizer))
    ops = ops.set_index(["optimizer", "phase"])[["ops_per_step", "refresh_ops"]]
    assert ops.loc[("sgd", "step"), "ops_per_step"] > 0
    assert math.isnan(ops.loc[("sgd", "step"), "refresh_ops"])  # SGD never refreshes
    assert ops.loc[("kfac-fast", "step"), "ops_per_step"] > ops.loc[("sgd", "step"), "ops_per_step"]
    assert math.isnan(ops.loc[("kfac-fast", "inverse"), "ops_per_step"])  # refresh steps only
    assert ops.loc[("kfac-fast", "inverse"), "refresh_ops"] > 0
    assert (
        ops.loc[("kfac-fast", "step"), "refresh_ops"]
        > ops.loc[("kfac-fast", "step"), "ops_per_step"]
    )
    assert ops.loc[(slice(None), ["forward", "backward", "update"]), "ops_per_step"].gt(0).all()
    assert set(uncounted["cells"]["cell_id"]) == set(counted["cells"]["cell_id"])
    assert uncounted["phases"][["ops_per_step", "refresh_ops"]].isna().all().all()
    assert (counted["cells"]["ops_probe_s"] > 0).all()
    assert (uncounted["cells"]["ops_probe_s"] == 0).all()
    curves = [
        r["curves"].sort_values(["cell_id", "step"], ignore_index=True) for r in runs.values()
    ]
    pd.testing.assert_series_equal(curves[0]["train_loss"], curves[1]["train_loss"])
    capsys.readouterr()
    assert cli.main(["show", str(only_run_dir(tmp_path / "counted", "counted"))]) == 0
    assert "counted on untimed steps" in capsys.readouterr().out  # the ops columns' caption


def test_a_failed_op_count_leaves_the_timed_results_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*args: Any) -> Any:
        raise RuntimeError("no counter here")

    monkeypatch.setattr(runner, "probe_ops", fail)
    suite = write_suite(tmp_path, lrs="0.01")
    assert cli.main(["run", str(suite), "--out", str(tmp_path / "out")]) == 0
    tables = load_tables(only_run_dir(tmp_path / "out", "t"))
    assert list(tables["cells"]["status"]) == ["ok"]
    assert tables["phases"]["median_ms"].gt(0).all()
    assert tables["phases"][["ops_per_step", "refresh_ops"]].isna().all().all()
    assert "ops not counted (RuntimeError: no counter here)" in capsys.readouterr().out
