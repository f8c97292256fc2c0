"""The training loop: sampling, budgets, read-back cadence, divergence, eval off the clock."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from kfacbench.core import loop
from kfacbench.core.loop import (
    EVAL_SEED,
    LoopConfig,
    MinibatchSampler,
    eval_chunk,
    eval_subset,
    evaluate,
    train,
)
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.data import Splits
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.sgd import SGD

CPU = torch.device("cpu")


def blobs(n: int = 512, seed: int = 0) -> Splits:
    """Two Gaussian blobs: an easy classification problem SGD must make progress on."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) + 2.0 * y[:, None].float()
    return Splits(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], "synthetic")


def config(**kw: object) -> LoopConfig:
    base: dict[str, object] = dict(
        batch_size=32,
        seed=0,
        max_steps=40,
        max_seconds=None,
        eval_every=20,
        log_every=5,
        train_eval_size=1000,
    )
    base.update(kw)
    return LoopConfig(**base)  # type: ignore[arg-type]


def classifier() -> Problem:
    torch.manual_seed(0)
    return Problem(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "categorical")


def test_sampler_draws_permutations_deterministically() -> None:
    a = MinibatchSampler(10, 5, seed=3, device=CPU)
    b = MinibatchSampler(10, 5, seed=3, device=CPU)
    epoch = torch.cat([a.next(), a.next()])
    assert sorted(epoch.tolist()) == list(range(10))
    torch.testing.assert_close(epoch, torch.cat([b.next(), b.next()]))
    assert not torch.equal(a.next(), MinibatchSampler(10, 5, seed=4, device=CPU).next())
    with pytest.raises(ValueError, match="exceeds"):
        MinibatchSampler(4, 5, seed=0, device=CPU)


def test_train_reduces_loss_and_records_curves_and_phases() -> None:
    problem = classifier()
    result = train(
        problem,
        SGD(problem, lr=0.2, momentum=0.9),
        blobs(),
        config(),
        metric="accuracy",
        reached=lambda acc: acc >= 0.9,
    )
    assert result.status == "ok" and result.steps == 40
    steps = [r["step"] for r in result.curves]
    assert steps == [0, 5, 10, 15, 20, 25, 30, 35, 40]
    evals = [r for r in result.curves if not math.isnan(r["eval_metric"])]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["train_eval_loss"] < 0.5 * evals[0]["train_eval_loss"]
    assert result.time_to_target_s is not None and result.time_to_target_s > 0
    assert result.final["final_eval_metric"] >= 0.9
    phases = {p.phase: p for p in result.phases}
    assert set(phases) == {"forward", "backward", "update", "step"}
    assert all(p.calls == 40 for p in phases.values())
    times = [r["train_time_s"] for r in result.curves]
    assert times == sorted(times) and times[-1] == result.train_time_s
    assert result.curves[-1]["lr"] == 0.2
    assert 0 < result.timer_overhead_ms < 1.0


@pytest.mark.parametrize("stop", [True, False])
def test_stop_at_target_ends_the_cell_at_the_first_eval_reaching_it(stop: bool) -> None:
    problem = classifier()
    result = train(
        problem,
        SGD(problem, lr=0.2, momentum=0.9),
        blobs(),
        config(max_steps=400, eval_every=10, stop_at_target=stop),
        metric="accuracy",
        reached=lambda acc: acc >= 0.9,
    )
    evals = [r for r in result.curves if not math.isnan(r["eval_metric"])]
    first = next(r for r in evals if r["eval_metric"] >= 0.9)
    assert result.time_to_target_s == first["train_time_s"]
    # The eval before had not reached it: the crossing lies between the two.
    before = [r for r in evals if r["step"] < first["step"]]
    assert before[-1]["eval_metric"] < 0.9
    assert result.time_to_target_lo_s == before[-1]["train_time_s"] < result.time_to_target_s
    assert result.steps == (first["step"] if stop else 400)
    assert first["step"] < 400


def test_time_budget_stops_the_cell() -> None:
    problem = classifier()
    result = train(
        problem,
        SGD(problem, lr=0.1),
        blobs(),
        config(max_steps=None, max_seconds=0.2),
        metric="accuracy",
        reached=lambda acc: False,
    )
    assert result.status == "ok"
    assert 0.2 <= result.train_time_s < 5.0
    assert result.time_to_target_s is None and result.time_to_target_lo_s is None
    assert not math.isnan(result.curves[-1]["eval_metric"])  # final eval always runs


def test_non_finite_loss_is_diverged() -> None:
    """Least squares with a step far beyond 2/L grows geometrically to inf, then NaN."""
    torch.manual_seed(0)
    problem = Problem(nn.Linear(4, 1), "gaussian")
    x = torch.randn(256, 4)
    y = x.sum(1, keepdim=True)
    data = Splits(x[:128], y[:128], x[128:], y[128:], "synthetic")
    result = train(
        problem,
        SGD(problem, lr=50.0, momentum=0.9),
        data,
        config(max_steps=500, diverge_factor=math.inf),  # only the non-finite check
        metric="recon_error",
        reached=lambda err: False,
    )
    assert result.status == "diverged"
    assert result.steps < 500
    assert not math.isfinite(result.curves[-1]["train_loss"])
    assert result.reason == f"non-finite loss by step {result.steps}"


def bernoulli_autoencoder() -> tuple[Problem, Splits]:
    """A tiny sigmoid autoencoder under the Bernoulli (cross-entropy) loss: its loss is bounded
    by the logits' size, so a blown-up run never overflows to inf."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 16))
    x = (torch.rand(512, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    return Problem(net, "bernoulli"), Splits(x[:256], x[:256], x[256:], x[256:], "synthetic")


def test_a_blown_up_bounded_loss_is_diverged() -> None:
    """SGD at lr 1e6 on a Bernoulli autoencoder: the loss stays finite and grows by orders of
    magnitude; it is stopped at the first read-back above diverge_factor × the initial loss."""
    problem, data = bernoulli_autoencoder()
    result = train(
        problem,
        SGD(problem, lr=1e6, momentum=0.9),
        data,
        config(max_steps=200, diverge_factor=10.0),
        metric="recon_error",
        reached=lambda err: False,
    )
    initial = result.curves[0]["train_eval_loss"]
    last = result.curves[-1]
    assert result.status == "diverged" and result.steps == last["step"] < 200
    assert math.isfinite(last["train_loss"]) and last["train_loss"] > 10 * initial
    assert all(r["train_loss"] <= 10 * initial for r in result.curves[1:-1])
    assert result.reason.startswith(f"train_loss {last['train_loss']:.4g} at step {last['step']}")
    assert "diverge_factor 10" in result.reason
    # evaluated where it stopped: its final loss is the blown-up model's, not the initial one
    assert last["train_eval_loss"] == result.final["final_train_loss"] > 10 * initial


def test_the_same_run_without_the_bound_ends_ok() -> None:
    """What the bound guards against: with it lifted, the blown-up run is recorded ``ok``."""
    problem, data = bernoulli_autoencoder()
    result = train(
        problem,
        SGD(problem, lr=1e6, momentum=0.9),
        data,
        config(max_steps=40, diverge_factor=math.inf),
        metric="recon_error",
        reached=lambda err: False,
    )
    assert result.status == "ok" and result.reason == ""
    assert result.final["final_train_loss"] > 100 * result.curves[0]["train_eval_loss"]


def test_a_healthy_run_is_not_flagged() -> None:
    problem, data = bernoulli_autoencoder()
    result = train(
        problem,
        SGD(problem, lr=0.5, momentum=0.9),
        data,
        config(max_steps=100, diverge_factor=2.0),
        metric="recon_error",
        reached=lambda err: False,
    )
    assert result.status == "ok" and result.steps == 100


def test_eval_is_off_the_clock() -> None:
    """A slow eval must not show up in training time."""
    problem = classifier()
    fast = train(problem, SGD(problem, lr=0.1), blobs(), config(), metric="accuracy", reached=bool)
    slow_problem = classifier()
    data = blobs()
    test_x, test_y = data.test_x.repeat(400, 1), data.test_y.repeat(400)
    big = Splits(data.train_x, data.train_y, test_x, test_y, "x")
    slow = train(
        slow_problem, SGD(slow_problem, lr=0.1), big, config(), metric="accuracy", reached=bool
    )
    assert slow.train_time_s < fast.train_time_s * 3 + 0.05


def test_eval_size_evaluates_a_fixed_random_subset() -> None:
    """``eval_size`` = k: the eval loss is the one of k test examples drawn by a fixed seed
    (the same for every cell, whatever its own seed), not the first k; 0 is no evaluation."""
    data = blobs()
    results = {}
    for k in (None, 7, 0):
        problem = classifier()
        results[k] = train(
            problem,
            SGD(problem, lr=0.1),
            data,
            config(eval_size=k),
            metric="accuracy",
            reached=bool,
        )
    problem = classifier()
    train(problem, SGD(problem, lr=0.1), data, config(), metric="accuracy", reached=bool)
    n = data.test_x.shape[0]
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_SEED))[:7].sort()
    subset, _ = evaluate(
        problem, data.test_x[chosen.values], data.test_y[chosen.values], "accuracy"
    )
    first7, _ = evaluate(problem, data.test_x[:7], data.test_y[:7], "accuracy")
    whole, _ = evaluate(problem, data.test_x, data.test_y, "accuracy")
    assert len({subset, first7, whole}) == 3
    assert results[7].final["final_eval_loss"] == subset
    assert results[None].final["final_eval_loss"] == whole
    assert math.isnan(results[0].final["final_eval_loss"])
    assert results[0].final["final_train_loss"] == results[None].final["final_train_loss"]
    x, y = eval_subset(data.test_x, data.test_y, 7)
    assert torch.equal(x, data.test_x[chosen.values]) and torch.equal(y, data.test_y[chosen.values])
    assert eval_subset(data.test_x, data.test_x, 7)[1] is not None  # autoencoder targets follow


def test_without_evaluation_nothing_is_evaluated_and_divergence_is_still_caught() -> None:
    """Both sizes 0 (a timing run): no eval time, and a blow-up is measured against the first
    read-back minibatch loss instead of the initial train-subset loss."""
    data = blobs()
    quiet, wild = (
        train(
            p,
            SGD(p, lr=lr),
            data,
            config(train_eval_size=0, eval_size=0),
            metric="accuracy",
            reached=bool,
        )
        for lr, p in ((0.1, classifier()), (1e4, classifier()))
    )
    assert quiet.status == "ok" and quiet.eval_s == 0.0
    assert all(math.isnan(row["train_eval_loss"]) for row in quiet.curves)
    assert wild.status == "diverged"
    assert "train_loss" in wild.reason or "non-finite" in wild.reason


def test_evaluate_recon_error_is_summed_squared_error_per_example() -> None:
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()  # sigmoid(0) = 0.5 everywhere
    x = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 1.0]])
    loss, err = evaluate(Problem(model, "bernoulli"), x, x, "recon_error")
    assert err == pytest.approx(((0.25 + 0.25 + 0) + 3 * 0.25) / 2)
    assert loss == pytest.approx(3 * math.log(2))


def test_large_examples_are_evaluated_in_smaller_chunks_to_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chunk shrinks where an example's input or output is large (GPT-2 small's logits
    would be 210 GB at 1,024 examples a pass); the mean loss and metric do not change."""
    torch.manual_seed(0)
    wide, narrow = (
        Problem(nn.Linear(10, 500), "categorical"),
        Problem(nn.Linear(10, 2), "categorical"),
    )
    x, y = torch.randn(40, 10), torch.randint(2, (40,))
    whole = evaluate(narrow, x, y, "accuracy")
    assert eval_chunk(wide, x) == loop.EVAL_CHUNK
    monkeypatch.setattr(loop, "EVAL_ELEMENTS", 1000)
    assert eval_chunk(wide, x) == 16  # outputs: 8 × 1,000 / 500 per example (inputs allow 100)
    monkeypatch.setattr(loop, "EVAL_ELEMENTS", 30)
    assert eval_chunk(narrow, x) == 3  # inputs: 30 / 10 per example (outputs allow 120)
    assert eval_chunk(wide, x) == 1  # at least one
    loss, metric = evaluate(narrow, x, y, "accuracy")
    assert loss == pytest.approx(whole[0], rel=1e-6) and metric == pytest.approx(whole[1])


def test_timer_phases_are_the_methods() -> None:
    problem = classifier()
    timer = PhaseTimer(CPU)
    data = blobs()
    SGD(problem, lr=0.1).step(data.train_x[:8], data.train_y[:8], timer)
    assert timer.phases() == ["forward", "backward", "update"]


class GrowingSGD(SGD):
    """SGD with the optional loop hooks: a batch that grows by 8 per step, and an eval flag."""

    evals_inside = 0
    inside = False

    def batch_size_at(self, step: int, base: int, n: int) -> int:
        return min(base + 8 * step, n)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        self.inside = True
        yield
        self.inside = False


def test_optional_method_hooks_set_batch_size_and_wrap_eval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    problem = classifier()
    method = GrowingSGD(problem, lr=0.1)
    import kfacbench.core.loop as loop

    real_evaluate = loop.evaluate

    def spy(*args: object, **kw: object) -> tuple[float, float]:
        assert method.inside
        method.evals_inside += 1
        return real_evaluate(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "evaluate", spy)
    result = train(problem, method, blobs(), config(max_steps=10), metric="accuracy", reached=bool)
    sizes = [min(32 + 8 * k, 256) for k in range(10)]
    assert result.curves[-1]["examples"] == sum(sizes)
    assert method.evals_inside == 4  # train and test evals at steps 0 and 10


def test_kfac_curves_trace_its_adaptive_rules() -> None:
    """K-FAC rows carry λ, γ, α, μ and ρ (ρ once Levenberg–Marquardt has run); SGD rows have
    NaN in K-FAC's columns."""
    problem = classifier()
    kfac = train(
        problem,
        KFAC(problem, lm_interval=5, gamma_interval=10, inv_interval=5),
        blobs(),
        config(max_steps=20, log_every=5),
        metric="accuracy",
        reached=lambda acc: False,
    )
    rows = kfac.curves
    assert math.isnan(rows[0]["rho"]) and all(math.isfinite(r["rho"]) for r in rows[1:])
    for r in rows[1:]:
        assert r["damping"] > 0 and r["gamma"] > 0 and math.isfinite(r["mu"])
    problem = classifier()
    sgd = train(
        problem, SGD(problem, lr=0.1), blobs(), config(max_steps=5), metric="accuracy",
        reached=lambda acc: False,
    )  # fmt: skip
    assert all(math.isnan(sgd.curves[-1][k]) for k in ("gamma", "mu", "rho"))


def test_a_data_parallel_time_budget_is_decided_at_read_back_points_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Agreeing on "out of time" is a collective and a host sync: a data-parallel loop makes it
    only at read-back points (every log_every steps), and stops at the first one past the
    budget. The collectives are stubbed as a one-rank group."""
    from kfacbench.core import loop
    from kfacbench.distributed import Dist

    asked: list[int] = []
    steps = {"n": 0}
    monkeypatch.setattr(loop, "shard", lambda idx, dist: idx)
    monkeypatch.setattr(loop, "mean_losses", lambda losses, dist: losses)
    monkeypatch.setattr(loop, "slowest", lambda values, dist: values)
    monkeypatch.setattr(loop, "any_rank", lambda flag, device: asked.append(steps["n"]) or flag)
    clock = {"t": 0.0}
    monkeypatch.setattr(loop.time, "perf_counter", lambda: clock["t"])
    problem = classifier()
    sgd = SGD(problem, lr=0.1)
    real_step = sgd.step

    def step(x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        steps["n"] += 1
        clock["t"] += 1.0  # one "second" per step
        return real_step(x, y, timer)

    sgd.step = step  # type: ignore[method-assign]
    result = train(
        problem,
        sgd,
        blobs(),
        config(max_steps=None, max_seconds=7.5, log_every=5, eval_every=100),
        metric="accuracy",
        reached=lambda acc: False,
        dist=Dist(rank=0, world=1, local_rank=0, backend="gloo"),
    )
    assert asked == [5, 10]
    assert result.steps == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (cuDNN's autotuner)")
def test_convolutions_are_tuned_off_the_clock_without_touching_the_cell() -> None:
    """The tuning pass runs a forward and backward of the batch's shape on copies: parameters,
    gradients and BatchNorm statistics stay as they were."""
    from kfacbench.core.device import tune_convolutions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model = model.cuda()
    x = torch.randn(8, 3, 8, 8, device="cuda")
    y = torch.randint(0, 2, (8,), device="cuda")
    model(x)  # materialise the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.backends.cudnn.benchmark = True
    try:
        tune_convolutions(Problem(model, "categorical"), x, y)
    finally:
        torch.backends.cudnn.benchmark = False
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_tuning_is_a_no_op_off_cuda() -> None:
    """On a CPU (or with the setting off) nothing runs: the model sees no call at all."""
    from kfacbench.core.device import tune_convolutions

    calls = []
    model = nn.Conv2d(1, 1, 1)
    model.register_forward_hook(lambda *args: calls.append(1))
    tune_convolutions(Problem(model, "gaussian"), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert calls == []
