"""Curvature diagnostics against brute force: explicit per-example Jacobians, dense solves, and the
one case where K-FAC is exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from shared_diagnostics import SUITE, output_hessian, tiny, tiny_workload
from torch import Tensor

from kfacbench import cli
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.diagnostics import quality as diagnose
from kfacbench.diagnostics.quality import (
    Damping,
    FisherProducts,
    checkpoint_rows,
    conjugate_gradient,
    dense_matrix,
    kfac_direction,
    parameters_of,
    quality,
    skfac_direction,
)
from kfacbench.optim.capture import grad_matrix, split_matrix
from kfacbench.optim.factors import kronecker_factors
from kfacbench.optim.kfac import KFAC
from kfacbench.workloads import WORKLOADS


def flat(ts: list[Tensor]) -> Tensor:
    return torch.cat([t.flatten() for t in ts])


def brute_force_fisher(
    problem: Problem, params: list[Tensor], x: Tensor, y: Tensor, kind: str
) -> Tensor:
    """(1/m) Σ_i J_iᵀ B_i J_i with each example's Jacobian formed explicitly and B_i the loss
    Hessian w.r.t. the output (exact) or r_i r_iᵀ (empirical)."""
    sizes = [p.numel() for p in params]
    names = [n for n, _ in problem.model.named_parameters()]
    base = flat([p.detach() for p in params])
    total = torch.zeros(base.numel(), base.numel(), dtype=torch.float64)
    for i in range(x.shape[0]):

        def output(theta: Tensor, i: int = i) -> Tensor:
            pieces = [t.view_as(p) for t, p in zip(theta.split(sizes), params, strict=True)]
            state = dict(zip(names, pieces, strict=True))
            return torch.func.functional_call(problem.model, state, (x[i : i + 1],))[0]

        jac = torch.autograd.functional.jacobian(output, base)  # (outputs, parameters)
        z = output(base).detach()
        total += jac.T @ output_hessian(problem.distribution, z, y[i : i + 1], kind) @ jac
    return total / x.shape[0]


@pytest.mark.parametrize("distribution", ["bernoulli", "gaussian", "categorical"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_products_equal_explicit_per_example_jacobian_sums(
    distribution: str, kind: str
) -> None:
    problem, x, y = tiny(distribution)
    _, params = parameters_of(problem.model)
    products = FisherProducts(problem, params, x, y, kind)  # type: ignore[arg-type]
    dense = dense_matrix(products, params)
    expected = brute_force_fisher(problem, params, x, y, kind)
    torch.testing.assert_close(dense, expected, rtol=1e-9, atol=1e-12)
    assert torch.allclose(dense, dense.T, atol=1e-12)


def test_gradient_is_the_mean_loss_gradient() -> None:
    problem, x, y = tiny("categorical")
    _, params = parameters_of(problem.model)
    loss = problem.loss(problem.model(x), y)
    expected = torch.autograd.grad(loss, params)
    got = FisherProducts(problem, params, x, y).gradient()
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("damping", [1e-3, 0.1, 10.0])
def test_conjugate_gradient_equals_the_dense_solve(damping: float) -> None:
    problem, x, y = tiny("bernoulli", (4, 5, 3))
    _, params = parameters_of(problem.model)
    products = FisherProducts(problem, params, x, y)
    grad = products.gradient()
    solve = conjugate_gradient(products, grad, damping, tol=1e-12)
    dense = dense_matrix(products, params)
    expected = torch.linalg.solve(dense + damping * torch.eye(dense.shape[0]), flat(grad))
    # the error is bounded by the residual times the condition number (1e4 at λ = 1e-3)
    assert (flat(solve.x) - expected).norm() <= 1e-6 * expected.norm()
    assert solve.residual < 1e-10 and 0 < solve.iterations <= dense.shape[0] + 5


def kfac_quality(
    problem: Problem, x: Tensor, y: Tensor, damping: float, how: Damping
) -> tuple[float, float, float]:
    layers, params = parameters_of(problem.model)
    products = FisherProducts(problem, params, x, y)
    grad = products.gradient()
    exact = [-t for t in conjugate_gradient(products, grad, damping, tol=1e-13).x]
    factors = kronecker_factors(problem.model, problem, x, y, fisher="exact")
    pairs = [factors[layer.name] for layer in layers]
    direction = kfac_direction(layers, pairs, grad, damping, how)
    q = quality(products, damping, grad, exact, direction)
    return q.cosine, q.model_ratio, q.alpha


@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_kfac_is_exact_for_one_linear_layer_with_gaussian_output(damping: float) -> None:
    """One Linear layer, Gaussian output, exact Fisher: F = Ā ⊗ I exactly, so K-FAC with exact
    damping is the natural gradient: cosine 1, model-reduction ratio 1, best step length 1."""
    problem, x, y = tiny("gaussian", (3, 2))
    cosine, ratio, alpha = kfac_quality(problem, x, y, damping, "exact")
    assert cosine == pytest.approx(1.0, abs=1e-9)
    assert ratio == pytest.approx(1.0, abs=1e-9)
    assert alpha == pytest.approx(1.0, abs=1e-9)
    # K-FAC's factored damping adds cross terms to λI: still a good, but not the exact, step
    cosine, ratio, _ = kfac_quality(problem, x, y, damping, "factored")
    assert 0.5 < ratio < 1.0 - 1e-6


def test_kfac_is_an_approximation_for_two_layers() -> None:
    problem, x, y = tiny("gaussian", (3, 4, 2))
    cosine, ratio, _ = kfac_quality(problem, x, y, 0.1, "exact")
    assert 0.0 < cosine < 0.999 and 0.0 < ratio < 0.999


def test_quality_of_the_exact_direction_and_of_the_gradient() -> None:
    problem, x, y = tiny("categorical", (3, 4, 3))
    _, params = parameters_of(problem.model)
    products = FisherProducts(problem, params, x, y)
    grad = products.gradient()
    exact = [-t for t in conjugate_gradient(products, grad, 0.1, tol=1e-13).x]
    q = quality(products, 0.1, grad, exact, exact)
    assert (q.cosine, q.model_ratio, q.alpha) == pytest.approx((1.0, 1.0, 1.0), abs=1e-9)
    scaled = quality(products, 0.1, grad, exact, [3 * t for t in exact])
    assert scaled.model_ratio == pytest.approx(1.0) and scaled.alpha == pytest.approx(1 / 3)
    sgd = quality(products, 0.1, grad, exact, [-t for t in grad])
    assert 0 < sgd.model_ratio < 1 and sgd.cosine < 1  # the gradient is not the natural one


# --- a run's own (stale) inverses, and `kfacbench diagnose` ----------------------------------


def test_the_runs_direction_equals_the_fresh_one_when_nothing_changed() -> None:
    """K-FAC after one step at lr 0 on the diagnostic batch itself: its factors are that batch's
    (the first moving-average weight is 0) and θ did not move, so its inverses, stale or not,
    are the fresh approximation's, and so are the scores."""
    problem, x, y = tiny("categorical", (3, 4, 3))
    method = KFAC(
        problem,
        lr=0.0,
        momentum=0.0,
        fisher="exact",
        damping=0.5,
        weight_decay=0.0,
        inv_interval=1,
        rescale=False,
        adapt_damping=False,
        adapt_gamma=False,
    )
    method.step(x, y, PhaseTimer(torch.device("cpu")))
    rows = checkpoint_rows(
        problem, method, x, y, fisher="exact", damping=0.5, generator=torch.Generator()
    )
    scores = {(r["approximation"], r["metric"]): r["value"] for r in rows}
    for metric in ("cosine", "model_ratio", "alpha"):
        assert scores[("run", metric)] == pytest.approx(scores[("kfac[exact]", metric)], rel=1e-6)
    assert scores[("reference", "cg_residual")] < 1e-6


def test_diagnose_writes_every_checkpoint_and_resumes_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
    computed: list[int] = []
    real = diagnose.checkpoint_rows

    def counting(*args: Any, **kwargs: Any) -> list[dict[str, object]]:
        computed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnose, "checkpoint_rows", counting)
    suite, out = tmp_path / "dg.toml", tmp_path / "out"
    suite.write_text(SUITE)
    assert cli.main(["diagnose", str(suite), "--out", str(out), "--damping", "0.1"]) == 0
    assert len(computed) == 6  # 2 cells × 3 checkpoints
    (run_dir,) = (out / "dg").iterdir()
    table = pd.read_parquet(run_dir / "diagnostics.parquet")
    assert set(table["step"]) == {0, 3, 6} and set(table["optimizer"]) == {"sgd", "kfac-fast"}
    kfac = table[(table["optimizer"] == "kfac-fast") & (table["layer"] == "all")]
    assert set(kfac["approximation"]) == {
        "reference", "gradient", "kfac[exact]", "kfac-exact-damping[exact]",
        "kfac-tridiag[sampled]", "skfac[sampled]", "run",
    }  # fmt: skip
    assert set(kfac[kfac["approximation"] == "run"]["step"]) == {3, 6}  # no inverse at step 0
    ratios = table[table["metric"] == "model_ratio"]["value"]
    assert ((ratios > 0) & (ratios <= 1 + 1e-9)).all()

    (victim,) = list((run_dir / "parts").glob("*.s6.diagnostics.parquet"))[:1]
    victim.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (run_dir / "parts").iterdir()}
    computed.clear()
    assert (
        cli.main(["diagnose", str(suite), "--out", str(out), "--resume", "--damping", "0.1"]) == 0
    )
    assert len(computed) == 1 and victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    assert len(pd.read_parquet(run_dir / "diagnostics.parquet")) == len(table)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--at", "0,-5"], "expected steps >= 0 like 0,50,200, got '0,-5'"),
        (["--at", "x"], "expected steps like 0,50,200, got 'x'"),
        (["--damping", "0"], "expected finite λ > 0, got '0'"),
        ([], "--damping: sgd cells have no damping of their own"),
    ],
)
def test_bad_diagnose_arguments_are_one_line_and_create_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    fragment: str,
) -> None:
    monkeypatch.setitem(WORKLOADS, "tiny_ae", tiny_workload())
    suite, out = tmp_path / "dg.toml", tmp_path / "out"
    suite.write_text(SUITE)
    try:
        code = cli.main(["diagnose", str(suite), "--out", str(out), *args])
    except SystemExit as exc:  # argparse
        code = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and fragment in err, err
    assert not out.exists()


def test_skfac_direction_is_kfac_with_factored_damping_on_linear_layers() -> None:
    """On Linear layers SKFAC's rows give K-FAC's factors exactly (RᵀR = Ā, G), and the
    diagnostics damp them as K-FAC does (π√λ on Ā, √λ/π on G: matched effective damping): the
    same direction as dense solves with those factors and dampings."""
    problem, x, y = tiny("bernoulli", (3, 8, 4))  # 6 rows < 9 inputs: a Woodbury inverse
    layers, params = parameters_of(problem.model)
    grad = FisherProducts(problem, params, x, y).gradient()
    got = skfac_direction(problem, layers, x, y, grad, 0.3, "empirical", torch.Generator())
    found = kronecker_factors(problem.model, problem, x, y, fisher="empirical")
    expected: list[Tensor] = []
    i = 0
    for layer in layers:
        a, g = found[layer.name]
        n = len(layer.params())
        v = grad_matrix(layer, grad[i : i + n])
        i += n
        root = 0.3**0.5
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
        nat = torch.linalg.solve(g + root / pi * torch.eye(g.shape[0]), v)
        nat = torch.linalg.solve(a + pi * root * torch.eye(a.shape[0]), nat.T).T
        expected += [-t for t in split_matrix(layer, nat)]
    torch.testing.assert_close(flat(got), flat(expected))
