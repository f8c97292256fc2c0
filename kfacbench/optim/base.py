"""The Method protocol every optimizer under test implements, and its registry entry.

The training core hands a method one minibatch and the shared :class:`PhaseTimer`; the method runs
its own forward/backward/curvature/... passes inside named phases. That is what lets K-FAC draw a
backward pass from sampled targets or compute Fisher-vector products, while every optimizer is
still timed by the same clock (DESIGN.md, "A Method runs its own passes").
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
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


def gradients(params: Sequence[torch.Tensor], weight_decay: float = 0.0) -> list[torch.Tensor]:
    """``.grad`` of each parameter (zeros for one the last backward pass did not reach), plus
    ``weight_decay`` times the parameter: ∇h = ∇(mean loss) + ηθ when η is part of the objective
    (K-FAC's and SKFAC's convention)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if weight_decay:
        grads = list(torch._foreach_add(grads, list(params), alpha=weight_decay))
    return grads


@dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its type, default and allowed values.

    Suites are validated against these, so an unknown or ill-typed hyperparameter is an error that
    names the key instead of a silently ignored setting.
    """

    default: HParamValue
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None

    @property
    def kind(self) -> type:
        """The Python type values must have (bool, int, float or str)."""
        return type(self.default)


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
    """

    total_steps: int | None
    seed: int
    device: torch.device
    dist: Dist | None = None


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
