"""Benchmarks of whole training steps and of the curvature, inverse and precondition phases.

One benchmark per (optimizer preset × small workload × phase). Each round is one real training
step through ``Method.step`` with every phase due (inversion interval 1), so the phase runs in the
state it has inside training; the benchmark's clock is :class:`PhaseClock`, which advances only
while the benchmarked phase runs. It reads the :class:`~kfacbench.core.timing.PhaseTimer` the suite
runner uses: CUDA events on a GPU (pytest-benchmark's default clock would time kernel launches,
not kernels), ``perf_counter`` on a CPU.

Shared machines change speed from minute to minute, so every benchmark first times the SGD step of
the same workload and batch size in the same process, just before, and stores
``extra_info["ratio_to_sgd_step"]``: the figure that compares across runs and machines.

    pytest tests/bench --benchmark-enable                     # measure, print the table
    pytest tests/bench --benchmark-enable --benchmark-autosave   # keep .benchmarks/ for later
    pytest tests/bench --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:15%
"""

from __future__ import annotations

import statistics
import tomllib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from benchkit import PhaseClock, bench_device

from kfacbench.core import subnormals
from kfacbench.core.loop import MinibatchSampler
from kfacbench.core.timing import STEP, PhaseTimer
from kfacbench.optim import METHODS
from kfacbench.runner import DataCache, PreparedCell, RunOptions, prepare_cell
from kfacbench.suite import parse_suite
from kfacbench.workloads import WORKLOADS

WORKLOADS_UNDER_BENCH = [("mnist_ae", 256), ("cifar10_resnet20", 32)]
"""Small workloads: an MLP (dense factors) and a ResNet (convolutions), batch sizes for a CPU."""

PRESETS = ["kfac-fast", "skfac"]
PHASES = [STEP, "curvature", "inverse", "precondition"]
WARMUP_ROUNDS = 3
"""Untimed first steps: allocator growth, lazy initialisation, the first factor refresh."""


CLOCK = PhaseClock()
pytestmark = pytest.mark.benchmark(timer=CLOCK)

SUITE = """
name = "bench"
[defaults]
device = "{device}"
data = "synthetic"
max_steps = 1
[sweep]
workload = ["{workload}"]
batch_size = [{batch_size}]
inv_interval = [1]
[optimizers.{optimizer}]
lr = 0.01
{extra}
"""


@dataclass
class Stepper:
    """One prepared cell and a callable that runs one timed training step of it."""

    cell: PreparedCell
    timer: PhaseTimer
    step: Callable[[], None]


@pytest.fixture(scope="module")
def data() -> DataCache:
    return DataCache(RunOptions(device=str(bench_device())))


def stepper(data: DataCache, workload: str, batch_size: int, optimizer: str) -> Stepper:
    """Build the cell as the suite runner does and a step function like the training loop's."""
    device = bench_device()
    text = SUITE.format(
        device=device,
        workload=workload,
        batch_size=batch_size,
        optimizer=optimizer,
        extra="" if optimizer == "sgd" else "damping = 1.0",
    )
    suite = parse_suite(
        tomllib.loads(text),
        source="<bench>",
        workloads=WORKLOADS,
        methods=METHODS,
        name_default="bench",
    )
    (cell,) = suite.cells
    p = prepare_cell(cell, device, data)
    timer = PhaseTimer(device)
    sampler = MinibatchSampler(p.splits.train_x.shape[0], batch_size, cell.seed, device)
    x, y = p.splits.train_x, p.splits.train_y

    def step() -> None:
        idx = sampler.next()
        with timer.step():
            p.method.step(x[idx], y[idx], timer)

    return Stepper(p, timer, step)


def sgd_step_ms(data: DataCache, workload: str, batch_size: int, rounds: int) -> float:
    """Median SGD step (ms) of the workload, measured now with the same clock and warm-up."""
    s = stepper(data, workload, batch_size, "sgd")
    for _ in range(WARMUP_ROUNDS + rounds):
        s.step()
    s.timer.flush()
    return statistics.median(s.timer.durations(STEP)[WARMUP_ROUNDS:])


def rounds_of(config: pytest.Config) -> int:
    """Timed rounds: ``--benchmark-min-rounds`` (at least 10)."""
    return max(int(config.getoption("benchmark_min_rounds")), 10)


CASES = [
    pytest.param(w, b, "sgd", STEP, id=f"{w}-sgd-{STEP}") for w, b in WORKLOADS_UNDER_BENCH
] + [
    pytest.param(w, b, o, p, id=f"{w}-{o}-{p}")
    for w, b in WORKLOADS_UNDER_BENCH
    for o in PRESETS
    for p in PHASES
]


@pytest.mark.parametrize(("workload", "batch_size", "optimizer", "phase"), CASES)
def test_phase(
    benchmark,  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest,
    data: DataCache,
    workload: str,
    batch_size: int,
    optimizer: str,
    phase: str,
) -> None:
    rounds = rounds_of(request.config)
    benchmark.group = f"{workload} bs={batch_size}"
    reference = sgd_step_ms(data, workload, batch_size, rounds) if benchmark.enabled else None
    s = stepper(data, workload, batch_size, optimizer)
    CLOCK.bind(s.timer, phase)
    try:
        benchmark.pedantic(s.step, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)
    finally:
        CLOCK.timer = None
    # The phase must have run in every step: a renamed or skipped phase would time nothing.
    s.timer.flush()
    timed = s.timer.durations(phase)
    assert len(timed) == len(s.timer.durations(STEP)) > 0, f"{phase} did not run in every step"
    # The rounds ran with subnormal floats flushed on every thread, as suites run them.
    assert subnormals.flushing() is subnormals.wanted()
    benchmark.extra_info.update(
        workload=workload,
        batch_size=batch_size,
        optimizer=optimizer,
        phase=phase,
        device=str(bench_device()),
    )
    if reference is not None:
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(sgd_step_ms=reference, ratio_to_sgd_step=median_ms / reference)
