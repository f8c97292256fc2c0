"""Signum (Bernstein et al. 2018, "signSGD: compressed optimisation for non-convex problems"):
momentum, then a step of the momentum's sign. A :class:`kfacbench.Method` subclass: the core
times its phases like every built-in optimizer's."""

from __future__ import annotations

import torch

from kfacbench import Method, Param, PhaseTimer, Problem, method_spec


class Signum(Method):
    def __init__(self, problem: Problem, *, lr: float = 1e-3, momentum: float = 0.9) -> None:
        self.problem, self.lr, self.momentum = problem, lr, momentum
        self.params = [p for p in problem.model.parameters() if p.requires_grad]
        self.buffers = [torch.zeros_like(p) for p in self.params]

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        with timer.phase("forward"):
            loss = self.problem.loss(self.problem.forward(x), y)
        with timer.phase("backward"):
            for p in self.params:
                p.grad = None
            loss.backward()
        with timer.phase("update"), torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch._foreach_lerp_(self.buffers, grads, 1 - self.momentum)
            torch._foreach_add_(self.params, torch._foreach_sign(self.buffers), alpha=-self.lr)
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        return {"lr": self.lr}


METHODS = [
    method_spec(
        "signum",
        Signum,
        {"lr": Param("step size", "(0, inf)"), "momentum": Param("momentum β", "[0, 1)")},
        "Signum: the sign of an SGD momentum (Bernstein et al. 2018)",
    )
]
