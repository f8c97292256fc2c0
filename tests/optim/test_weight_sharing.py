"""K-FAC for weight-sharing layers (Eschenhagen et al. 2023): expand and reduce.

Brute force throughout: factors against explicit per-example, per-position loops; whole
Kronecker blocks against the generalised Gauss-Newton matrix Jᵀ (∂²L/∂z²) J formed densely from
autograd Jacobians and the loss Hessian, on models where each approximation is exact (deep linear
networks applied position-wise for expand, ones that pool positions for reduce).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from kfacbench.core.problem import Distribution, Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim.capture import Layer, find_layers
from kfacbench.optim.factors import kronecker_factors
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.rescale import fisher_quadratic
from kfacbench.workloads.transformer import byte_gpt

F64 = torch.float64
"""Every model and tensor here: brute-force comparisons at tight tolerances."""


class MeanOverPositions(nn.Module):
    """Pools ``(batch, positions, features)`` to ``(batch, features)``: the reduce setting."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def w_bar(layer: Layer) -> Tensor:
    """[W | b] of a Linear layer, flattened row-major (the order of ``kron(G, A)``)."""
    weight = layer.module.weight.detach()
    if not layer.has_bias:
        return weight.flatten()
    return torch.cat([weight, layer.module.bias.detach()[:, None]], 1).flatten()  # type: ignore[index]


def ggn_block(model: nn.Module, problem: Problem, x: Tensor, y: Tensor, layer: Layer) -> Tensor:
    """The GGN of the mean loss restricted to one layer's W̄: Jᵀ (∂²L/∂z²) J, with J the
    Jacobian of the whole output tensor z w.r.t. W̄ and the loss Hessian from autograd."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out_dim, in_dim = layer.out_dim, layer.in_dim

    def output(flat: Tensor) -> Tensor:
        mat = flat.view(out_dim, in_dim)
        values = dict(params)
        if layer.has_bias:
            values[f"{layer.name}.weight"] = mat[:, :-1]
            values[f"{layer.name}.bias"] = mat[:, -1]
        else:
            values[f"{layer.name}.weight"] = mat
        return functional_call(model, values, (x,)).flatten()

    wb = w_bar(layer)
    jac = jacrev(output)(wb)  # (outputs, out·in)
    z = output(wb).detach()
    hess = torch.autograd.functional.hessian(
        lambda flat: problem.loss(flat.view_as(model(x)), y), z
    )
    return jac.T @ hess @ jac


def kron_block(a: Tensor, g: Tensor) -> Tensor:
    return torch.kron(g, a)  # row-major vec(W̄): see factors.py's module docstring


def tiny_gpt(context: int = 6) -> nn.Module:
    return byte_gpt(
        context=context, width=8, depth=1, heads=2, generator=torch.Generator().manual_seed(3)
    ).double()


def recorded(module: nn.Module, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward pass of ``model`` on ``x``: ``module``'s input, its output (in the graph)
    and the network output."""
    seen: dict[str, Tensor] = {}

    def hook(_: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        seen["a"], seen["s"] = args[0].detach(), out

    handle = module.register_forward_hook(hook)
    try:
        z = model(x)
    finally:
        handle.remove()
    return seen["a"], seen["s"], z


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_factors_equal_explicit_per_example_per_position_sums(weight_sharing: str) -> None:
    """Every Linear layer of a tiny GPT (attention, MLP, output), empirical Fisher: Ā and G from
    one example at a time, one position at a time, with b = ∂(Σ_p ℓ_p)/∂s the gradient of the
    example's summed per-token losses: expand Ā = (1/(NR)) Σ_{n,r} āāᵀ, G = (1/(NP)) Σ_{n,r} bbᵀ;
    reduce Ā = (1/N) Σ_n â âᵀ (â the mean over positions), G = (1/(NP)) Σ_n (Σ_r b)(Σ_r b)ᵀ."""
    model = tiny_gpt()
    n, p = 3, 6
    x = torch.randint(256, (n, p), generator=torch.Generator().manual_seed(0))
    y = torch.randint(256, (n, p), generator=torch.Generator().manual_seed(1))
    problem = Problem(model, "categorical")
    got = kronecker_factors(model, problem, x, y, fisher="empirical", weight_sharing=weight_sharing)
    layers, _ = find_layers(model)
    assert {layer.name for layer in layers} == set(got)
    for layer in layers:
        want_a = torch.zeros(layer.in_dim, layer.in_dim, dtype=F64)
        want_g = torch.zeros(layer.out_dim, layer.out_dim, dtype=F64)
        for i in range(n):
            a, s, z = recorded(layer.module, model, x[i : i + 1])
            tokens = F.cross_entropy(z[0], y[i], reduction="none")
            (b,) = torch.autograd.grad(tokens.sum(), s)
            a_rows = torch.cat([a[0], torch.ones(p, 1, dtype=F64)], 1) if layer.has_bias else a[0]
            if weight_sharing == "expand":
                for r in range(p):
                    want_a += torch.outer(a_rows[r], a_rows[r]) / (n * p)
                    want_g += torch.outer(b[0, r], b[0, r]) / (n * p)
            else:
                a_hat, b_sum = a_rows.mean(0), b[0].sum(0)
                want_a += torch.outer(a_hat, a_hat) / n
                want_g += torch.outer(b_sum, b_sum) / (n * p)
        torch.testing.assert_close(got[layer.name][0], want_a, msg=layer.name)
        torch.testing.assert_close(got[layer.name][1], want_g, msg=layer.name)


def test_expand_equals_reduce_with_one_position() -> None:
    model = tiny_gpt()
    x = torch.randint(256, (4, 1), generator=torch.Generator().manual_seed(0))
    y = torch.randint(256, (4, 1), generator=torch.Generator().manual_seed(1))
    problem = Problem(model, "categorical")
    expand = kronecker_factors(model, problem, x, y, fisher="empirical", weight_sharing="expand")
    reduce = kronecker_factors(model, problem, x, y, fisher="empirical", weight_sharing="reduce")
    for name, (a, g) in expand.items():
        torch.testing.assert_close(reduce[name][0], a, msg=name)
        torch.testing.assert_close(reduce[name][1], g, msg=name)


def positionwise_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()


def pooled_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), MeanOverPositions(), nn.Linear(4, 2)).double()


def zero_classifier() -> nn.Module:
    """Position-wise logits of a zero Linear layer: uniform softmax at every position, so every
    per-token loss Hessian is the same and K-FAC-expand is exact for the per-token mean loss."""
    layer = nn.Linear(3, 4).double()
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


CASES: list[tuple[str, Callable[[], nn.Module], Distribution, str]] = [
    ("position-wise deep linear, Gaussian", positionwise_linear, "gaussian", "expand"),
    ("pooled deep linear, Gaussian", pooled_linear, "gaussian", "reduce"),
    ("zero classifier, per-token loss", zero_classifier, "categorical", "expand"),
]


def case_data(build: Callable[[], nn.Module], dist: Distribution) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 3, generator=gen, dtype=F64)
    with torch.no_grad():
        z = build()(x)
    if dist == "categorical":
        return x, torch.randint(z.shape[-1], z.shape[:-1], generator=gen)
    return x, torch.randn(z.shape, generator=gen, dtype=F64)


@pytest.mark.parametrize(("case", "build", "dist", "weight_sharing"), CASES)
def test_exact_fisher_factors_give_the_ggn_where_the_approximation_is_exact(
    case: str, build: Callable[[], nn.Module], dist: Distribution, weight_sharing: str
) -> None:
    """The exact ("type-2") Fisher's A ⊗ G equals the dense GGN block of every layer."""
    model = build()
    x, y = case_data(build, dist)
    problem = Problem(model, dist)
    got = kronecker_factors(model, problem, x, y, fisher="exact", weight_sharing=weight_sharing)
    for layer in find_layers(model)[0]:
        want = ggn_block(model, problem, x, y, layer)
        torch.testing.assert_close(kron_block(*got[layer.name]), want, msg=f"{case}: {layer.name}")


def test_expand_is_not_exact_in_the_reduce_setting() -> None:
    """The comparison above can fail: on the pooled network expand's first block is off."""
    model = pooled_linear()
    x, y = case_data(pooled_linear, "gaussian")
    problem = Problem(model, "gaussian")
    got = kronecker_factors(model, problem, x, y, fisher="exact", weight_sharing="expand")
    layer = find_layers(model)[0][0]
    gap = kron_block(*got[layer.name]) - ggn_block(model, problem, x, y, layer)
    assert float(gap.abs().max()) > 1e-2


def test_sampled_fisher_of_a_per_token_loss_has_the_exact_fishers_scale() -> None:
    """Sampled targets: G estimates the same matrix as the exact Fisher (the √P correction of a
    per-token mean loss; without it G would be P = 5 times too small)."""
    model = zero_classifier()
    x = torch.randn(4000, 5, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    problem = Problem(model, "categorical")
    y = torch.zeros(4000, 5, dtype=torch.long)
    gen = torch.Generator().manual_seed(1)
    sampled = kronecker_factors(model, problem, x, y, fisher="sampled", generator=gen)
    exact = kronecker_factors(model, problem, x[:50], y[:50], fisher="exact")
    g_sampled, g_exact = sampled[""][1], exact[""][1]
    assert float((g_sampled - g_exact).norm() / g_exact.norm()) < 0.05


def test_fisher_quadratic_of_a_sequence_output_is_the_ggns() -> None:
    """uᵀ (∂²L/∂z²) v for the per-token mean loss, L = mean over examples."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    y = torch.randint(5, (3, 4), generator=gen)
    u = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    v = torch.randn(3, 4, 5, generator=gen, dtype=F64)
    problem = Problem(nn.Identity(), "categorical")
    hess = torch.autograd.functional.hessian(lambda t: problem.loss(t.view_as(z), y), z.flatten())
    want = u.flatten() @ hess @ v.flatten()
    torch.testing.assert_close(fisher_quadratic("categorical", z, u, v), want.float())


@pytest.mark.parametrize(
    ("build", "dist", "weight_sharing"),
    [(positionwise_linear, "gaussian", "expand"), (pooled_linear, "gaussian", "reduce")],
)
def test_kfac_optimizer_measures_the_ggn_blocks(
    build: Callable[[], nn.Module], dist: Distribution, weight_sharing: str
) -> None:
    """The optimizer's own first factors (before its update) on the exact cases above."""
    model = build()
    before = copy.deepcopy(model)
    x, y = case_data(build, dist)
    opt = KFAC(
        Problem(model, dist),
        fisher="exact",
        weight_sharing=weight_sharing,
        rescale=False,
        adapt_damping=False,
        adapt_gamma=False,
        damping=1.0,
        weight_decay=0.0,
        lr=0.01,
    )
    opt.step(x, y, PhaseTimer(torch.device("cpu")))
    problem = Problem(before, dist)
    for c, layer in zip(opt.curv, find_layers(before)[0], strict=True):
        assert c.a is not None and c.g is not None
        want = ggn_block(before, problem, x, y, layer)
        torch.testing.assert_close(kron_block(c.a, c.g), want, msg=layer.name)


def test_reduce_on_a_conv_layer_pools_each_examples_patches() -> None:
    """K-FAC-reduce for convolutions: Ā from each example's mean im2col patch, G from its
    output gradient summed over positions (Eschenhagen et al. 2023, §3 applied to conv)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    y = torch.randn(4, 3, 5, 5, dtype=F64)
    problem = Problem(conv, "gaussian")
    got = kronecker_factors(conv, problem, x, y, fisher="empirical", weight_sharing="reduce")[""]
    patches = F.unfold(x, 3, padding=1)  # (m, C_in·9, positions)
    a_hat = torch.cat([patches.mean(2), torch.ones(4, 1, dtype=F64)], 1)
    out = conv(x)
    (grad,) = torch.autograd.grad(0.5 * (out - y).pow(2).sum(), out)
    b_sum = grad.sum((2, 3))
    torch.testing.assert_close(got[0], a_hat.T @ a_hat / 4)
    torch.testing.assert_close(got[1], b_sum.T @ b_sum / 4)
