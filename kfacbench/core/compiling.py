"""Compiled steps: the ``compile`` run setting, and the clock that keeps compilation off the books.

A cell with ``compile = "default" | "max-autotune" | "reduce-overhead"`` runs the regions of its
method's step that can be traced through ``torch.compile`` (inductor; ``reduce-overhead`` also
captures CUDA graphs on a GPU). Which phases ran compiled is the ``compiled`` column of the phases
table (``all``, ``part`` or ``no``), because a method cannot compile everything: K-FAC's and
SKFAC's forward and backward passes record layer inputs and output gradients through module
hooks that torch.compile would trace away, so they stay eager and say so.

Compilation happens inside the first steps that reach each region (and again on a recompile).
:class:`CompileClock` times it with the compiler's own start/end callbacks, so the loop can keep
it out of the training time and drop the steps it fell into from the phase statistics; the total
is the cell's ``compile_s`` column.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar, cast

import torch

CompileMode = Literal["off", "default", "max-autotune", "reduce-overhead"]
COMPILE_MODES: tuple[CompileMode, ...] = ("off", "default", "max-autotune", "reduce-overhead")
"""The values of the ``compile`` run setting: ``off`` runs every step eagerly."""

PhaseCompiled = Literal["all", "part", "no"]
"""How much of a phase's work ran compiled (the phases table's ``compiled`` column)."""

F = TypeVar("F", bound=Callable[..., Any])


def compiled(fn: F, mode: CompileMode, *, in_place: bool = False) -> F:
    """``fn`` compiled with torch.compile in ``mode``, or ``fn`` itself when ``mode`` is off.

    ``dynamic=False``: the shapes of a cell are fixed (K-FAC's growing minibatches recompile at
    most a few times, each timed by :class:`CompileClock`), and static shapes give the best
    kernels.

    ``in_place``: ``fn`` only updates its inputs (an optimizer's parameters and buffers) and
    returns nothing. Under ``reduce-overhead`` it is compiled without CUDA graphs: cudagraph
    trees skip such a graph (mutated inputs) or, on its re-recording, crashed the process
    (torch 2.11, H200: a segfault in inductor's static Triton launcher, 2026-11-30), and one
    fused foreach launch per step has no launch overhead to save.
    """
    if mode == "off":
        return fn
    torch_mode = None if mode == "default" or (in_place and mode == "reduce-overhead") else mode
    return cast(F, torch.compile(fn, mode=torch_mode, dynamic=False))


def load_compiler() -> None:
    """Import torch's compiler stack once per process, before the first cell.

    ``torch.optim``'s optimizers and the compile clock import ``torch._dynamo`` on first use
    (about a second on a 2-core CPU): it is the process's start-up, which would otherwise land
    in whichever cell comes first and in no other.
    """
    importlib.import_module("torch._dynamo.convert_frame")


def fresh_caches() -> None:
    """Forget every compiled region of earlier cells (``torch._dynamo.reset``).

    Dynamo keeps compiled code per Python function across objects: without this a suite's later
    cells would reuse, or pile guards onto, the regions of the cells before them, and their
    ``compile_s`` would depend on their place in the suite.
    """
    torch._dynamo.reset()


def phase_column(compiled_phases: dict[str, PhaseCompiled], phase: str) -> PhaseCompiled:
    """The ``compiled`` value of ``phase``: a whole step counts as ``part`` when any of its
    phases ran compiled."""
    if phase in compiled_phases:
        return compiled_phases[phase]
    if phase == "step" and any(v != "no" for v in compiled_phases.values()):
        return "part"
    return "no"


class CompileClock:
    """Wall-clock seconds spent compiling while it is installed.

    Counts every compilation torch reports through ``torch._dynamo.callback_handler``: dynamo
    tracing a new frame (or recompiling one whose guards failed), a backward graph compiled at
    its first use, CUDA-graph recording. Use it as a context manager around a cell's training.

    While installed, a region that reaches dynamo's recompile limit raises instead of running
    eagerly from then on: a "compiled" cell must not quietly time eager steps.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.events = 0
        self._started: float | None = None
        self._strict = torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)

    def _start(self, *args: object) -> None:
        self._started = time.perf_counter()

    def _end(self, *args: object) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self.events += 1
            self._started = None

    def __enter__(self) -> CompileClock:
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._start)
        handler.register_end_callback(self._end)
        self._strict.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        handler = torch._dynamo.callback_handler
        handler.remove_start_callback(self._start)
        handler.remove_end_callback(self._end)
        self._strict.__exit__(None, None, None)
