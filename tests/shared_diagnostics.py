"""A tiny problem, workload and suite shared by the diagnostics tests and the report's
diagnostics sections (tests/diagnostics, tests/report)."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from kfacbench.core.problem import Problem, per_example_loss
from kfacbench.data import Splits
from kfacbench.workloads import Workload


def tiny(distribution: str, widths: tuple[int, ...] = (3, 4, 2)) -> tuple[Problem, Tensor, Tensor]:
    """An MLP with tanh, float64, 6 examples, and targets of the distribution's kind."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers).double()
    x = torch.randn(6, widths[0], generator=gen, dtype=torch.float64)
    out = widths[-1]
    if distribution == "categorical":
        y = torch.randint(0, out, (6,), generator=gen)
    elif distribution == "bernoulli":
        y = (torch.rand(6, out, generator=gen) > 0.5).double()
    else:
        y = torch.randn(6, out, generator=gen, dtype=torch.float64)
    return Problem(model, distribution), x, y  # type: ignore[arg-type]


def output_hessian(distribution: str, z: Tensor, y: Tensor, kind: str) -> Tensor:
    """B for one example with output ``z``: the loss Hessian w.r.t. the output (exact, formed
    by hand per distribution) or r rᵀ with r the loss gradient (empirical)."""
    if kind == "exact":
        if distribution == "bernoulli":
            return torch.diag(torch.sigmoid(z) * (1 - torch.sigmoid(z)))
        if distribution == "gaussian":
            return torch.eye(z.numel(), dtype=torch.float64)
        p = torch.softmax(z, -1)
        return torch.diag(p) - torch.outer(p, p)
    zz = z.clone().requires_grad_(True)
    loss = per_example_loss(distribution, zz[None], y).sum()  # type: ignore[arg-type]
    (r,) = torch.autograd.grad(loss, zz)
    return torch.outer(r, r)


def tiny_workload() -> Workload:
    def build(gen: torch.Generator) -> nn.Module:
        return nn.Sequential(nn.Linear(8, 4), nn.Sigmoid(), nn.Linear(4, 8))

    def no_real(data_dir: object, cache_dir: object) -> Splits:
        raise AssertionError("synthetic only")

    return Workload(
        "tiny_ae", "8-4-8", (8,), "bernoulli", "recon_error", 1.0, build, no_real, (64, 32), "-"
    )


SUITE = """
name = "dg"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 10
eval_every = 5
log_every = 5
train_eval_size = 32
[sweep]
workload = ["tiny_ae"]
batch_size = [16]
inv_interval = [2]
[optimizers.sgd]
[optimizers.kfac-fast]
[diagnose]
at = [0, 3, 6]
"""
