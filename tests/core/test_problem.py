"""Problem: sampling the model's predictive distribution, and the forward pass's precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Problem

CPU = torch.device("cpu")


def test_categorical_draws_follow_the_softmax() -> None:
    """Gumbel-max draws: each class's frequency over 200,000 draws is within 4 standard errors
    of its softmax probability."""
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]]).expand(200_000, 4)
    problem = Problem(nn.Identity(), "categorical")
    draws = problem.sample_targets(logits, torch.Generator().manual_seed(0))
    assert draws.shape == (200_000,) and draws.dtype == torch.int64
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    probs = torch.softmax(logits[0].double(), 0)
    se = torch.sqrt(probs * (1 - probs) / draws.numel())
    assert torch.all((freq - probs).abs() < 4 * se), (freq, probs)


def test_draws_are_seeded() -> None:
    problem = Problem(nn.Identity(), "categorical")
    logits = torch.randn(64, 10)
    a = problem.sample_targets(logits, torch.Generator().manual_seed(3))
    b = problem.sample_targets(logits, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("distribution", ["bernoulli", "categorical"])
def test_non_finite_outputs_still_give_valid_targets(distribution: str) -> None:
    """A diverging run's NaN / infinite outputs must not reach the sampler (CUDA's asserts on
    the device would lose the context for every later cell); the loop records the divergence."""
    out = torch.tensor([[math.nan, 1.0, -math.inf], [math.inf, math.nan, 0.0]])
    problem = Problem(nn.Identity(), distribution)  # type: ignore[arg-type]
    y = problem.sample_targets(out, torch.Generator().manual_seed(0))
    if distribution == "bernoulli":
        assert y.shape == out.shape and set(y.unique().tolist()) <= {0.0, 1.0}
    else:
        assert y.shape == (2,) and y[1] == 0  # +inf logit: that class, always


def test_precision_is_the_forward_pass_autocast() -> None:
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    off = Problem(model, "gaussian")
    with off.precision(CPU):
        assert model(x).dtype == torch.float32
    bf16 = Problem(model, "gaussian", amp="bf16")
    with bf16.precision(CPU):
        assert model(x).dtype == torch.bfloat16
    assert bf16.forward(x).dtype == torch.float32  # outputs come back in float32
