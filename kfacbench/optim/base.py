"""The Method protocol every optimizer under test implements, and its registry entry.

The training core hands a method one minibatch and the shared :class:`PhaseTimer`; the method runs
its own forward/backward/curvature/... passes inside named phases. That is what lets K-FAC draw a
backward pass from sampled targets or compute Fisher-vector products, while every optimizer is
still timed by the same clock (DESIGN.md, "A Method runs its own passes").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from kfacbench.core.problem import Problem
    from kfacbench.core.timing import PhaseTimer

HParamValue = float | int | str | bool


class Method(Protocol):
    """An optimizer under test, bound to one model.

    ``step`` must not synchronise with the device (no ``.item()``, no host copies): it returns the
    minibatch loss as a detached device tensor and the core reads losses back in batches.
    A method may also define ``info() -> dict`` (JSON-able facts about the cell, e.g. which
    layers were preconditioned); the runner stores it in the ``method_info`` column.
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
    """

    total_steps: int | None
    seed: int
    device: torch.device


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
