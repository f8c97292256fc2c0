"""Whole-step CUDA graphs: a method's non-refresh steps replayed from captured graphs.

A short step on a GPU is bound by kernel launches, not arithmetic: the autoencoders' SGD step ran
about 10× above its FLOP floor on an H200. A CUDA graph launches a whole step's kernels at once.
The ``cuda_graph`` run setting turns it on for methods that say which of their steps a graph may
replay, through two hooks of :class:`~kfacbench.core.method.Method`:

- ``graph_key(step)``: ``None`` for a step that must run eagerly (a refresh, a step whose scalar
  kernel arguments still change, such as K-FAC's moving-average weight before it saturates);
  otherwise a hashable key such that every step with that key launches the same kernels with the
  same scalar arguments on the same tensors. The method keeps every tensor it reads across steps at
  a fixed address, updating it in place (refreshes included), since a graph replays into the
  memory it was captured with.
- ``graph_replayed()``: advance the host-side state (step counters) as the step would have, since
  a replay runs no Python.

A method also names the random generators its steps draw from (``graph_generators()``): they are
registered with each graph so replays draw fresh numbers.

:class:`StepGraphs` captures a key's graph the third time the key comes up (the two eager steps
before it are the warm-up PyTorch asks for: lazy library handles, autograd's first pass) and
replays it afterwards. Capturing is host work kept off the training clock, like compiling. The
minibatch is gathered into static input buffers inside the timed step, and the loss, an output of
the graph that the next replay overwrites, is copied out.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

import torch

from kfacbench.core.method import Method
from kfacbench.core.timing import PhaseTimer

GRAPH_WARMUP = 2
"""Eager steps of a key before its graph is captured (PyTorch's CUDA-graph notes ask for warm-up
iterations: lazily created library handles and workspaces must not be first allocated inside a
capture)."""


class SilentTimer(PhaseTimer):
    """A timer whose phases record nothing: the method's step runs under it while being captured
    (recording timing events inside a capture is not allowed, and a graph is timed whole)."""

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    y: torch.Tensor
    loss: torch.Tensor


class StepGraphs:
    """The CUDA graphs of one cell's steps, one per key, sharing one memory pool.

    Args:
        method: the method under test; it must override ``graph_key`` (and
            ``graph_replayed``).
        device: a CUDA device.
    """

    def __init__(self, method: Method, device: torch.device) -> None:
        if not method.supports("graph_key"):
            raise TypeError(f"{type(method).__name__} does not override Method.graph_key")
        self.method = method
        self.device = device
        self.generators = method.graph_generators()
        self._graphs: dict[Hashable, _Graph] = {}
        self._seen: dict[Hashable, int] = {}
        self._pool: Any = None  # one memory pool for all the cell's graphs
        self.replayed = 0
        self.capture_s = 0.0

    @property
    def captured(self) -> int:
        """Graphs captured so far."""
        return len(self._graphs)

    def plan(self, step: int, batch: int) -> Hashable | None:
        """The key to replay step ``step`` (of ``batch`` examples) from, or ``None``: run it
        eagerly (the method asked for it, or the key is still warming up)."""
        key = self.method.graph_key(step)
        if key is None:
            return None
        key = (key, batch)
        if key in self._graphs:
            return key
        self._seen[key] = self._seen.get(key, 0) + 1
        return key if self._seen[key] > GRAPH_WARMUP else None

    def step(
        self,
        key: Hashable,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        idx: torch.Tensor,
        timer: PhaseTimer,
    ) -> torch.Tensor:
        """One step from ``key``'s graph on the minibatch ``idx`` of ``(x_all, y_all)``; the
        graph is captured first when it is new (off the timed step: :attr:`capture_s`)."""
        fresh = key not in self._graphs
        if fresh:
            started = time.perf_counter()
            self._graphs[key] = self._capture(x_all, y_all, idx.shape[0])
            self.capture_s += time.perf_counter() - started
        g = self._graphs[key]
        with timer.step():
            torch.index_select(x_all, 0, idx, out=g.x)
            if g.y is not g.x:
                torch.index_select(y_all, 0, idx, out=g.y)
            g.graph.replay()
            loss = g.loss.clone()
        if not fresh:  # the capture ran the step's Python, host counters included
            self.method.graph_replayed()
        self.replayed += 1
        return loss

    def _capture(self, x_all: torch.Tensor, y_all: torch.Tensor, batch: int) -> _Graph:
        x = torch.empty((batch, *x_all.shape[1:]), dtype=x_all.dtype, device=self.device)
        # An autoencoder's targets are its inputs: one buffer, as in the eager step.
        y = (
            x
            if y_all is x_all
            else torch.empty((batch, *y_all.shape[1:]), dtype=y_all.dtype, device=self.device)
        )
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        register = getattr(graph, "register_generator_state", None)
        if self.generators and register is None:
            raise RuntimeError(
                "cuda_graph: this torch cannot register a method's own random generator with a"
                " CUDA graph (CUDAGraph.register_generator_state, torch >= 2.5)"
            )
        for generator in self.generators:
            register(generator)  # type: ignore[misc]
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self.method.step(x, y, SilentTimer(self.device))
        except RuntimeError as exc:
            raise RuntimeError(
                f"cuda_graph: capturing a step of {type(self.method).__name__} failed: {exc}"
            ) from exc
        return _Graph(graph, x, y, loss)


def _matches(old: object, new: object) -> bool:
    """Whether ``new`` has ``old``'s layout: tensors of the same shape, dtype and device, or
    dataclasses whose tensor fields match and whose other fields are equal."""
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        return (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device)
    if not (is_dataclass(old) and type(old) is type(new)):
        return False
    for f in fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            if not _matches(a, b):
                return False
        elif a != b:
            return False
    return True


def _copy(old: object, new: object) -> None:
    if isinstance(old, torch.Tensor):
        assert isinstance(new, torch.Tensor)
        old.copy_(new)
        return
    for f in fields(old):  # type: ignore[arg-type]
        a = getattr(old, f.name)
        if isinstance(a, torch.Tensor):
            a.copy_(getattr(new, f.name))


def land(owner: object, name: str, value: object, in_place: bool) -> bool:
    """Store ``value`` as ``owner.name``; with ``in_place``, by copying it into what is there
    (a tensor, or a dataclass of tensors such as a damped inverse) when the layout matches.

    A refresh under CUDA graphs lands this way: the graphs read the memory they were captured
    with, so a refresh must write there. Returns whether an existing value was replaced by a new
    object instead (its layout changed, e.g. a system that moved to float64): graphs that read it
    are stale, and the method's graph key must change.
    """
    old = getattr(owner, name)
    if in_place and old is not None and _matches(old, value):
        _copy(old, value)
        return False
    setattr(owner, name, value)
    return old is not None
