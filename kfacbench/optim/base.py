"""The Method protocol every optimizer under test implements, and its registry entry.

The training core hands a method one minibatch and the shared :class:`PhaseTimer`; the method runs
its own forward/backward/curvature/... passes inside named phases. That is what lets K-FAC draw a
backward pass from sampled targets or compute Fisher-vector products, while every optimizer is
still timed by the same clock (DESIGN.md, "A Method runs its own passes").
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from kfacbench.core.compiling import CompileMode
    from kfacbench.core.problem import Problem
    from kfacbench.core.timing import PhaseTimer
    from kfacbench.distributed import Dist

HParamValue = float | int | str | bool


class Method(Protocol):
    """An optimizer under test, bound to one model.

    ``step`` must not synchronise with the device (no ``.item()``, no host copies): it returns the
    minibatch loss as a detached device tensor and the core reads losses back in batches.
    Optional hooks the core uses when a method defines them:

    - ``info() -> dict``: JSON-able facts about the cell (e.g. which layers were
      preconditioned); stored in the ``method_info`` column.
    - ``batch_size_at(step, base, n) -> int``: the minibatch size of step ``step`` (K-FAC's
      growing minibatches); by default the cell's batch size.
    - ``averaged() -> ContextManager``: evaluation runs inside it (Polyak-averaged iterates).
    - ``compiled_phases() -> dict``: which phases ran compiled (``all`` or ``part``) under the
      cell's ``compile`` setting; the ``compiled`` column of the phases table. A method without
      it cannot run a cell with ``compile`` on.
    - ``graph_key(step)``, ``graph_replayed()`` and optionally ``graph_generators()``: which
      steps a CUDA graph may replay under the ``cuda_graph`` setting
      (:mod:`kfacbench.core.graphs`). A method without them cannot run a cell with it on.
    """

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """Run one training step on the minibatch ``(x, y)`` and return its (pre-update) loss."""
        ...

    def log_values(self) -> dict[str, float]:
        """Scalars to log with the loss curve (``lr``, ``damping``, ...).

        Called only at the loop's read-back points, right after it synchronised the device, so
        reading a device scalar here costs no extra sync.
        """
        ...


@contextmanager
def fp32_matmuls() -> Iterator[None]:
    """Full-float32 CUDA matmuls inside the block, whatever the cell's ``tf32`` setting.

    TF32 keeps 10 mantissa bits. That suits the forward and backward passes, but a second-order
    method's own arithmetic takes differences of large terms: factors accumulated from many rows,
    eigenbasis products, Woodbury updates, the exact-Fisher quadratic model. With TF32 there,
    Cholesky factorisations fail more often and λ's ρ is noise. A flag write each way, no sync.
    """
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def gradients(params: Sequence[torch.Tensor], weight_decay: float = 0.0) -> list[torch.Tensor]:
    """``.grad`` of each parameter (zeros for one the last backward pass did not reach), plus
    ``weight_decay`` times the parameter: ∇h = ∇(mean loss) + ηθ when η is part of the objective
    (K-FAC's and SKFAC's convention)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if weight_decay:
        grads = list(torch._foreach_add(grads, list(params), alpha=weight_decay))
    return grads


INT64_MAX = 2**63 - 1
"""The largest integer a cell may hold: seeds, sizes and step counts become int64 tensors and
generator seeds, so a larger one would pass validation and fail only inside torch."""

_INTERVAL = re.compile(r"([\[(])\s*(-?inf|[-+0-9.e]+)\s*,\s*(-?inf|[-+0-9.e]+)\s*([\])])")


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric hyperparameter lies in, written as in maths: ``"[0, 1)"``,
    ``"(0, inf)"``. An infinite end means unbounded on that side; the value itself must always
    be finite (an ``inf`` learning rate or damping passes a plain ``>= 0`` check and then trains
    nothing, or never ends)."""

    low: float
    high: float
    low_open: bool
    high_open: bool

    @classmethod
    def parse(cls, text: str) -> Bounds:
        """``"[0, 1)"`` → 0 ≤ x < 1; ``"(0, inf)"`` → x > 0."""
        match = _INTERVAL.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"not an interval: {text!r} (write e.g. '[0, 1)' or '(0, inf)')")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "(", right == ")")

    def integral(self) -> Bounds:
        """The same interval for integers: closed integer ends, capped to int64. The ends are
        ints, which compare exactly with ints (``float(INT64_MAX)`` would round up to 2**63)."""
        if self.low < -INT64_MAX:
            low = -INT64_MAX - 1
        else:
            low = math.floor(self.low) + 1 if self.low_open else math.ceil(self.low)
        if self.high > INT64_MAX:
            high = INT64_MAX
        else:
            high = math.ceil(self.high) - 1 if self.high_open else math.floor(self.high)
        return Bounds(low, high, False, False)

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return (
            f"{'(' if self.low_open else '['}{_end(self.low)}, "
            f"{_end(self.high)}{')' if self.high_open else ']'}"
        )


def _end(x: float) -> str:
    if x == INT64_MAX:
        return "2**63-1"
    if x == -INT64_MAX - 1:
        return "-2**63"
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:.15g}"


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its type, default and allowed values.

    Suites are validated against these, so an unknown, ill-typed or out-of-range hyperparameter is
    an error that names the key instead of a silently ignored setting or a cell that cannot run.

    Attributes:
        default: the value when a suite sets none; its type is the type values must have.
        help: one line for ``kfacbench list optimizers``.
        choices: the allowed strings of a string hyperparameter.
        bounds: the interval of a numeric one (:class:`Bounds` notation, e.g. ``"[0, 1)"``);
            numbers are always finite and integers always fit int64.
    """

    default: HParamValue
    help: str
    choices: tuple[str, ...] | None = None
    bounds: str = "(-inf, inf)"

    def __post_init__(self) -> None:
        if self.kind in (int, float) and self.default not in self.interval:
            raise ValueError(f"default {self.default!r} outside {self.bounds}")

    @property
    def kind(self) -> type:
        """The Python type values must have (bool, int, float or str)."""
        return type(self.default)

    @property
    def interval(self) -> Bounds:
        """:attr:`bounds` parsed, int64-capped for integers."""
        bounds = Bounds.parse(self.bounds)
        return bounds.integral() if self.kind is int else bounds


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it is part of.

    Attributes:
        total_steps: the step budget of the cell (for schedules); ``None`` when only a time budget
            is set, in which case schedules that need a horizon raise.
        seed: the cell's seed, for any randomness the method draws (sampled Fisher targets, ...).
        device: the device the model lives on.
        dist: the process group of a data-parallel run (``None``: one process). Methods with
            curvature share it over the ranks (:mod:`kfacbench.distributed`).
        compile: the cell's ``compile`` setting: which torch.compile mode the method's
            compilable regions use (:mod:`kfacbench.core.compiling`).
        cuda_graph: the cell's ``cuda_graph`` setting: steps may be replayed from CUDA graphs,
            so a refresh must land in the memory the graphs read (:mod:`kfacbench.core.graphs`).
    """

    total_steps: int | None
    seed: int
    device: torch.device
    dist: Dist | None = None
    compile: CompileMode = "off"
    cuda_graph: bool = False


@dataclass(frozen=True)
class MethodSpec:
    """A registry entry: how to build a method and which hyperparameters it takes.

    Attributes:
        name: registry name used in suites (``sgd``, ``kfac``, ...).
        summary: one line for ``kfacbench list``.
        hparams: every hyperparameter with its default; suites may sweep any of them.
        uses_inv_interval: whether the suite's ``inv_interval`` axis applies. When it does not, the
            axis collapses for this method instead of multiplying its cells.
        build: ``build(problem, hparams, context)`` returns a ready :class:`Method`. ``hparams``
            holds every key of ``self.hparams`` (defaults filled in) plus ``inv_interval`` when
            ``uses_inv_interval``.
    """

    name: str
    summary: str
    hparams: Mapping[str, HParam]
    uses_inv_interval: bool
    build: Callable[[Problem, Mapping[str, Any], MethodContext], Method] = field(repr=False)


class IterateAverage:
    """Exponential (Polyak) averaging of parameters, for evaluation only.

    θ̄ ← decay·θ̄ + (1 − decay)·θ after every step, on the device (one fused lerp); ``swapped()``
    puts θ̄ into the model for an eval and restores θ afterwards. Used by K-FAC's experiments
    (Martens & Grosse 2015, §13) to report the loss of the averaged iterates.
    """

    def __init__(self, params: Sequence[torch.Tensor], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current parameters into the average."""
        torch._foreach_lerp_(self.average, self.params, 1.0 - self.decay)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The averaged parameters in place of the current ones, for the enclosed block."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)
