"""Ops per step and phase: a proxy for a GPU step's launch cost that any device measures.

On a GPU the autoencoders' steps are launch-bound: every op that computes something is at least
one kernel launch (a few µs of host time each, whatever its size), so a change that adds a few
small ops per layer slows the step there while a CPU timing barely moves. The number of ops a
step dispatches does not depend on how fast the device runs them, so counting it on CPU shows
that creep in CI.

What counts: every op that reaches the dispatcher's Python key (a ``TorchDispatchMode``), i.e.
after autograd and after composite ops decomposed into the ops with kernels of their own,
backward pass included (autograd dispatches its ops like any other). An op's own internal calls
are not seen (the mode is off inside it), so ``zeros`` or a ``_foreach_*`` op over many tensors
counts once: one fill, and one fused launch (one per chunk of tensors) on a GPU. Three kinds of
ops launch no kernel and are left out:

- views: an op whose schema returns an alias of an input it does not write
  (``OpOverload.is_view``: ``view``, ``t``, ``transpose``, ``expand``, ``as_strided``,
  ``detach``, ``alias``, ``slice``, ``select``, ``unsqueeze``, ``squeeze``, ``permute``,
  ``split``, ``unbind``, ...) only makes new tensor metadata; ``_unsafe_view`` too, a view
  whose schema does not say so (``reshape``'s result inside ``matmul``);
- allocations (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``,
  ``new_empty_strided``): the caching allocator hands out memory without a kernel;
- an op whose result is a tensor without elements (a copy into an empty slice): torch's CUDA
  ops return before launching.

In-place and ``out=`` ops write into an alias and do count. A method that takes another path on
another device counts the path of the device it ran on.

Counting costs a Python call per op, so it never runs in a timed step: the runner counts on a
few separate probe steps of a fresh copy of the cell after its timed run
(:func:`kfacbench.runner.probe_ops`), and :func:`phase_ops` turns them into the ``ops_per_step``
and ``refresh_ops`` columns of the phases table.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kfacbench.core.loop import LoopConfig, MinibatchSampler
from kfacbench.core.method import Method
from kfacbench.core.timing import REFRESH_PHASE, STEP, PhaseTimer
from kfacbench.data import Splits

PROBE_STEPS = 6
"""Probe steps per cell: K-FAC refreshes at its first three steps, and three plain steps after
them give a median that an occasional extra (Levenberg–Marquardt every fifth step) does not
move."""

_aten = torch.ops.aten
NO_KERNEL = frozenset(
    {
        _aten._unsafe_view,
        _aten.empty,
        _aten.empty_like,
        _aten.empty_strided,
        _aten.new_empty,
        _aten.new_empty_strided,
    }
)
"""Op packets that launch no kernel although their schema is not a view's (module docstring)."""


@functools.cache
def launches(func: torch._ops.OpOverload) -> bool:
    """Whether ``func`` launches a kernel: not a view, not an allocation (module docstring). An op
    on no elements launches none either; the counter sees that from its result."""
    return not func.is_view and func.overloadpacket not in NO_KERNEL


class OpCountingTimer(PhaseTimer):
    """A :class:`PhaseTimer` whose phases count the ops launched inside them instead of timing.

    A method's ``step`` takes it as it takes the timer of a timed step, so the ops are attributed
    to the same phases. An op counts in every phase open around it, as a phase's time includes
    its nested phases': ``step`` gets all of them, the gaps between phases included. Counting
    happens inside :meth:`counting`; :attr:`steps` holds, per finished step, the ops of each
    phase that ran in it (0 for a phase that ran and launched nothing).
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.steps: list[dict[str, int]] = []
        self._open: list[str] = []
        self._step: Counter[str] = Counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the enclosed block's ops as phase ``name``'s (nothing is timed)."""
        self._open.append(name)
        self._step[name] += 0  # ran, even if it launches nothing
        try:
            yield
        finally:
            self._open.pop()
        if name == STEP:
            self.steps.append(dict(self._step))
            self._step.clear()

    def count(self) -> None:
        """One op launched now."""
        for name in set(self._open):
            self._step[name] += 1

    def counting(self) -> TorchDispatchMode:
        """The dispatch mode that counts, to enter around the steps."""
        return _Counting(self)


class _Counting(TorchDispatchMode):
    def __init__(self, timer: OpCountingTimer) -> None:
        super().__init__()
        self.timer = timer

    def __torch_dispatch__(
        self,
        func: torch._ops.OpOverload,
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if launches(func) and not (isinstance(out, torch.Tensor) and out.numel() == 0):
            self.timer.count()
        return out


def count_steps(
    method: Method, data: Splits, config: LoopConfig, steps: int = PROBE_STEPS
) -> list[dict[str, int]]:
    """Per step, the ops of each phase over ``steps`` steps of ``method``, drawn and run as the
    training loop runs its steps (:func:`kfacbench.core.loop.train`: the same seeded minibatches,
    gathered inside the step), so they are the timed run's first steps again."""
    device = data.train_x.device
    sampler = MinibatchSampler(data.train_x.shape[0], config.batch_size, config.seed, device)
    timer = OpCountingTimer(device)
    with timer.counting():
        for step in range(steps):
            idx = sampler.next(method.batch_size_at(step, config.batch_size, sampler.n))
            with timer.step():
                method.step(data.train_x[idx], data.train_y[idx], timer)
    return timer.steps


@dataclass(frozen=True)
class PhaseOps:
    """The op counts of one phase: its columns of the phases table.

    Attributes:
        ops_per_step: the median over the probe's plain steps (those without the refresh phase)
            of the ops the phase launched in one step, 0 in a step it did not run in; NaN when it
            ran in none of them (``inverse``) or the probe had none.
        refresh_ops: the same over the probe's refresh steps; NaN without any (SGD).
    """

    ops_per_step: float
    refresh_ops: float


def phase_ops(steps: Sequence[Mapping[str, int]]) -> dict[str, PhaseOps]:
    """Per phase seen in ``steps`` (:meth:`OpCountingTimer.steps`), its :class:`PhaseOps`. A
    step is a refresh step when the refresh phase (``inverse``) ran in it."""
    refresh = [s for s in steps if REFRESH_PHASE in s]
    plain = [s for s in steps if REFRESH_PHASE not in s]
    names = dict.fromkeys(name for s in steps for name in s)
    return {name: PhaseOps(_median(plain, name), _median(refresh, name)) for name in names}


def _median(steps: Sequence[Mapping[str, int]], name: str) -> float:
    if not any(name in s for s in steps):
        return math.nan
    return float(statistics.median(s.get(name, 0) for s in steps))
