"""PhaseTimer on CPU (the CUDA path is exercised on a GPU machine)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kfacbench.core.timing import PhaseTimer, measure_overhead, summarise

CPU = torch.device("cpu")


def test_phases_are_timed_per_call() -> None:
    timer = PhaseTimer(CPU)
    for _ in range(3):
        with timer.step():
            with timer.phase("forward"):
                time.sleep(0.01)
            with timer.phase("update"):
                pass
    assert timer.phases() == ["forward", "update", "step"]
    assert len(timer.durations("forward")) == 3
    assert min(timer.durations("forward")) >= 10.0
    assert max(timer.durations("update")) < 5.0
    step = {s.phase: s for s in timer.stats()}["step"]
    assert step.calls == 3 and step.median_ms >= 10.0


def test_summary_percentiles_match_numpy() -> None:
    ms = [float(v) for v in np.random.default_rng(0).exponential(3.0, size=101)]
    stats = summarise("x", ms)
    assert stats.median_ms == pytest.approx(np.median(ms))
    assert stats.p10_ms == pytest.approx(np.percentile(ms, 10))
    assert stats.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert stats.total_s == pytest.approx(sum(ms) / 1e3)


def test_overhead_is_measured_and_small() -> None:
    per_call = measure_overhead(CPU, calls=500)
    assert 0.0 < per_call < 0.1  # ms; a generator context manager costs about a microsecond


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA-event timing)")
def test_cuda_events_resolve_on_flush() -> None:
    device = torch.device("cuda")
    timer = PhaseTimer(device)
    a = torch.randn(2048, 2048, device=device)
    with timer.phase("gemm"):
        a @ a
    assert timer.durations("gemm") == []  # pending until flushed
    timer.flush()
    assert len(timer.durations("gemm")) == 1 and timer.durations("gemm")[0] > 0
