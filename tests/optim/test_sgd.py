"""SGD with momentum against torch.optim.SGD and against the textbook recursions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim.schedules import scheduled_lr
from kfacbench.optim.sgd import SGD

CPU = torch.device("cpu")


def tiny_problem(seed: int = 0) -> tuple[Problem, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(8, 5, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    return Problem(model, "categorical"), x, y


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_pytorch_form_matches_torch_optim_sgd(nesterov: bool, weight_decay: float) -> None:
    problem, x, y = tiny_problem()
    reference = copy.deepcopy(problem.model)
    ours = SGD(problem, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    torch_opt = torch.optim.SGD(
        reference.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay
    )
    timer = PhaseTimer(CPU)
    for _ in range(6):
        ours.step(x, y, timer)
        torch_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        torch_opt.step()
    for a, b in zip(problem.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def quadratic_problem(theta0: torch.Tensor) -> tuple[Problem, torch.Tensor, torch.Tensor]:
    """h(θ) = ½‖θ − 0‖² through a bias-only Gaussian model: ∇h = θ (per example, mean)."""
    model = nn.Linear(1, theta0.numel(), bias=True)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(theta0)
    model.weight.requires_grad_(False)
    x = torch.zeros(1, 1)
    y = torch.zeros(1, theta0.numel())
    return Problem(model, "gaussian"), x, y


def test_sutskever_form_follows_its_recursion_and_equals_pytorch_at_constant_lr() -> None:
    theta0 = torch.tensor([1.0, -2.0, 0.5])
    lr, mu = 0.1, 0.8
    problem, x, y = quadratic_problem(theta0)
    sut = SGD(problem, lr=lr, momentum=mu, form="sutskever")
    problem_pt, _, _ = quadratic_problem(theta0)
    pt = SGD(problem_pt, lr=lr, momentum=mu, form="pytorch")
    theta, v = theta0.clone(), torch.zeros(3)
    timer = PhaseTimer(CPU)
    for _ in range(5):
        sut.step(x, y, timer)
        pt.step(x, y, timer)
        v = mu * v - lr * theta  # ∇h = θ
        theta = theta + v
        torch.testing.assert_close(problem.model.bias.detach(), theta)
        torch.testing.assert_close(problem_pt.model.bias.detach(), theta)


def test_sutskever_nesterov_is_the_look_ahead_method() -> None:
    """Bengio et al.'s reformulation tracks Θ = θ + μv of the original NAG recursion."""
    theta0 = torch.tensor([1.0, -2.0])
    lr, mu = 0.2, 0.9
    problem, x, y = quadratic_problem(theta0)
    ours = SGD(problem, lr=lr, momentum=mu, form="sutskever", nesterov=True)
    theta, v = theta0.clone(), torch.zeros(2)  # original NAG: θ0 = Θ0 since v0 = 0
    timer = PhaseTimer(CPU)
    for _ in range(5):
        ours.step(x, y, timer)
        v = mu * v - lr * (theta + mu * v)  # gradient at the look-ahead point
        theta = theta + v
        torch.testing.assert_close(problem.model.bias.detach(), theta + mu * v)


def test_forms_differ_under_a_schedule() -> None:
    theta0 = torch.tensor([1.0])
    runs = {}
    for form in ("pytorch", "sutskever"):
        problem, x, y = quadratic_problem(theta0)
        opt = SGD(problem, lr=0.1, momentum=0.9, form=form, schedule="step", total_steps=4)
        for _ in range(4):
            opt.step(x, y, PhaseTimer(CPU))
        runs[form] = problem.model.bias.detach().clone()
    assert not torch.allclose(runs["pytorch"], runs["sutskever"])


def test_step_records_the_three_phases_and_returns_the_pre_update_loss() -> None:
    problem, x, y = tiny_problem()
    expected = nn.functional.cross_entropy(problem.model(x), y)
    timer = PhaseTimer(CPU)
    loss = SGD(problem, lr=0.1).step(x, y, timer)
    torch.testing.assert_close(loss, expected.detach())
    assert timer.phases() == ["forward", "backward", "update"]


def test_schedules() -> None:
    assert scheduled_lr(1.0, 10, schedule="constant", total_steps=None) == 1.0
    assert scheduled_lr(1.0, 49, schedule="step", total_steps=100) == 1.0
    assert scheduled_lr(1.0, 50, schedule="step", total_steps=100) == pytest.approx(0.1)
    assert scheduled_lr(1.0, 75, schedule="step", total_steps=100) == pytest.approx(0.01)
    assert scheduled_lr(1.0, 50, schedule="cosine", total_steps=100) == pytest.approx(0.5)
    assert scheduled_lr(1.0, 0, schedule="constant", total_steps=None, warmup_steps=4) == 0.25
    with pytest.raises(ValueError, match="needs a step budget"):
        scheduled_lr(1.0, 0, schedule="cosine", total_steps=None)


def test_growing_batch_schedule() -> None:
    from kfacbench.optim.schedules import growing_batch_size

    sizes = [growing_batch_size(k, 1000, 60_000, 500) for k in range(600)]
    assert sizes[0] == 1000 and sizes[499] == 60_000 and sizes[-1] == 60_000
    assert sizes == sorted(sizes)
    assert sizes[250] == round(1000 * (60_000 / 1000) ** (250 / 499))
    assert growing_batch_size(3, 100, 50, 500) == 50
