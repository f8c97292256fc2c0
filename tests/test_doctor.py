"""kfacbench doctor: checks pass on a sound CPU setup, and fail, named, when broken on purpose."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from kfacbench import doctor
from kfacbench.cli import main
from kfacbench.doctor import PHASES, Doctor, run_check
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.sgd import SGD

CPU = torch.device("cpu")


def checks(tmp_path: Path, pattern: str) -> list[doctor.CheckResult]:
    """Run the doctor's CPU checks whose 'group: check' starts with ``pattern``."""
    plan = Doctor(CPU, tmp_path).plan()
    chosen = [c for c in plan if f"{c.group}: {c.name}".startswith(pattern)]
    assert chosen, pattern
    return [run_check(c) for c in chosen]


def test_sound_methods_pass_and_the_cli_writes_the_table(tmp_path: Path) -> None:
    code = main(["doctor", "--device", "cpu", "--out", str(tmp_path), "--only", "methods: *ae"])
    table = pd.read_parquet(tmp_path / "doctor.parquet")
    assert code == 0, table[table.status == "fail"].to_dict("records")
    assert set(table["group"]) == {"methods"}
    ran = table[table.status == "pass"]
    assert {"sgd × curves_ae", "kfac × curves_ae", "skfac × curves_ae"} <= set(ran["check"])
    assert ran["detail"].str.contains("loss .* → .* in 8 steps", regex=True).all()


def test_a_method_that_does_not_apply_is_skipped_with_the_reason(tmp_path: Path) -> None:
    (result,) = checks(tmp_path, "methods: kfac-tridiag × cifar10_resnet20")
    assert result.status == "skipped"
    assert "chain of Linear layers" in result.detail


def test_a_method_producing_nan_fails_and_names_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_step = SGD.step
    calls = {"n": 0}

    def nan_on_third(self: SGD, *args: Any) -> torch.Tensor:
        loss = real_step(self, *args)
        calls["n"] += 1
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(SGD, "step", nan_on_third)
    code = main(
        ["doctor", "--device", "cpu", "--out", str(tmp_path), "--only", "methods: sgd × curves*"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "FAIL methods: sgd × curves_ae: non-finite loss at step 3" in err


def test_a_loss_that_does_not_fall_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SGD, "step", lambda self, x, y, timer: torch.tensor(1.0))
    (result,) = checks(tmp_path, "methods: sgd × curves_ae")
    assert result.status == "fail"
    assert result.detail.startswith("loss did not fall: loss 1 → 1 in 8 steps")


def test_the_kernels_table_has_every_phase_and_a_missing_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ok,) = checks(tmp_path / "ok", "profile")
    assert ok.status == "pass", ok.detail
    assert "shares sum to 1.000" in ok.detail

    real = doctor.kernel_rows

    def without_inverse(trace: Path, cell_id: str) -> list[dict[str, Any]]:
        return [row for row in real(trace, cell_id) if row["phase"] != "inverse"]

    monkeypatch.setattr(doctor, "kernel_rows", without_inverse)
    (broken,) = checks(tmp_path / "broken", "profile")
    assert broken.status == "fail"
    assert broken.detail.startswith("no kernels attributed to inverse (phases seen:")
    assert set(PHASES) - {"inverse"} <= set(broken.detail.split("phases seen: ")[1].split(", "))


def test_cuda_checks_are_skipped_on_cpu_with_the_reason(tmp_path: Path) -> None:
    results = checks(tmp_path, "cuda")
    assert len(results) == 5
    assert {r.status for r in results} == {"skipped"}
    assert all(r.detail == "device cpu is not CUDA" for r in results)


def test_an_import_failure_names_the_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def broken(name: str, package: str | None = None) -> Any:
        if name == "kfacbench.report.claims":
            raise ImportError("no module named 'nothing'")
        return real(name, package)

    monkeypatch.setattr(doctor.importlib, "import_module", broken)
    (result,) = checks(tmp_path, "environment: kfacbench modules import")
    assert result.status == "fail"
    assert "kfacbench.report.claims (ImportError: no module named 'nothing')" in result.detail


def test_the_environment_check_writes_env_json(tmp_path: Path) -> None:
    (result,) = checks(tmp_path, "environment: versions")
    assert result.status == "pass"
    assert f"torch {torch.__version__}" in result.detail
    assert (tmp_path / "env.json").exists()


def test_an_unmatched_only_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["doctor", "--device", "cpu", "--out", str(tmp_path), "--only", "nope*"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kfacbench: error: --only 'nope*' matches no check; checks are named 'GROUP: CHECK'"
        " (groups: environment, methods, linalg, profile, memory, cuda, distributed)"
    )


def test_the_linalg_check_writes_its_table_and_names_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every workload's refresh shapes are probed; within a tight budget the small shapes run
    and the rest are rows saying so; the detail names the build and the winners."""
    monkeypatch.setattr(doctor, "LINALG_BUDGET_S", 3.0)
    (result,) = checks(tmp_path, "linalg")
    assert result.status == "pass", result.detail
    assert "torch" in result.detail and "fastest agreeing (float32)" in result.detail
    table = pd.read_parquet(tmp_path / "linalg.parquet")
    shapes = {(s.size, s.batch) for s in doctor.workload_shapes(CPU)}
    assert set(zip(table["size"], table["batch"], strict=True)) == shapes
    assert set(table["status"]) <= {"measured", "budget"}
    assert (table["status"] == "measured").any()
    measured = table[table["status"] == "measured"]
    assert set(measured["method"]) == {"eigh", "cholesky", "inv", "newton"}
    cut = table[table["status"] == "budget"]
    if not cut.empty:  # smallest first: the budget cuts the largest shapes
        assert cut["size"].min() >= measured["size"].max()


def test_the_state_check_holds_k_fac_to_the_shape_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (ok,) = checks(tmp_path / "ok", "memory")
    assert ok.status == "pass", ok.detail
    assert ok.detail.startswith("kfac-fast × curves_ae: factors ")
    monkeypatch.setattr(KFAC, "state_bytes", lambda self: {"factors": 1})
    (broken,) = checks(tmp_path / "broken", "memory")
    assert broken.status == "fail"
    assert "state {'factors': 1, 'inverses': 0, 'first_order': 0} bytes" in broken.detail
