"""Compiled steps: compiled cells equal eager ones, compile time stays off the step times, and a
region that would fall back to eager is an error.

Tolerance: inductor reorders float32 reductions and fuses elementwise chains, so compiled and
eager steps differ in rounding only. Over ``STEPS`` steps (inverse refreshes, K-FAC's γ searches
and Levenberg–Marquardt updates included) every minibatch loss must agree to ``RTOL`` relative
and every parameter to ``RTOL`` of its largest entry; measured differences are ≤ 2e-6.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from torch import nn

from kfacbench.core.compiling import (
    CompileClock,
    CompileMode,
    compiled,
    fresh_caches,
    phase_column,
)
from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.core.timing import STEP, PhaseTimer
from kfacbench.data import Splits
from kfacbench.optim import MethodContext, get_method
from kfacbench.optim.sgd import SGD

CPU = torch.device("cpu")
STEPS = 8
RTOL = 1e-4

CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("sgd", {"schedule": "cosine", "nesterov": True}, False),
    ("kfac-fast", {}, True),
    # γ search and Levenberg–Marquardt every 2 steps: candidates and λ change step to step.
    ("kfac", {"gamma_interval": 2, "lm_interval": 2, "damping": 1.0}, False),
    ("kfac-tridiag", {"gamma_interval": 2, "damping": 1.0}, False),
    ("kfac", {"inverse_method": "cholesky", "adapt_gamma": False, "damping": 1.0}, True),
    ("skfac", {"damping": 0.3}, False),
    ("skfac", {"damping": 0.3}, True),
]


def _net(conv: bool) -> nn.Module:
    if conv:
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 36, 5),
        )
    return nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 12))


def _run(
    name: str, hparams: dict[str, Any], conv: bool, mode: str
) -> tuple[torch.Tensor, list[torch.Tensor], list[int], Any]:
    """Losses, final parameters and compile events after each step of one method."""
    fresh_caches()
    torch.manual_seed(0)
    model = _net(conv)
    problem = Problem(model, "categorical" if conv else "bernoulli")
    spec = get_method(name)
    hp = {k: v.default for k, v in spec.hparams.items()} | hparams
    if spec.uses_inv_interval:
        hp["inv_interval"] = 3
    method = spec.build(problem, hp, MethodContext(STEPS, 0, CPU, None, mode))  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(1)
    if conv:
        x = torch.rand(32, 1, 6, 6, generator=gen)
        y = torch.randint(0, 5, (32,), generator=gen)
    else:
        x = torch.rand(32, 12, generator=gen)
        y = (x > 0.5).float()
    timer = PhaseTimer(CPU)
    losses, events = [], []
    with CompileClock() as clock:
        for _ in range(STEPS):
            losses.append(float(method.step(x, y, timer)))
            events.append(clock.events)
    params = [p.detach().clone() for p in model.parameters()]
    return torch.tensor(losses), params, events, method


@pytest.mark.parametrize(
    ("name", "hparams", "conv"),
    CASES,
    ids=[f"{n}-{'conv' if c else 'mlp'}-{'-'.join(h) or 'defaults'}" for n, h, c in CASES],
)
def test_compiled_steps_equal_eager_ones(name: str, hparams: dict[str, Any], conv: bool) -> None:
    eager_losses, eager_params, eager_events, _ = _run(name, hparams, conv, "off")
    losses, params, events, method = _run(name, hparams, conv, "default")
    assert eager_events == [0] * STEPS  # eager compiles nothing
    assert events[0] > 0, "the compiled regions were compiled in the first step"
    # Compiled once: no recompilation for a new learning rate, λ, γ or refresh.
    assert events == [events[0]] * STEPS
    torch.testing.assert_close(losses, eager_losses, rtol=RTOL, atol=0.0)
    for got, want in zip(params, eager_params, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=RTOL * float(want.abs().max()))
    phases = method.compiled_phases()
    assert phases["precondition" if name != "sgd" else "forward"] == "all"
    assert phase_column(phases, STEP) == "part"


def test_eager_method_reports_no_compiled_phase() -> None:
    *_, method = _run("kfac-fast", {}, False, "off")
    assert method.compiled_phases() == {}
    assert phase_column(method.compiled_phases(), "precondition") == "no"
    assert phase_column(method.compiled_phases(), STEP) == "no"


def _blobs(n: int = 256) -> Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) + 2.0 * y[:, None].float()
    return Splits(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], "synthetic")


def test_compile_time_is_kept_out_of_step_times_and_training_time() -> None:
    fresh_caches()
    torch.manual_seed(0)
    problem = Problem(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "categorical")
    method = SGD(problem, lr=0.1, compile="default")
    config = LoopConfig(
        batch_size=32,
        seed=0,
        max_steps=20,
        max_seconds=None,
        eval_every=20,
        log_every=5,
        train_eval_size=128,
    )
    # Inductor's caches make a repeated compilation fast: make each one take ≥ 0.5 s for sure
    # (an end callback registered before the loop's clock runs inside its window).
    handler = torch._dynamo.callback_handler
    handler.register_end_callback(slow := lambda *args: time.sleep(0.5))
    try:
        result = train(
            problem, method, _blobs(), config, metric="accuracy", reached=lambda v: False
        )
    finally:
        handler.remove_end_callback(slow)
    assert result.status == "ok" and result.steps == 20
    assert result.compile_s >= 0.5
    # 20 steps of a 4-8-2 net take milliseconds: had compiling been counted, ≥ 0.5 s.
    assert result.train_time_s < 0.25
    step = next(p for p in result.phases if p.phase == STEP)
    assert step.calls == 19  # the step that compiled is not a step time
    assert step.p90_ms < 250
    assert result.compiled == {"forward": "all", "backward": "all", "update": "all"}


def test_hitting_the_recompile_limit_is_an_error_not_a_silent_eager_fallback() -> None:
    fresh_caches()

    def scale(t: torch.Tensor, factor: int) -> torch.Tensor:
        return t * factor  # an int argument: one specialisation per value

    fn = compiled(scale, "default")
    limit = torch._dynamo.config.recompile_limit
    with CompileClock(), pytest.raises(Exception, match=r"(?i)limit"):
        for factor in range(limit + 2):
            fn(torch.ones(2), factor)
    fn(torch.ones(2), limit + 5)  # outside the clock, torch's own default applies again


def test_clock_counts_nothing_for_eager_code() -> None:
    with CompileClock() as clock:
        torch.ones(3).sum()
    assert clock.events == 0 and clock.seconds == 0.0


@pytest.mark.parametrize(
    ("mode", "in_place", "want"),
    [
        ("default", False, None),
        ("reduce-overhead", False, "reduce-overhead"),
        ("reduce-overhead", True, None),
        ("max-autotune", True, "max-autotune"),
    ],
)
def test_in_place_updates_are_not_cuda_graphed(
    monkeypatch: pytest.MonkeyPatch, mode: CompileMode, in_place: bool, want: str | None
) -> None:
    """An update that only mutates its inputs is compiled without CUDA graphs under
    reduce-overhead (cudagraph trees crashed recording one on an H200); other modes pass."""
    seen: list[str | None] = []

    def fake_compile(fn: Any, mode: str | None = None, dynamic: bool | None = None) -> Any:
        seen.append(mode)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled(lambda: None, mode, in_place=in_place)
    assert seen == [want]


def test_graphed_sgd_returns_losses_that_outlive_the_next_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under reduce-overhead each step starts a new CUDA-graph iteration and returns a copy of
    its loss (on the H200 the loop's pending losses were overwritten by the next replay). On
    CPU there are no graphs to overwrite anything: the marks are counted, the copy is checked
    on CUDA (examples/gpu/device-run.sh's compile_gpu suite)."""
    marks: list[int] = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    model = nn.Sequential(nn.Linear(4, 3))
    problem = Problem(model, "categorical")
    sgd = SGD(problem, lr=0.1, momentum=0.9, compile="reduce-overhead")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    timer = PhaseTimer(torch.device("cpu"))
    losses = [sgd.step(x, y, timer) for _ in range(3)]
    assert len(marks) == 3
    assert losses[0] > losses[2]
