"""The benchmarks' clock and machine info (ordinary tests, run with benchmarks disabled too)."""

from __future__ import annotations

import time
from typing import Any

import torch
from benchkit import PhaseClock
from conftest import pytest_benchmark_update_machine_info

from kfacbench.core.timing import STEP, PhaseTimer


def test_the_clock_advances_only_while_its_phase_runs() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    clock = PhaseClock()
    clock.bind(timer, "inverse")
    before = clock()
    with timer.step():
        with timer.phase("forward"):
            time.sleep(0.05)
        with timer.phase("inverse"):
            time.sleep(0.02)
    elapsed = clock() - before
    assert elapsed == sum(timer.durations("inverse")) / 1e3
    assert 0.02 <= elapsed < 0.05
    clock.bind(timer, STEP)
    assert clock() >= 0.07


def test_an_unbound_clock_is_perf_counter() -> None:
    clock = PhaseClock()
    a = clock()
    time.sleep(0.01)
    assert clock() - a >= 0.01


def test_machine_info_names_device_and_builds() -> None:
    info: dict[str, Any] = {}
    pytest_benchmark_update_machine_info(None, info)  # type: ignore[arg-type]
    assert info["torch_version"] == torch.__version__
    assert info["device_kind"] in ("cpu", "cuda")
    assert {"device_name", "cuda_version", "cudnn_version", "driver_version"} <= set(info)
