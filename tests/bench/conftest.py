"""pytest-benchmark configuration of the step and phase benchmarks.

Benchmarks are disabled in the ordinary test run (``--benchmark-disable`` in pyproject's
addopts): there every benchmark runs its target a few times as a test that the phase it times
still exists. Measure with ``pytest tests/bench --benchmark-enable``.
"""

from __future__ import annotations

from typing import Any

import pytest
from benchkit import bench_device

from kfacbench.runs.environment import environment


def pytest_benchmark_update_machine_info(
    config: pytest.Config, machine_info: dict[str, Any]
) -> None:
    """Record the device, driver, CUDA, cuDNN and torch build, and whether subnormal floats are
    flushed (``tests/conftest.py`` applies the setting), with every saved benchmark, so
    ``--benchmark-compare`` warns when two files come from different setups."""
    env = environment(bench_device())
    for key in (
        "device_kind",
        "device_name",
        "torch_version",
        "cuda_version",
        "cudnn_version",
        "driver_version",
        "torch_threads",
        "flush_denormal",
        "kfacbench_version",
    ):
        machine_info[key] = env[key]
