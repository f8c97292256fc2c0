"""SGD with momentum, in the two forms found in the literature.

- ``pytorch`` (``torch.optim.SGD``): v ← μv + g, θ ← θ − ηv.
- ``sutskever`` (Sutskever et al. 2013, the form of Martens' SGD baselines): v ← μv − ηg,
  θ ← θ + v.

They coincide at a constant learning rate and differ under a schedule (the first rescales the
whole velocity when η changes, the second only new gradients). Nesterov momentum is offered in
both: PyTorch's g + μv look-ahead, and Sutskever's in the reformulation of Bengio et al. (2013),
θ ← θ + μ²v − (1+μ)ηg.

Weight decay is the coupled ℓ2 cost of the objective (g ← g + wd·θ), so h is the same function
for every optimizer (K-FAC's η).

The update uses ``torch._foreach_*`` kernels: one fused launch per operation for all parameters
instead of one per tensor, which matters for short steps on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kfacbench.core.compiling import CompileMode, PhaseCompiled, compiled
from kfacbench.core.memory import count_bytes
from kfacbench.core.method import HParam, Method, MethodContext, MethodSpec, Param, hparams_from
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim.base import gradients
from kfacbench.optim.schedules import SCHEDULES, scheduled_lr


class SGD(Method):
    """SGD with momentum as a :class:`~kfacbench.optim.base.Method`.

    Usable on its own: ``SGD(Problem(model, "categorical"), lr=0.1)`` then
    ``opt.step(x, y, PhaseTimer(device))``. ``params`` (default: the model's trainable
    parameters, in order) fixes which tensors ``apply`` updates, for methods that reuse it.
    ``compile`` (:mod:`kfacbench.core.compiling`) compiles the forward pass with its loss (the
    backward graph comes with it) and the update.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        lr: float = 0.01,
        momentum: float = 0.9,
        form: str = "pytorch",
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        lr_decay: float = 0.1,
        total_steps: int | None = None,
        params: Sequence[torch.Tensor] | None = None,
        compile: CompileMode = "off",
    ) -> None:
        if form not in ("pytorch", "sutskever"):
            raise ValueError(f"unknown SGD form {form!r}; known: pytorch, sutskever")
        self.problem = problem
        self.params: list[torch.Tensor] = (
            [p for p in problem.model.parameters() if p.requires_grad]
            if params is None
            else list(params)
        )
        self.velocity = [torch.zeros_like(p) for p in self.params]
        self.base_lr = lr
        self.momentum = momentum
        self.form = form
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.lr_decay = lr_decay
        self.total_steps = total_steps
        self.steps = 0
        self.lr = self.lr_at(0)  # fail early on a schedule without a horizon
        self._rule = MomentumRule(momentum, form, nesterov, weight_decay)
        self._compiled_loss = compiled(self._loss, compile)
        self._graphed = compile == "reduce-overhead"
        self._compiled_update = (
            None
            if compile == "off"
            else compiled(torch.no_grad()(_momentum_update), compile, in_place=True)
        )

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.problem.loss(self.problem.forward(x), y)

    def lr_at(self, step: int) -> float:
        return scheduled_lr(
            self.base_lr,
            step,
            schedule=self.schedule,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.lr_decay,
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """Forward, backward and momentum update on one minibatch.

        Under ``reduce-overhead`` the loss is an output of a CUDA graph, whose memory the next
        step's replay overwrites, while the loop keeps each step's loss on the device until its
        next read-back: the step is marked as a new graph iteration and returns a copy.
        """
        if self._graphed:
            torch.compiler.cudagraph_mark_step_begin()
        with timer.phase("forward"):
            loss = self._compiled_loss(x, y)
        with timer.phase("backward"):
            for p in self.params:
                p.grad = None
            loss.backward()
        with timer.phase("update"):
            self.lr = self.lr_at(self.steps)
            self.apply(gradients(self.params), self.lr)
        self.steps += 1
        return loss.detach().clone() if self._graphed else loss.detach()

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor], lr: float) -> None:
        """Momentum update of the parameters with direction ``grads`` (gradients or
        preconditioned gradients) at learning rate ``lr``; shared with K-FAC's fast variant.

        Compiled, the learning rate enters as a 0-dim device tensor: torch.compile specialises
        on a Python float, and a schedule would recompile at every new value.
        """
        if self._compiled_update is None:
            _momentum_update(self.params, self.velocity, grads, lr, self._rule, _axpy)
        else:
            rate = torch.full((), lr, device=self.params[0].device, dtype=self.params[0].dtype)
            self._compiled_update(self.params, self.velocity, grads, rate, self._rule, _axpy_t)

    def log_values(self) -> dict[str, float]:
        """Current learning rate."""
        return {"lr": self.lr}

    def state_bytes(self) -> dict[str, int]:
        """The momentum buffers: one per parameter."""
        return count_bytes(("first_order", v) for v in self.velocity)

    def graph_key(self, step: int) -> Hashable | None:
        """Every step may be replayed from a CUDA graph (:mod:`kfacbench.core.graphs`); the
        learning rate is a kernel argument, so each value has its own graph (a schedule that
        changes it every step runs eagerly: a key is captured only once it repeats). Not when
        compiled (torch.compile's own graphs)."""
        if self._compiled_update is not None:
            return None
        return ("sgd", self.lr_at(step))

    def graph_replayed(self) -> None:
        """A replayed step's host state: the learning rate and the step count."""
        self.lr = self.lr_at(self.steps)
        self.steps += 1

    def compiled_phases(self) -> dict[str, PhaseCompiled]:
        """Forward (with the loss) and update are compiled regions; the backward pass runs the
        backward graph AOTAutograd compiled with the forward."""
        if self._compiled_update is None:
            return {}
        return {"forward": "all", "backward": "all", "update": "all"}


@dataclass(frozen=True)
class MomentumRule:
    """The constants of a momentum update (hashable: torch.compile guards on them)."""

    momentum: float
    form: str
    nesterov: bool
    weight_decay: float


Number = float | torch.Tensor
Axpy = Callable[[list[torch.Tensor], list[torch.Tensor], Number], None]


def _axpy(dst: list[torch.Tensor], src: list[torch.Tensor], coef: Number) -> None:
    """dst += coef·src with a Python-number coefficient (one fused foreach kernel, eager)."""
    torch._foreach_add_(dst, src, alpha=coef)  # type: ignore[arg-type]


def _axpy_t(dst: list[torch.Tensor], src: list[torch.Tensor], coef: Number) -> None:
    """dst += coef·src with a tensor coefficient (compiled: inductor fuses the product)."""
    torch._foreach_add_(dst, torch._foreach_mul(src, coef))


def _momentum_update(
    params: list[torch.Tensor],
    vel: list[torch.Tensor],
    grads: list[torch.Tensor],
    lr: Number,
    rule: MomentumRule,
    axpy: Axpy,
) -> None:
    """The two momentum forms of the module docstring, in place on ``params`` and ``vel``."""
    mu = rule.momentum
    if rule.weight_decay:
        grads = list(torch._foreach_add(grads, params, alpha=rule.weight_decay))
    if rule.form == "pytorch":
        torch._foreach_mul_(vel, mu)
        torch._foreach_add_(vel, grads)
        direction = list(torch._foreach_add(grads, vel, alpha=mu)) if rule.nesterov else vel
        axpy(params, direction, -lr)
    elif rule.nesterov:  # θ ← θ + μ²v − (1+μ)ηg, then v ← μv − ηg
        torch._foreach_add_(params, vel, alpha=mu * mu)
        axpy(params, grads, -(1 + mu) * lr)
        torch._foreach_mul_(vel, mu)
        axpy(vel, grads, -lr)
    else:
        torch._foreach_mul_(vel, mu)
        axpy(vel, grads, -lr)
        torch._foreach_add_(params, vel)


SGD_HPARAMS: dict[str, HParam] = hparams_from(
    SGD,
    {
        "lr": Param("learning rate η (peak value under a schedule)", bounds="[0, inf)"),
        "momentum": Param("momentum μ", bounds="[0, 1)"),
        "form": Param("momentum form", choices=("pytorch", "sutskever")),
        "nesterov": Param("Nesterov momentum"),
        "weight_decay": Param("coupled ℓ2 cost η (added to the gradient)", bounds="[0, inf)"),
        "schedule": Param("learning-rate schedule", choices=SCHEDULES),
        "warmup_steps": Param("linear learning-rate warm-up steps", bounds="[0, inf)"),
        "lr_decay": Param(
            "factor of the step schedule (at 50% and 75% of the steps)", bounds="(0, 1]"
        ),
    },
)
"""SGD's hyperparameters: the keyword arguments of :class:`SGD`, defaults from its signature."""

DEFAULTS_FROM: dict[str, Callable[..., Any]] = {"sgd": SGD}
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


def _build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> SGD:
    return SGD(problem, **hp, total_steps=ctx.total_steps, compile=ctx.compile)


SPEC = MethodSpec(
    name="sgd",
    summary="SGD with momentum (PyTorch or Sutskever form, Nesterov, lr schedules)",
    hparams=SGD_HPARAMS,
    uses_inv_interval=False,
    build=_build,
)
