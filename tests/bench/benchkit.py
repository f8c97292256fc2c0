"""Helpers of the benchmarks: where they run, and the clock that times one phase."""

from __future__ import annotations

import os
import time

import torch

from kfacbench.core.device import resolve_device
from kfacbench.core.timing import STEP, PhaseTimer


def bench_device() -> torch.device:
    """``$KFACBENCH_BENCH_DEVICE`` (``auto`` by default: CUDA when there is one)."""
    return resolve_device(os.environ.get("KFACBENCH_BENCH_DEVICE", "auto"))


class PhaseClock:
    """A pytest-benchmark timer that advances only while one phase runs.

    Returns the seconds of ``phase`` recorded so far by ``timer`` (flushing CUDA events first, one
    synchronisation per reading), so ``clock() - clock()`` around a training step is the time of
    that phase in the step. Unbound, it is ``time.perf_counter``.
    """

    def __init__(self) -> None:
        self.timer: PhaseTimer | None = None
        self.phase = STEP

    def bind(self, timer: PhaseTimer, phase: str) -> None:
        """Read ``phase`` of ``timer`` from now on."""
        self.timer, self.phase = timer, phase

    def __call__(self) -> float:
        if self.timer is None:
            return time.perf_counter()
        self.timer.flush()
        return sum(self.timer.durations(self.phase)) / 1e3

    def __repr__(self) -> str:
        return f"PhaseClock({self.phase})"
