"""The public contract of an optimizer under test: :class:`Method`, its hyperparameters and its
registry entry.

The training core hands a method one minibatch and the shared :class:`PhaseTimer`; the method runs
its own forward/backward/curvature/... passes inside named phases. That is what lets K-FAC draw a
backward pass from sampled targets or compute Fisher-vector products, while every optimizer is
still timed by the same clock (DESIGN.md, "A Method runs its own passes").

A method of one's own is a subclass of :class:`Method` that implements :meth:`Method.step` (and
:meth:`Method.log_values` for the curves' learning-rate column); every other hook the core calls
is declared here with a default. Its hyperparameters are the keyword arguments of its
constructor: :func:`hparams_from` reads their defaults from the signature, so a default is written
once, and adds the help line and the allowed range a suite is validated against.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kfacbench.core.compiling import CompileMode, PhaseCompiled
    from kfacbench.core.problem import Problem
    from kfacbench.core.timing import PhaseTimer
    from kfacbench.distributed import Dist

HParamValue = float | int | str | bool


class Method:
    """An optimizer under test, bound to one model.

    ``step`` must not synchronise with the device (no ``.item()``, no host copies): it returns the
    minibatch loss as a detached device tensor and the core reads losses back in batches. The
    other hooks have defaults that suit a plain first-order optimizer; a method overrides those
    it needs. Two are capabilities as well as hooks: a method that does not override
    :meth:`compiled_phases` cannot run a cell with the ``compile`` setting on, and one that does
    not override :meth:`graph_key` cannot run one with ``cuda_graph`` on (:meth:`supports`).
    """

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """Run one training step on the minibatch ``(x, y)`` inside the timer's phases
        (``forward``, ``backward``, ``update``, ...) and return its (pre-update) loss."""
        raise NotImplementedError(f"{type(self).__name__} does not implement step")

    def log_values(self) -> dict[str, float]:
        """Scalars to log with the loss curve (``lr``, ``damping``, ...).

        Called only at the loop's read-back points, right after it synchronised the device, so
        reading a device scalar here costs no extra sync.
        """
        return {}

    def info(self) -> dict[str, Any]:
        """JSON-able facts about the cell (e.g. which layers were preconditioned): the
        ``method_info`` column."""
        return {}

    def state_bytes(self) -> dict[str, int]:
        """Bytes of the optimizer state the method holds, by kind
        (:data:`~kfacbench.core.memory.STATE_KINDS`: ``factors``, ``inverses``, ``first_order``,
        ``other``): the cells' ``state_mb`` and ``curvature_state_mb``.

        Called after training, since state is allocated at the first steps; counted from the
        tensors' storages, each once (:func:`~kfacbench.core.memory.count_bytes`), so it means
        the same on any device. The default, empty, means unknown (the columns are NaN): a method
        of one's own says what it holds, as kfacbench's methods and peers do.
        """
        return {}

    def batch_size_at(self, step: int, base: int, n: int) -> int:
        """The minibatch size of step ``step`` (K-FAC's growing minibatches) out of ``n``
        training examples; by default the cell's batch size ``base``."""
        return base

    def averaged(self) -> AbstractContextManager[None]:
        """The context evaluation runs in (Polyak-averaged iterates); by default none."""
        return nullcontext()

    def compiled_phases(self) -> dict[str, PhaseCompiled]:
        """Which phases ran compiled (``all`` or ``part``) under the cell's ``compile``
        setting: the ``compiled`` column of the phases table."""
        return {}

    def graph_key(self, step: int) -> Hashable | None:
        """The key of step ``step``'s CUDA graph under the ``cuda_graph`` setting, or ``None``
        to run it eagerly (:mod:`kfacbench.core.graphs` says what a key promises)."""
        return None

    def graph_replayed(self) -> None:
        """Advance host-side state (step counters) as an eager step would have: a replayed
        step runs no Python."""

    def graph_generators(self) -> list[torch.Generator]:
        """The random generators the method's steps draw from, registered with each graph so
        that replays draw fresh numbers."""
        return []

    @classmethod
    def supports(cls, hook: str) -> bool:
        """Whether the method overrides ``hook`` (``compiled_phases``, ``graph_key``): the
        settings that need it refuse a method that does not."""
        return getattr(cls, hook) is not getattr(Method, hook)


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
        origin: where it comes from: ``kfacbench``, a plugin file, an installed package's entry
            point, or a suite's import path (:mod:`kfacbench.plugins`).
    """

    name: str
    summary: str
    hparams: Mapping[str, HParam]
    uses_inv_interval: bool
    build: Callable[[Problem, Mapping[str, Any], MethodContext], Method] = field(repr=False)
    origin: str = "kfacbench"


@dataclass(frozen=True)
class Param:
    """A hyperparameter's declaration beside its constructor argument: the help line and the
    allowed values. The default is not written here: :func:`hparams_from` reads it from the
    signature.

    Attributes:
        help: one line for ``kfacbench list optimizers``.
        bounds: the interval of a numeric one (:class:`Bounds` notation, e.g. ``"[0, 1)"``).
        choices: the allowed strings of a string one.
    """

    help: str
    bounds: str = "(-inf, inf)"
    choices: tuple[str, ...] | None = None


def hparams_from(
    target: Callable[..., Any],
    params: Mapping[str, Param],
    presets: Mapping[str, HParamValue] | None = None,
    helps: Mapping[str, str] | None = None,
) -> dict[str, HParam]:
    """The :class:`HParam` table of a method whose hyperparameters are keyword arguments of
    ``target`` (its class or constructor): each default from ``target``'s signature, or from
    ``presets`` (a named configuration of the same class, e.g. K-FAC-fast's fixed damping), and
    ``helps`` replacing a help line a preset changes the meaning of.

    Raises:
        TypeError: a declared name that is not a keyword argument of ``target`` with a default
            of a hyperparameter type, or a preset of an undeclared name.
    """
    signature = inspect.signature(target)
    presets = dict(presets or {})
    unknown = sorted((set(presets) | set(helps or {})) - set(params))
    if unknown:
        raise TypeError(f"presets of undeclared hyperparameters: {', '.join(unknown)}")
    table: dict[str, HParam] = {}
    for name, param in params.items():
        arg = signature.parameters.get(name)
        if arg is None or arg.default is inspect.Parameter.empty:
            raise TypeError(f"{name!r} is not a keyword argument with a default of {target}")
        default = presets.get(name, arg.default)
        if not isinstance(default, HParamValue):
            raise TypeError(f"{name!r}: default {default!r} is not a bool, int, float or str")
        text = (helps or {}).get(name, param.help)
        table[name] = HParam(default, text, param.choices, param.bounds)
    return table


def method_spec(
    name: str,
    cls: type[Method],
    params: Mapping[str, Param],
    summary: str,
    *,
    uses_inv_interval: bool = False,
    presets: Mapping[str, HParamValue] | None = None,
) -> MethodSpec:
    """The registry entry of a :class:`Method` subclass whose constructor takes the problem and
    its hyperparameters as keyword arguments (their defaults in its signature, declared in
    ``params``: :func:`hparams_from`). A constructor with a ``context`` argument also gets the
    cell's :class:`MethodContext` (seed, device, step budget, ...), and with
    ``uses_inv_interval`` an ``inv_interval`` argument the suite's axis.
    """
    takes_context = "context" in inspect.signature(cls).parameters

    def build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> Method:
        return cls(problem, **hp, **({"context": ctx} if takes_context else {}))  # type: ignore[call-arg]

    return MethodSpec(name, summary, hparams_from(cls, params, presets), uses_inv_interval, build)
