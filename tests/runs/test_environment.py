"""The device's measured GEMM rate: 2n³ FLOPs over the median of timed products."""

from __future__ import annotations

import itertools

import pytest
import torch

from kfacbench.runs.environment import gemm_gflops

CPU = torch.device("cpu")


def test_the_rate_is_two_n_cubed_over_the_median_time() -> None:
    # Each product is timed between two reads of the clock: these durations, median 0.75 s.
    durations = [0.5, 0.25, 2.0, 1.0, 0.75]
    reads = itertools.chain.from_iterable((10.0 * i, 10.0 * i + d) for i, d in enumerate(durations))
    rate = gemm_gflops(CPU, n=16, repeats=5, clock=lambda: next(reads))
    assert rate == pytest.approx(2 * 16**3 / 0.75 / 1e9)


def test_the_measurement_leaves_the_global_random_stream_and_tf32_alone() -> None:
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    before = torch.backends.cuda.matmul.allow_tf32
    assert gemm_gflops(CPU, n=32, repeats=3) > 0
    assert torch.equal(torch.rand(3), want)
    assert torch.backends.cuda.matmul.allow_tf32 == before
