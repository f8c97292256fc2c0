"""Float64 nets with N(0, 1) weights, data for each output distribution and a recorded
forward pass: what the capture and factor tests (tests/optim) build their cases from."""

from __future__ import annotations

import itertools
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from kfacbench.core.problem import Distribution, Problem
from kfacbench.optim.capture import Capture, Layer, find_layers

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DISTRIBUTIONS: tuple[Distribution, ...] = ("bernoulli", "gaussian", "categorical")


def randomise(model: ModuleT, seed: int) -> ModuleT:
    """Float64 copy of ``model`` with N(0, 1) parameters: tight tolerances, non-trivial maths."""
    gen = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def mlp(sizes: tuple[int, ...], seed: int = 0, bias: bool = True) -> nn.Sequential:
    """Sigmoid MLP; no activation on the output (the loss owns it)."""
    mods: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        mods.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(sizes) - 2:
            mods.append(nn.Sigmoid())
    return randomise(nn.Sequential(*mods), seed)


def data(
    distribution: Distribution, m: int, n_in: int, n_out: int, seed: int = 1
) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n_in, generator=gen, dtype=torch.float64)
    if distribution == "categorical":
        return x, torch.randint(0, n_out, (m,), generator=gen)
    if distribution == "bernoulli":
        return x, torch.randint(0, 2, (m, n_out), generator=gen).double()
    return x, torch.randn(m, n_out, generator=gen, dtype=torch.float64)


def record(problem: Problem, x: Tensor) -> tuple[list[Layer], Capture, Tensor]:
    layers, _ = find_layers(problem.model)
    capture = Capture(layers)
    with capture.recording():
        out = problem.forward(x)
    return layers, capture, out


def conv_net(bias: bool = True, seed: int = 0, **conv: Any) -> nn.Sequential:
    """Conv2d(2→3) → sigmoid → flatten → Linear(→3), sized for 2×7×7 inputs."""
    layer = nn.Conv2d(2, 3, bias=bias, **conv)
    with torch.no_grad():
        flat = layer(torch.zeros(1, 2, 7, 7)).numel()
    model = nn.Sequential(layer, nn.Sigmoid(), nn.Flatten(), nn.Linear(flat, 3))
    return randomise(model, seed)
