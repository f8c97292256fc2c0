"""A small conv classifier with BatchNorm, its data, and a short training run through the core:
what the peer tests (tests/optim/peers) train each peer on."""

from __future__ import annotations

import torch
from torch import nn

from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.data import Splits
from kfacbench.optim import MethodContext, get_method

CPU = torch.device("cpu")


def data(n: int = 512) -> Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 2, 6, 6, generator=gen) + y[:, None, None, None].float()
    return Splits(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], "synthetic")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


def losses(name: str, **hp: object) -> tuple[float, float, dict]:  # type: ignore[type-arg]
    spec = get_method(name)
    params = {k: v.default for k, v in spec.hparams.items()} | hp
    if spec.uses_inv_interval:
        params["inv_interval"] = 3
    problem = Problem(net(), "categorical")
    method = spec.build(problem, params, MethodContext(40, 0, CPU))
    config = LoopConfig(32, 0, 40, None, 40, 10, 256)
    result = train(problem, method, data(), config, metric="accuracy", reached=lambda v: False)
    first, last = result.curves[1]["train_loss"], result.curves[-1]["train_loss"]
    phases = {p.phase: p.calls for p in result.phases}
    return first, last, phases | {"info": method.info()}  # type: ignore[attr-defined]
