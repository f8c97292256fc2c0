"""K-FAC against brute force: dense Fisher products, explicit inverses, the 2×2 model solve."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Distribution, Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS, MethodContext
from kfacbench.optim.capture import grad_matrix
from kfacbench.optim.factors import kronecker_factors
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.rescale import fisher_quadratic
from kfacbench.workloads.nets import cifar_resnet, deep_autoencoder

CPU = torch.device("cpu")
torch.set_default_dtype(torch.float32)


def mlp(seed: int, sizes: tuple[int, ...] = (4, 5, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batch(dist: Distribution, m: int = 16, d_in: int = 4, d_out: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d_in, generator=gen)
    if dist == "categorical":
        return x, torch.randint(0, d_out, (m,), generator=gen)
    if dist == "bernoulli":
        return x, torch.rand(m, d_out, generator=gen).round()
    return x, torch.randn(m, d_out, generator=gen)


def dense_ggn(model: nn.Module, dist: Distribution, x: torch.Tensor) -> torch.Tensor:
    """The exact Fisher (GGN) of the mean loss, formed densely: (1/m) Σ Jᵢᵀ Hᵢ Jᵢ."""
    params = dict(model.named_parameters())
    names = list(params)

    def f(*flat: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (x,))

    jac = torch.autograd.functional.jacobian(f, tuple(params.values()))
    out = f(*params.values()).detach()
    m, k = out.shape
    j = torch.cat([jj.reshape(m, k, -1) for jj in jac], dim=2)  # (m, k, P)
    if dist == "bernoulli":
        p = torch.sigmoid(out)
        h = torch.diag_embed(p * (1 - p))
    elif dist == "gaussian":
        h = torch.eye(k).expand(m, k, k)
    else:
        p = torch.softmax(out, -1)
        h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("mkp,mkl,mlq->pq", j, h, j) / m


@pytest.mark.parametrize("dist", ["bernoulli", "gaussian", "categorical"])
def test_fisher_quadratic_equals_the_dense_ggn(dist: Distribution) -> None:
    model = mlp(0)
    x, _ = batch(dist)
    fisher = dense_ggn(model, dist, x)
    opt = KFAC(Problem(model, dist), rescale=True, adapt_gamma=False, adapt_damping=False)
    gen = torch.Generator().manual_seed(1)
    u = [torch.randn(p.shape, generator=gen) for p in opt.params]
    v = [torch.randn(p.shape, generator=gen) for p in opt.params]
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    out = model(x)
    got = fisher_quadratic(dist, out, opt._jvp(x, u), opt._jvp(x, v))
    assert got.item() == pytest.approx((flat(u) @ fisher @ flat(v)).item(), rel=1e-4, abs=1e-6)


def one_step(opt: KFAC, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return opt.step(x, y, PhaseTimer(CPU))


@pytest.mark.parametrize(
    ("method", "adaptive"),
    [
        ("eigh", False),
        ("eigh", True),
        ("auto", True),
        ("cholesky", False),
        ("inv", False),
        ("newton", False),
        ("auto", False),
    ],
)
def test_preconditioning_equals_explicit_damped_inverses(method: str, adaptive: bool) -> None:
    """Every inverse method preconditions with (Ā + πγI)⁻¹ and (G + γ/π I)⁻¹; with adaptive
    damping eigh and auto keep the eigenbasis, so another γ is exact too."""
    model = mlp(0)
    x, y = batch("categorical")
    opt = KFAC(
        Problem(model, "categorical"),
        inverse_method=method,
        rescale=adaptive,
        adapt_damping=adaptive,
        adapt_gamma=False,
        damping=0.1,
        weight_decay=0.0,
    )
    assert opt.eigenbasis == adaptive
    for _ in range(2 if method == "newton" else 1):  # Newton-Schulz needs a warm start
        one_step(opt, x, y)  # builds factors and inverses
    grads = [torch.randn_like(p) for p in opt.params]
    # The refreshed γ (precomputed inverses) and another γ (eigenbasis path for eigh).
    gammas = [opt.gamma] + ([opt.gamma * 1.5] if opt.eigenbasis else [])
    for gamma in gammas:
        direction = opt._precondition(grads, gamma, current=gamma is opt.gamma)
        start = 0
        for c in opt.curv:
            n = len(c.layer.params())
            v = grad_matrix(c.layer, grads[start : start + n])
            got = grad_matrix(c.layer, direction[start : start + n])
            assert c.a is not None and c.g is not None and c.pi is not None
            eye_a, eye_g = torch.eye(c.a.shape[0]), torch.eye(c.g.shape[0])
            a_damped = c.a + c.pi * gamma * eye_a
            g_damped = c.g + gamma / c.pi * eye_g
            want = -torch.linalg.inv(g_damped) @ v @ torch.linalg.inv(a_damped)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            start += n


def test_factored_damping_pi_and_gamma() -> None:
    model = mlp(0)
    x, y = batch("gaussian")
    opt = KFAC(Problem(model, "gaussian"), damping=2.0, weight_decay=0.5, adapt_gamma=False)
    assert opt.gamma.item() == pytest.approx(math.sqrt(2.5))
    one_step(opt, x, y)
    for c in opt.curv:
        assert c.a is not None and c.g is not None and c.pi is not None
        ta = torch.trace(c.a) / c.a.shape[0]
        tg = torch.trace(c.g) / c.g.shape[0]
        assert c.pi.item() == pytest.approx(math.sqrt(ta / tg), rel=1e-5)


def test_rescaling_minimises_the_quadratic_model() -> None:
    """The (α, μ) K-FAC applies minimise ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ over δ = αΔ + μδ₀."""
    dist: Distribution = "bernoulli"
    model = mlp(0)
    x, y = batch(dist)
    opt = KFAC(Problem(model, dist), adapt_damping=False, adapt_gamma=False, damping=0.3)
    one_step(opt, x, y)  # first step: δ₀ = 0
    prev = [d.clone() for d in opt.prev_update or []]
    theta = [p.detach().clone() for p in opt.params]
    fisher = dense_ggn(model, dist, x)
    loss = opt.problem.loss(model(x), y)
    grads = torch.autograd.grad(loss, opt.params)
    flat = lambda ts: torch.cat([t.flatten() for t in ts])  # noqa: E731
    g = flat(grads) + opt.eta * flat(theta)
    one_step(opt, x, y)
    delta = flat(opt.prev_update or [])
    # Δ is the K-FAC direction at the second step; recover it from the update and μ.
    alpha, mu = opt.last_alpha.item(), opt.last_mu.item()
    big_delta = (delta - mu * flat(prev)) / alpha
    c = fisher + (opt.lam.item() + opt.eta) * torch.eye(fisher.shape[0])
    basis = torch.stack([big_delta, flat(prev)], dim=1)
    c2 = basis.T @ c @ basis
    best = torch.linalg.solve(c2, -(basis.T @ g))
    assert alpha == pytest.approx(best[0].item(), rel=1e-3)
    assert mu == pytest.approx(best[1].item(), rel=1e-3, abs=1e-6)


def test_levenberg_marquardt_decreases_lambda_on_an_exact_quadratic() -> None:
    """Least squares with a linear model: M is h exactly, so ρ = 1 and λ ← ω₁λ every T1 steps."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(32, 4)
    y = x @ torch.randn(4, 2)
    opt = KFAC(Problem(model, "gaussian"), damping=1.0, adapt_gamma=False, lm_interval=5)
    for _ in range(10):
        one_step(opt, x, y)
    assert opt.lam.item() == pytest.approx(1.0 * opt.omega1**2, rel=1e-4)
    assert opt.gamma.item() == pytest.approx(math.sqrt(opt.lam.item() + opt.eta), rel=1e-5)


def test_gamma_search_picks_one_of_the_three_candidates() -> None:
    model = mlp(0)
    x, y = batch("categorical")
    opt = KFAC(Problem(model, "categorical"), gamma_interval=2, inv_interval=2, lm_interval=1000)
    one_step(opt, x, y)
    one_step(opt, x, y)
    before = opt.gamma.item()
    one_step(opt, x, y)  # step index 2: search
    after = opt.gamma.item()
    candidates = [before * opt.omega2, before, before / opt.omega2]
    assert any(after == pytest.approx(c, rel=1e-6) for c in candidates)


@pytest.mark.parametrize("tracks", [True, False])
def test_gamma_tracks_lambda_between_searches_only_when_asked(tracks: bool) -> None:
    """Least squares: ρ = 1, so LM lowers λ by ω₁ every T1 steps; with tracking γ/√(λ+η) stays
    at its initial 1 (no search before step 1000), without it γ stays at √(λ₀+η)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(32, 4)
    y = x @ torch.randn(4, 2)
    opt = KFAC(
        Problem(model, "gaussian"),
        damping=1.0,
        lm_interval=5,
        gamma_interval=1000,
        gamma_tracks_lambda=tracks,
    )
    start = opt.gamma.item()
    for _ in range(10):
        one_step(opt, x, y)
    assert opt.lam.item() == pytest.approx(opt.omega1**2, rel=1e-4)
    root = math.sqrt(opt.lam.item() + opt.eta)
    assert opt.gamma.item() == pytest.approx(root if tracks else start, rel=1e-5)


@pytest.mark.parametrize("bound", [0, 1, 2])
def test_gamma_ratio_bound_pulls_a_runaway_gamma_back(bound: int) -> None:
    """A γ that ran away to 100 √(λ+η) (as the unbounded search can on CURVES) is clamped to
    ω₂^−m √(λ+η) at the next step when bounded, and left alone when not."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(32, 4)
    y = x @ torch.randn(4, 2)
    opt = KFAC(Problem(model, "gaussian"), damping=1.0, lm_interval=5, gamma_ratio_bound=bound)
    one_step(opt, x, y)
    opt.gamma = 100 * torch.sqrt(opt.lam + opt.eta)
    for _ in range(3):  # no search before step 20
        one_step(opt, x, y)
    ratio = opt.gamma.item() / math.sqrt(opt.lam.item() + opt.eta)
    assert ratio == pytest.approx(opt.omega2**-bound if bound else 100.0, rel=1e-5)


def test_a_tracking_gamma_search_moves_the_ratio_to_sqrt_lambda() -> None:
    """With tracking, a search multiplies c = γ/√(λ+η) by one of {ω₂, 1, 1/ω₂} and LM steps
    leave c unchanged."""
    model = mlp(0)
    x, y = batch("categorical")
    opt = KFAC(Problem(model, "categorical"), gamma_interval=4, inv_interval=2, lm_interval=1)
    ratios = []
    for _ in range(9):
        one_step(opt, x, y)
        ratios.append(opt.gamma.item() / math.sqrt(opt.lam.item() + opt.eta))
    assert ratios[0] == pytest.approx(1.0, rel=1e-5)
    allowed = [1.0, opt.omega2, 1 / opt.omega2]
    for before, after in itertools.pairwise(ratios):
        assert any(after == pytest.approx(before * f, rel=1e-4) for f in allowed)
    assert ratios[3] == pytest.approx(ratios[0], rel=1e-4)  # no search at steps 1..3


@pytest.mark.parametrize("preset", ["kfac", "kfac-tridiag", "kfac-fast"])
def test_presets_reduce_the_loss_on_an_autoencoder(preset: str) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = deep_autoencoder((64, 32, 16, 4), generator=gen)
    x = (torch.rand(256, 64, generator=gen) > 0.7).float()
    problem = Problem(model, "bernoulli")
    spec = METHODS[preset]
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 5}
    opt = spec.build(problem, hp, MethodContext(None, 0, CPU))
    first = problem.loss(model(x), x).item()
    for _ in range(30):
        loss = opt.step(x, x, PhaseTimer(CPU))
        assert torch.isfinite(loss)
    assert problem.loss(model(x), x).item() < 0.9 * first


def test_conv_net_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, in_channels=1, num_classes=3)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 3, (16,))
    problem = Problem(model, "categorical")
    opt = KFAC(problem, damping=1.0, inv_interval=2)
    info = opt.info()
    assert info["preconditioned"][-1] == "fc" or "linear" in info["preconditioned"][-1]
    assert any("bn" in name for name in info["identity_preconditioner"])
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first = problem.loss(model(x), y).item()  # one train-mode forward: one stats update
    tracked = bn.num_batches_tracked.item()
    one_step(opt, x, y)
    assert bn.num_batches_tracked.item() == tracked + 1  # the extra passes left BN alone
    for _ in range(10):
        one_step(opt, x, y)
    assert problem.loss(model(x), y).item() < first
    with pytest.raises(KfacbenchError, match="tridiag"):
        KFAC(problem, structure="tridiag")


def test_invalid_settings_are_clear_errors() -> None:
    problem = Problem(mlp(0), "categorical")
    with pytest.raises(KfacbenchError, match="adapt_gamma needs inverse_method = 'eigh'"):
        KFAC(problem, inverse_method="cholesky")
    with pytest.raises(KfacbenchError, match="need rescale"):
        KFAC(problem, rescale=False)
    with pytest.raises(KfacbenchError, match="unknown inverse_method"):
        KFAC(problem, inverse_method="svd", adapt_gamma=False)


def test_fast_preset_is_sgd_momentum_on_the_preconditioned_gradient() -> None:
    model = mlp(0)
    x, y = batch("categorical")
    opt = KFAC(
        Problem(model, "categorical"),
        rescale=False,
        adapt_damping=False,
        adapt_gamma=False,
        lr=0.5,
        momentum=0.0,
        damping=0.01,
        weight_decay=0.0,
    )
    theta = [p.detach().clone() for p in opt.params]
    one_step(opt, x, y)
    grads = [p.grad.clone() for p in opt.params if p.grad is not None]
    direction = opt._precondition(grads, opt.gamma)
    for before, p, d in zip(theta, opt.params, direction, strict=True):
        torch.testing.assert_close(p.detach(), before + 0.5 * d, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host-sync detection)")
def test_no_host_sync_outside_the_inverse_phase() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = deep_autoencoder((64, 32, 8)).to(device)
    x = torch.rand(128, 64, device=device).round()
    # γ searches (every 2 steps) and LM checks (every 5) happen among the checked steps.
    opt = KFAC(Problem(model, "bernoulli"), inv_interval=1000, gamma_interval=2)
    timer = PhaseTimer(device)
    for _ in range(4):  # past the first three steps, which refresh the inverses
        opt.step(x, x, timer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            opt.step(x, x, timer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("fisher", "fraction"), [("exact", 1.0), ("exact", 0.5), ("empirical", 1.0), ("empirical", 0.5)]
)
def test_first_factors_are_the_batch_factors(fisher: str, fraction: float) -> None:
    """ε₁ = 0: after one step the EMA holds exactly the factors of the (fractional) batch."""
    model = mlp(0)
    x, y = batch("categorical")
    problem = Problem(model, "categorical")
    n = int(x.shape[0] * fraction)
    want = kronecker_factors(model, problem, x[:n], y[:n], fisher=fisher)  # type: ignore[arg-type]
    opt = KFAC(problem, fisher=fisher, cov_fraction=fraction, adapt_gamma=False, damping=1.0)
    one_step(opt, x, y)
    for c in opt.curv:
        a, g = want[c.layer.name]
        assert c.a is not None and c.g is not None
        torch.testing.assert_close(c.a, a)
        torch.testing.assert_close(c.g, g, rtol=1e-4, atol=1e-6)


def test_single_linear_layer_with_gaussian_output_takes_the_natural_gradient_step() -> None:
    """Here the K-FAC Fisher is exact (G = I with the type-2 Fisher), so with vanishing damping
    the re-scaled K-FAC update is θ − F⁻¹∇h, F the exact Fisher formed densely."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(64, 3)
    y = torch.randn(64, 2)
    problem = Problem(model, "gaussian")
    opt = KFAC(
        problem,
        fisher="exact",
        damping=1e-9,
        weight_decay=0.0,
        adapt_damping=False,
        adapt_gamma=False,
        rescale_momentum=False,
    )
    fisher = dense_ggn(model, "gaussian", x).double()
    loss = problem.loss(model(x), y)
    grad = torch.cat([g.flatten() for g in torch.autograd.grad(loss, opt.params)]).double()
    theta = torch.cat([p.detach().flatten() for p in opt.params]).double()
    want = theta - torch.linalg.solve(fisher, grad)
    one_step(opt, x, y)
    got = torch.cat([p.detach().flatten() for p in opt.params]).double()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert opt.last_alpha.item() == pytest.approx(1.0, rel=1e-3)


def test_growing_batches_and_polyak_averaging() -> None:
    model = mlp(0)
    problem = Problem(model, "categorical")
    opt = KFAC(problem, growing_batch=5, polyak=0.9, damping=1.0, adapt_gamma=False)
    assert [opt.batch_size_at(k, 4, 64) for k in (0, 4, 9)] == [4, 64, 64]
    for m in (4, 8, 16):  # factors and updates work as the batch grows
        x, y = batch("categorical", m=m)
        assert torch.isfinite(one_step(opt, x, y))
    current = [p.detach().clone() for p in opt.params]
    with opt.averaged():
        assert not torch.equal(opt.params[0], current[0])
    assert torch.equal(opt.params[0], current[0])
    with pytest.raises(KfacbenchError, match="polyak"):
        KFAC(problem, polyak=1.0)


def test_preconditioning_equals_the_dense_kronecker_solve() -> None:
    """Δ = −[(Ā + πγI) ⊗ (G + γ/π I)]⁻¹ vec(∇W̄), the Kronecker product formed densely
    (row-major vec of the (out, in) gradient matrix pairs with kron(G, A))."""
    model = mlp(0)
    x, y = batch("gaussian")
    opt = KFAC(Problem(model, "gaussian"), damping=0.5, adapt_gamma=False, adapt_damping=False)
    one_step(opt, x, y)
    grads = [torch.randn_like(p) for p in opt.params]
    direction = opt._precondition(grads, opt.gamma)
    start = 0
    for c in opt.curv:
        n = len(c.layer.params())
        assert c.a is not None and c.g is not None and c.pi is not None
        a_d = c.a.double() + (c.pi * opt.gamma).double() * torch.eye(c.a.shape[0]).double()
        g_d = c.g.double() + (opt.gamma / c.pi).double() * torch.eye(c.g.shape[0]).double()
        vec = grad_matrix(c.layer, grads[start : start + n]).double().flatten()
        want = -torch.linalg.solve(torch.kron(g_d, a_d), vec)
        got = grad_matrix(c.layer, direction[start : start + n]).double().flatten()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        start += n


@pytest.mark.parametrize(("rho", "factor"), [(0.9, "down"), (0.5, "same"), (0.1, "up")])
def test_levenberg_marquardt_rule(rho: float, factor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """§6.5: λ ← ω₁λ when ρ > 3/4, λ/ω₁ when ρ < 1/4, unchanged in between."""
    model = mlp(0)
    x, y = batch("categorical")
    opt = KFAC(Problem(model, "categorical"), damping=2.0, adapt_gamma=False, lm_interval=5)
    loss = one_step(opt, x, y)
    actual = opt._objective(opt.params, x, y) - (
        loss
        + 0.5
        * opt.eta
        * sum((p - d).pow(2).sum() for p, d in zip(opt.params, opt.prev_update or [], strict=True))
    )
    opt._model_change = actual / rho  # so that ρ is exactly the value under test
    opt._levenberg_marquardt(x, y, loss)
    want = {"down": 2.0 * opt.omega1, "same": 2.0, "up": 2.0 / opt.omega1}[factor]
    assert opt.lam.item() == pytest.approx(want, rel=1e-5)
    assert opt.gamma.item() == pytest.approx(math.sqrt(want + opt.eta), rel=1e-5)


def test_bf16_objective_is_evaluated_like_the_training_forward() -> None:
    """With a bf16 forward, the h(θ) of LM's ρ and of the γ search is the bf16 loss the step
    computed (not an fp32 one): at unchanged parameters the two agree to float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    problem = Problem(model, "gaussian", amp="bf16")
    opt = KFAC(problem, weight_decay=0.0)
    training = problem.loss(problem.forward(x), y)
    assert opt._objective(opt.params, x, y).item() == pytest.approx(training.item(), rel=1e-6)
    full = Problem(model, "gaussian").loss(model(x), y)
    assert abs(full.item() - training.item()) > 1e-6 * abs(full.item())  # bf16 does differ


def test_fused_ema_equals_product_then_interpolation() -> None:
    """The CUDA path (one addmm per factor, the EMA in β and α) keeps the same factors as the
    CPU path (blocked product, then one fused lerp) over several updates."""
    x, y = batch("categorical", m=32)
    opts = []
    for fused in (False, True):
        opt = KFAC(
            Problem(mlp(0), "categorical"),
            rescale=False,
            adapt_damping=False,
            adapt_gamma=False,
            damping=0.1,
            inv_interval=100,
        )
        opt.fused_ema = fused
        for _ in range(4):
            one_step(opt, x, y)
        opts.append(opt)
    for plain, fused in zip(opts[0].curv, opts[1].curv, strict=True):
        torch.testing.assert_close(fused.a, plain.a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused.g, plain.g, rtol=1e-5, atol=1e-6)
