"""PhaseTimer: per-phase step times without a host sync per step.

On a GPU, kernel launches are asynchronous, so a host clock read around a phase measures only the
launch cost. The timer therefore records a pair of CUDA events around each phase and resolves them
in batches (:meth:`PhaseTimer.flush`, called by the loop at its read-back points), which costs one
synchronisation per batch instead of one per phase. On a CPU, operations are synchronous and
``time.perf_counter`` around the phase is exact.

The timer's own cost is measured (:func:`measure_overhead`) and reported next to the step time, so
a user can check that instrumenting seven phases does not distort a short SGD step.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch

ANNOTATION_PREFIX = "kfacbench/"
"""Prefix of the profiler ranges of the phases (``kfacbench/forward``, ...)."""

STEP = "step"
"""Name under which the whole step (all phases plus the gaps between them) is recorded."""

REFRESH_PHASE = "inverse"
"""The phase a second-order method pays at its refreshes (every ``inv_interval`` steps): a step
that runs it is a refresh step."""


NVTX = os.environ.get("KFACBENCH_NVTX") == "1"
"""Whether CUDA phases are NVTX ranges outside torch.profiler sessions too (for Nsight Systems)."""


@contextmanager
def _nvtx(name: str) -> Iterator[None]:
    """An NVTX range named like the profiler range."""
    torch.cuda.nvtx.range_push(f"{ANNOTATION_PREFIX}{name}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


@dataclass(frozen=True)
class PhaseStats:
    """Summary of one phase over a cell: the row of the ``phases`` table."""

    phase: str
    calls: int
    total_s: float
    median_ms: float
    p10_ms: float
    p90_ms: float


class PhaseTimer:
    """Times named phases of training steps on one device.

    Use ``with timer.step(): ...`` around a whole step and ``with timer.phase("forward"): ...``
    inside it. Durations are kept per call in milliseconds.

    Args:
        device: the device the work runs on; CUDA devices are timed with events.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._durations: dict[str, list[float]] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._free_events: list[torch.cuda.Event] = []  # reused: creating events costs host time

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the enclosed block as one call of phase ``name``.

        While a torch.profiler session is active the block is also a ``record_function`` range
        named ``kfacbench/<name>`` (and an NVTX range on CUDA, for Nsight Systems), so traces show
        the phases as spans. The check is a flag read (~0.1 µs); an unconditional range would cost
        ~6 µs per phase on every timed step. Set ``KFACBENCH_NVTX=1`` to get the NVTX ranges
        without the torch profiler (``nsys profile kfacbench run ...``).
        """
        profiling = torch.autograd._profiler_enabled()
        if not (profiling or (self._cuda and NVTX)):
            yield from self._timed(name)
            return
        with ExitStack() as ranges:
            if profiling:
                ranges.enter_context(torch.profiler.record_function(f"{ANNOTATION_PREFIX}{name}"))
            if self._cuda:
                ranges.enter_context(_nvtx(name))
            yield from self._timed(name)

    def _timed(self, name: str) -> Iterator[None]:
        if self._cuda:
            start, end = self._event(), self._event()
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._record(name, (time.perf_counter() - t0) * 1e3)

    def step(self) -> AbstractContextManager[None]:
        """Time a whole training step (recorded as phase ``"step"``)."""
        return self.phase(STEP)

    def mark(self) -> tuple[dict[str, int], int]:
        """A position in the record, for :meth:`discard_since`."""
        return {name: len(ms) for name, ms in self._durations.items()}, len(self._pending)

    def discard_since(self, mark: tuple[dict[str, int], int]) -> None:
        """Forget every call recorded after ``mark`` (a step that compiled: its times are the
        compiler's, not the step's)."""
        counts, pending = mark
        for name in list(self._durations):
            del self._durations[name][counts.get(name, 0) :]
            if not self._durations[name]:
                del self._durations[name]
        for _, start, end in self._pending[pending:]:
            self._free_events += (start, end)
        del self._pending[pending:]

    def _event(self) -> torch.cuda.Event:
        if self._free_events:
            return self._free_events.pop()
        return torch.cuda.Event(enable_timing=True)

    def _record(self, name: str, ms: float) -> None:
        self._durations.setdefault(name, []).append(ms)

    def flush(self) -> None:
        """Resolve pending CUDA events (one synchronisation for all of them)."""
        if not self._pending:
            return
        self._pending[-1][2].synchronize()
        for name, start, end in self._pending:
            self._record(name, start.elapsed_time(end))
            self._free_events += (start, end)
        self._pending.clear()

    def durations(self, name: str) -> list[float]:
        """Per-call durations of phase ``name`` in ms (after :meth:`flush`)."""
        return list(self._durations.get(name, []))

    def all_durations(self) -> dict[str, list[float]]:
        """Per phase, its per-call durations in ms (flushes first)."""
        self.flush()
        return {name: list(ms) for name, ms in self._durations.items()}

    def phases(self) -> list[str]:
        """Phase names seen so far, in first-seen order."""
        return list(self._durations)

    def stats(self) -> list[PhaseStats]:
        """One :class:`PhaseStats` per phase seen (flushes first)."""
        self.flush()
        return [summarise(name, ms) for name, ms in self._durations.items()]


def summarise(name: str, ms: list[float]) -> PhaseStats:
    """Median and 10th/90th percentiles of per-call durations (ms)."""
    if len(ms) == 1:
        p10 = p90 = ms[0]
    else:
        deciles = statistics.quantiles(ms, n=10, method="inclusive")
        p10, p90 = deciles[0], deciles[-1]
    return PhaseStats(
        phase=name,
        calls=len(ms),
        total_s=sum(ms) / 1e3,
        median_ms=statistics.median(ms),
        p10_ms=p10,
        p90_ms=p90,
    )


def measure_overhead(device: torch.device, calls: int = 2000) -> float:
    """Host-side cost in ms of one empty ``timer.phase`` enter/exit on ``device``.

    The host cost is what delays the work: on CPU it adds directly to the step, on GPU it delays
    kernel launches (event records themselves take negligible device time). The loop multiplies it
    by the number of phase calls per step to report the timer's overhead per step.
    """
    timer = PhaseTimer(device)
    for _ in range(50):  # warm up allocators and the event pool
        with timer.phase("overhead"):
            pass
    timer.flush()
    t0 = time.perf_counter()
    for _ in range(calls):
        with timer.phase("overhead"):
            pass
    elapsed = time.perf_counter() - t0
    timer.flush()
    return elapsed * 1e3 / calls
