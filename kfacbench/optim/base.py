"""What the optimizers share beyond the contract (:mod:`kfacbench.core.method`): gradients with
the objective's ℓ2 cost, full-float32 matmuls for curvature arithmetic, and Polyak averaging."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


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
