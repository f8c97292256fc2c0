"""A ``torch.optim.Optimizer`` as a :class:`~kfacbench.core.method.Method`: forward, backward and
``optimizer.step()``, each in its phase. The AdamW peer (registered here) and any optimizer a
suite names by import path (:mod:`kfacbench.plugins`) run through it, so a first-order optimizer
from anywhere is timed by the same clock as the built-in methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from kfacbench.core.memory import count_bytes, optimizer_state
from kfacbench.core.method import Method, MethodContext, MethodSpec, Param, hparams_from
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer


class TorchOptimizer(Method):
    """Drives ``make(params)``, the optimizer over the model's trainable parameters.

    Args:
        problem: the model and its loss.
        make: builds the optimizer from the parameter list.
        info: the ``method_info`` of the cell (the class, its version).
    """

    def __init__(
        self,
        problem: Problem,
        make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
        info: dict[str, Any],
    ) -> None:
        self.problem = problem
        self.opt = make([p for p in problem.model.parameters() if p.requires_grad])
        self._info = info

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """Forward, backward, the optimizer's step."""
        with timer.phase("forward"):
            loss = self.problem.loss(self.problem.forward(x), y)
        with timer.phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("update"):
            self.opt.step()
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        """The first parameter group's learning rate, when it is a number."""
        lr = self.opt.param_groups[0].get("lr")
        return {"lr": float(lr)} if isinstance(lr, int | float) else {}

    def info(self) -> dict[str, Any]:
        """What the optimizer is (as given when built)."""
        return dict(self._info)

    def state_bytes(self) -> dict[str, int]:
        """The optimizer's per-parameter ``state``: tensors of their parameter's shape
        (momentum, Adam's moments) as first-order state, the rest (step counts) as other
        (:func:`~kfacbench.core.memory.optimizer_state`)."""
        return count_bytes(optimizer_state(self.opt))


class AdamW(TorchOptimizer):
    """torch.optim.AdamW (decoupled weight decay, Loshchilov & Hutter 2019) in the core."""

    def __init__(
        self,
        problem: Problem,
        *,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(
            problem,
            lambda params: torch.optim.AdamW(
                params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
            ),
            {"peer": "torch.optim.AdamW", "version": torch.__version__},
        )


def _adamw_build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> AdamW:
    return AdamW(problem, **hp)


DEFAULTS_FROM: dict[str, Callable[..., Any]] = {"adamw": AdamW}
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


SPECS = (
    MethodSpec(
        "adamw",
        "torch.optim.AdamW (decoupled weight decay)",
        hparams_from(
            AdamW,
            {
                "lr": Param("learning rate", bounds="[0, inf)"),
                "beta1": Param("β₁", bounds="[0, 1)"),
                "beta2": Param("β₂", bounds="[0, 1)"),
                "eps": Param("ε", bounds="[0, inf)"),
                "weight_decay": Param("decoupled weight decay", bounds="[0, inf)"),
            },
        ),
        uses_inv_interval=False,
        build=_adamw_build,
    ),
)
