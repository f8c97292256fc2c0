"""Two interleaved spirals: a small classification workload generated on the fly (no files)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from kfacbench import Splits, Workload


def spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points of two spirals (label 0 or 1), with Gaussian noise of scale 0.05."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    t = torch.rand(n, generator=gen) * 3 * math.pi
    r = t / (3 * math.pi)
    angle = t + y * math.pi
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return x + 0.05 * torch.randn(n, 2, generator=gen), y


def load(data_dir: Path | None, cache_dir: Path | None) -> Splits:
    (x, y), (tx, ty) = spirals(8192, seed=0), spirals(2048, seed=1)
    return Splits(x, y, tx, ty, "generated: two spirals")


def mlp(gen: torch.Generator) -> nn.Module:
    """A 2-64-64-2 tanh MLP, initialised from the cell's generator (LeCun-normal weights)."""
    net = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    with torch.no_grad():
        for layer in net[::2]:
            fan_in = layer.weight.shape[1]
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) / math.sqrt(fan_in))
            layer.bias.zero_()
    return net


WORKLOADS = [
    Workload(
        name="spirals",
        summary="two interleaved spirals, 2-64-64-2 tanh MLP (example plugin)",
        input_shape=(2,),
        distribution="categorical",
        metric="accuracy",
        target=0.9,
        build_model=mlp,
        load_real=load,
        synthetic_sizes=(8192, 2048),
        target_note="the example's own choice, not measured",
        num_classes=2,
    )
]
