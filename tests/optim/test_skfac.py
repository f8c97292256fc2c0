"""SKFAC against K-FAC, dense formulas and explicit im2col sums."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS, MethodContext
from kfacbench.optim.capture import Capture, find_layers, grad_matrix, output_grads
from kfacbench.optim.factors import factors, kronecker_factors
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.skfac import (
    SKFAC,
    conv_patch_sums,
    conv_patches_at,
    factor_rows,
    sample_positions,
)
from kfacbench.workloads import WORKLOADS
from kfacbench.workloads.nets import cifar_resnet, deep_autoencoder

CPU = torch.device("cpu")


def mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 4)
    )


def batch(m: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, 12, generator=gen), torch.randint(0, 4, (m,), generator=gen)


def unfolded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Reference im2col patches ``(m, T, C·kh·kw)`` straight from F.unfold."""
    assert not isinstance(conv.padding, str)
    cols = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    return cols.transpose(1, 2)


CONVS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    dict(kernel_size=1, stride=2, padding=0),
]


@pytest.mark.parametrize("kwargs", CONVS)
def test_patch_sums_and_gathers_equal_unfold(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kwargs)
    x = torch.randn(4, 3, 9, 8)
    patches = unfolded(conv, x)
    torch.testing.assert_close(conv_patch_sums(conv, x), patches.sum(1))
    gen = torch.Generator().manual_seed(0)
    pos = sample_positions(4, patches.shape[1], 3, gen)
    want = patches.gather(1, pos[..., None].expand(-1, -1, patches.shape[-1]))
    torch.testing.assert_close(conv_patches_at(conv, x, pos), want)


def conv_rows(reduction: str, samples: int = 2, seed: int = 0, bias: bool = True):
    """A conv layer's recorded input and output-gradient, and SKFAC's rows from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.Flatten(), nn.Linear(75, 4))
    problem = Problem(model, "categorical")
    layers, _ = find_layers(model)
    capture = Capture(layers)
    x = torch.randn(6, 2, 5, 5)
    with capture.recording():
        out = model(x)
    gen = torch.Generator().manual_seed(1)
    (grad,) = output_grads(capture, layers[:1], problem, out, generator=gen, as_rows=False)
    raw = capture.raw_input(layers[0])
    pgen = torch.Generator().manual_seed(seed)
    ra, rg = factor_rows(layers[0], raw, grad, reduction=reduction, samples=samples, generator=pgen)
    return layers[0], capture.inputs(layers[0]), grad, ra, rg


@pytest.mark.parametrize("bias", [True, False])
def test_reduce_sum_and_mean_shapes_and_scales(bias: bool) -> None:
    """sum: R_AᵀR_A = (1/m) Σ_i (Σ_t ā)(Σ_t ā)ᵀ, R_GᵀR_G = (1/m) Σ_i (Σ_t g)(Σ_t g)ᵀ, m rows;
    mean: the same with Σ_t replaced by the average over the |T| positions."""
    layer, a_full, grad, ra, rg = conv_rows("sum", bias=bias)
    m, t = 6, 25
    assert ra.shape == (m, layer.in_dim) and rg.shape == (m, 3)
    a_sum = a_full.reshape(m, t, -1).sum(1)
    g_sum = grad.flatten(2).sum(-1)
    if bias:
        assert torch.allclose(a_sum[:, -1], torch.full((m,), float(t)))
    torch.testing.assert_close(ra.T @ ra, a_sum.T @ a_sum / m)
    torch.testing.assert_close(rg.T @ rg, g_sum.T @ g_sum / m)
    _, _, _, ra_mean, rg_mean = conv_rows("mean", bias=bias)
    torch.testing.assert_close(ra_mean * t, ra)
    torch.testing.assert_close(rg_mean * t, rg)


def test_subsampling_keeps_s_positions_and_is_unbiased_at_full_coverage() -> None:
    layer, a_full, grad, ra, rg = conv_rows("subsample", samples=4)
    m, t = 6, 25
    assert ra.shape == (m * 4, layer.in_dim) and rg.shape == (m * 4, 3)
    # Every row is a real patch of the example (scaled by 1/√(m·s)).
    patches = a_full.reshape(m, t, -1)
    picked = (ra * math.sqrt(m * 4)).reshape(m, 4, -1)
    for i in range(m):
        dist = torch.cdist(picked[i], patches[i])
        assert torch.all(dist.min(dim=1).values < 1e-5)
    # s ≥ |T| keeps every position: exactly K-FAC's conv factors (KFC normalisation).
    _, _, _, ra_all, rg_all = conv_rows("subsample", samples=1000)
    g_rows = grad.movedim(1, -1).reshape(-1, 3)
    a_kfac, g_kfac = factors(layer, a_full, g_rows, m)
    torch.testing.assert_close(ra_all.T @ ra_all, a_kfac)
    torch.testing.assert_close(rg_all.T @ rg_all, g_kfac)


def test_subsampling_is_seeded() -> None:
    *_, ra0, _ = conv_rows("subsample", seed=5)
    *_, ra1, _ = conv_rows("subsample", seed=5)
    *_, ra2, _ = conv_rows("subsample", seed=6)
    torch.testing.assert_close(ra0, ra1)
    assert not torch.allclose(ra0, ra2)


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_linear_layer_on_sequences_gives_the_roots_of_kfacs_factors(weight_sharing: str) -> None:
    """A Linear layer at R positions: R_AᵀR_A and R_GᵀR_G are K-FAC-expand's or -reduce's
    factors of the same rows (Eschenhagen et al. 2023), of rank m·R or m."""
    layer = find_layers(nn.Linear(3, 2))[0][0]
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    g = torch.randn(4, 5, 2, dtype=torch.float64)
    ra, rg = factor_rows(layer, x, g, weight_sharing=weight_sharing)
    assert ra.shape[0] == rg.shape[0] == (20 if weight_sharing == "expand" else 4)
    a_rows = torch.cat([x, torch.ones(4, 5, 1, dtype=x.dtype)], -1).reshape(20, 4)
    a, gg = factors(layer, a_rows, g.reshape(20, 2), 4, weight_sharing)  # type: ignore[arg-type]
    torch.testing.assert_close(ra.T @ ra, a)
    torch.testing.assert_close(rg.T @ rg, gg)


@pytest.mark.parametrize(
    ("inverse_method", "fisher", "inv_interval", "a_form"),
    [
        ("eigh", "sampled", 1, "woodbury"),
        ("cholesky", "sampled", 1, "woodbury"),
        ("eigh", "empirical", 1, "woodbury"),
        ("eigh", "sampled", 20, "woodbury-dense"),
    ],
)
def test_fc_update_equals_kfac_from_the_same_batch_factors(
    inverse_method: str, fisher: str, inv_interval: int, a_form: str
) -> None:
    """No moving average: SKFAC's Woodbury step equals K-FAC's first (ε₁ = 0) step with the same
    π-split damping γ = √λ, the same (sampled or data) targets and SGD momentum; with a long
    refresh interval the first layer's Woodbury Ā inverse is stored dense (13·(8 + 20T) < 2·20T·8
    for T = 20, not for T = 1; its G side, 20·(8 + 13T) against 2·13T·8, stays thin)."""
    net = mlp(0).double()
    x, y = batch(m=8)
    x = x.double()
    n_sk, n_kf = copy.deepcopy(net), copy.deepcopy(net)
    sk = SKFAC(
        Problem(n_sk, "categorical"),
        lr=0.3,
        damping=0.05,
        damping_split="pi",
        fisher=fisher,
        inv_interval=inv_interval,
        seed=3,
    )
    kf = KFAC(
        Problem(n_kf, "categorical"),
        fisher=fisher,
        lr=0.3,
        damping=0.05,
        weight_decay=0.0,
        rescale=False,
        adapt_damping=False,
        adapt_gamma=False,
        inverse_method=inverse_method,
        seed=3,
    )
    sk.step(x, y, PhaseTimer(CPU))
    kf.step(x, y, PhaseTimer(CPU))
    forms = sk.info()["inverse_forms"]
    assert forms["0"] == {"rank": 8, "A": a_form, "G": "woodbury"}  # 13 and 20 > 8: Woodbury
    assert forms["4"]["G"] == "dense"  # 4 outputs < 8 rows: the fall-back
    for a, b in zip(n_sk.parameters(), n_kf.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(
        not torch.equal(a, b) for a, b in zip(n_sk.parameters(), net.parameters(), strict=True)
    )


def test_sqrt_split_step_equals_the_dense_formula() -> None:
    """θ₁ = θ₀ − η (G + √λI)⁻¹ ∇W̄ (Ā + √λI)⁻¹ with Ā, G the batch's factors formed densely."""
    net = mlp(1).double()
    x, y = batch(m=6, seed=2)
    x = x.double()
    problem = Problem(net, "categorical")
    before = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(7)
    want_factors = kronecker_factors(net, problem, x, y, generator=gen)
    net.zero_grad()
    problem.loss(net(x), y).backward()
    grads = {layer.name: grad_matrix(layer) for layer in find_layers(net)[0]}
    net.zero_grad()
    lam = 0.04
    opt = SKFAC(problem, lr=0.5, momentum=0.9, damping=lam, seed=7)
    opt.step(x, y, PhaseTimer(CPU))
    for layer in find_layers(net)[0]:
        a, g = want_factors[layer.name]
        eye_a = torch.eye(a.shape[0], dtype=a.dtype)
        eye_g = torch.eye(g.shape[0], dtype=g.dtype)
        step = torch.linalg.inv(g + lam**0.5 * eye_g) @ grads[layer.name]
        step = step @ torch.linalg.inv(a + lam**0.5 * eye_a)
        old = grad_matrix(
            layer,
            [dict(before.named_parameters())[f"{layer.name}.{n}"] for n in ("weight", "bias")],
        )
        new = grad_matrix(layer, layer.params())
        torch.testing.assert_close(new, old - 0.5 * step)


def test_moving_average_weights_the_last_batches() -> None:
    """factor_decay ε, window 2: the factor is (Ā₁ + εĀ₀)/(1 + ε) over the two batches before
    the refresh (rank 2m, still Woodbury)."""
    net = mlp(2).double()
    opt = SKFAC(
        Problem(net, "categorical"), damping=0.1, inv_interval=3, factor_decay=0.5, factor_window=2
    )
    calls = []
    real = opt._measure

    def counting(output: torch.Tensor) -> None:
        calls.append(opt.steps)
        real(output)

    opt._measure = counting  # type: ignore[method-assign]
    xs = [batch(m=4, seed=s) for s in range(4)]
    for x, y in xs:
        opt.step(x.double(), y, PhaseTimer(CPU))
    assert calls == [0, 2, 3]  # refreshes at 0 and 3, and the step before the second
    c = opt.roots[0]
    assert c.rank == 8 and c.a_inv is not None and c.a_inv.form.startswith("woodbury")
    (r0a, _), (r1a, _) = c.history
    want = (r1a.T @ r1a + 0.5 * r0a.T @ r0a) / 1.5
    sq = math.sqrt(0.1)
    eye = torch.eye(want.shape[0], dtype=want.dtype)
    torch.testing.assert_close(c.a_inv.matrix(), torch.linalg.inv(want + sq * eye))


def test_factors_are_measured_only_when_a_refresh_uses_them() -> None:
    net = mlp(0)
    opt = SKFAC(Problem(net, "categorical"), inv_interval=4)
    timer = PhaseTimer(CPU)
    x, y = batch()
    for _ in range(9):
        opt.step(x, y, timer)
    counts = {name: len(timer.durations(name)) for name in timer.phases()}
    assert counts["curvature"] == counts["inverse"] == 3  # steps 0, 4, 8
    assert counts["precondition"] == counts["update"] == 9


@pytest.mark.parametrize("preset", ["skfac", "skfac-subsample"])
def test_presets_reduce_the_loss_on_an_autoencoder(preset: str) -> None:
    gen = torch.Generator().manual_seed(0)
    model = deep_autoencoder((64, 32, 16, 4), generator=gen)
    x = (torch.rand(64, 64, generator=gen) > 0.7).float()
    problem = Problem(model, "bernoulli")
    spec = METHODS[preset]
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 5, "damping": 1.0}
    opt = spec.build(problem, hp, MethodContext(None, 0, CPU))
    first = problem.loss(model(x), x).item()
    for _ in range(40):
        assert torch.isfinite(opt.step(x, x, PhaseTimer(CPU)))
    assert problem.loss(model(x), x).item() < 0.9 * first


def test_skfac_trains_curves_ae(tmp_path: Path) -> None:
    """The quick suite's SKFAC settings on the generated CURVES set, through the training loop:
    the per-batch factors of 100 examples are Woodbury for the 784-400-200 layers."""
    workload = WORKLOADS["curves_ae"]
    data = workload.load_data("real", cache_dir=tmp_path)
    model = workload.build_model(torch.Generator().manual_seed(0))
    problem = Problem(model, workload.distribution)
    config = LoopConfig(
        batch_size=100,
        seed=0,
        max_steps=300,
        max_seconds=None,
        eval_every=300,
        log_every=50,
        train_eval_size=2000,
    )
    opt = SKFAC(problem, lr=0.1, damping=1.0, weight_decay=1e-5, inv_interval=20)
    result = train(problem, opt, data, config, metric=workload.metric, reached=workload.reached)
    first, last = result.curves[0], result.curves[-1]
    assert result.status == "ok"
    assert last["train_eval_loss"] < 0.9 * first["train_eval_loss"]
    assert last["eval_metric"] < 0.9 * first["eval_metric"]
    forms = opt.info()["inverse_forms"]
    assert forms["0"]["A"] == "woodbury" and forms["0"]["G"] == "woodbury"  # 785 and 400 > 100
    assert forms["4"]["G"] == "dense"  # 100 outputs, rank 100: m ≥ d falls back
    assert forms["8"]["A"] == "dense"  # 51 inputs < 100


@pytest.mark.parametrize("reduction", ["sum", "mean", "subsample"])
def test_reductions_train_a_conv_net_with_batchnorm(reduction: str) -> None:
    torch.manual_seed(0)
    model = cifar_resnet(8, in_channels=1, num_classes=3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    problem = Problem(model, "categorical")
    opt = SKFAC(problem, lr=0.05, damping=0.1, reduction=reduction, inv_interval=2)
    model.eval()
    first = problem.loss(model(x), y).item()
    model.train()
    for _ in range(25):
        assert torch.isfinite(opt.step(x, y, PhaseTimer(CPU)))
    model.eval()
    assert problem.loss(model(x), y).item() < 0.8 * first
    info = opt.info()
    assert any("bn" in name for name in info["identity_preconditioner"])
    # The first conv (1·3·3 columns) has fewer columns than rows: its A falls back to dense;
    # a 16-channel 3×3 conv (144 columns) is above the rank: Woodbury.
    forms = info["inverse_forms"]
    first_conv = forms[info["preconditioned"][0]]
    assert first_conv["A"] == "dense"
    assert first_conv["rank"] == (32 * 4 if reduction == "subsample" else 32)
    wide = [f for name, f in forms.items() if "layer1" in name or "stage1" in name]
    assert wide and all(f["A"] == "woodbury" for f in wide)


def test_invalid_settings_are_clear_errors() -> None:
    problem = Problem(mlp(0), "categorical")
    with pytest.raises(KfacbenchError, match="unknown reduction 'max'"):
        SKFAC(problem, reduction="max")
    with pytest.raises(KfacbenchError, match="damping > 0"):
        SKFAC(problem, damping=0.0)
    with pytest.raises(KfacbenchError, match="factor_decay"):
        SKFAC(problem, factor_decay=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (host-sync detection)")
@pytest.mark.parametrize("reduction", ["sum", "subsample"])
def test_no_host_sync_outside_the_refresh(reduction: str) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = cifar_resnet(8, in_channels=1, num_classes=3).to(device)
    x = torch.randn(16, 1, 8, 8, device=device)
    y = torch.randint(0, 3, (16,), device=device)
    # Steps 2-5 measure factors for the moving average of the refresh at step 6.
    opt = SKFAC(
        Problem(model, "categorical"),
        reduction=reduction,
        inv_interval=6,
        factor_decay=0.5,
        factor_window=4,
    )
    timer = PhaseTimer(device)
    opt.step(x, y, timer)  # the refresh (its Cholesky check syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            opt.step(x, y, timer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_float32_failure_makes_later_refreshes_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """After one failed float32 Cholesky, SKFAC forms its systems in float64 directly."""
    from kfacbench.optim import lowrank

    real = torch.linalg.cholesky_ex
    calls: list[torch.dtype] = []

    def failing(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(mats.dtype)
        chol, info = real(mats)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(lowrank.torch.linalg, "cholesky_ex", failing)
    opt = SKFAC(Problem(mlp(0), "categorical"), inv_interval=1)
    x, y = batch()
    with pytest.warns(UserWarning, match="rebuilding them in float64"):
        opt.step(x, y, PhaseTimer(CPU))
    tried = len(calls)
    assert tried > 0 and opt.info()["float64_systems"]
    opt.step(x, y, PhaseTimer(CPU))
    assert len(calls) == tried  # no float32 attempt on the second refresh
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in opt.params)
