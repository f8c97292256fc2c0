"""Kronecker factor maths against brute force: per-example loops, dense Jacobians, explicit
patches (optim/factors.py, from the rows optim/capture.py records)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from shared_nets import DISTRIBUTIONS, conv_net, data, mlp, record
from torch import Tensor, nn

from kfacbench.core.problem import Distribution, Problem, per_example_loss
from kfacbench.optim.capture import (
    Layer,
    exact_output_grads,
    find_layers,
    grad_matrix,
    output_grads,
)
from kfacbench.optim.factors import (
    SYMMETRIC_MIN_DIM,
    accumulate_gram,
    cross_factors,
    factors,
    gram,
    kronecker_factors,
)


def saver(
    seen: dict[int, tuple[Tensor, Tensor]], j: int
) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
    """A forward hook keeping (the one example's input, the output with its .grad retained)."""

    def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        out.retain_grad()
        seen[j] = (args[0].detach()[0], out)

    return hook


def brute_rows(
    problem: Problem, layers: list[Layer], x: Tensor, y: Tensor
) -> tuple[list[list[Tensor]], list[list[Tensor]]]:
    """Per example, per layer: the input ā (with its 1) and the output-gradient g of the example's
    own loss, each from an independent forward/backward on that example alone. Conv layers give
    the raw input map and the (C_out, H', W') gradient map instead."""
    inputs: list[list[Tensor]] = []
    grads: list[list[Tensor]] = []
    for i in range(x.shape[0]):
        seen: dict[int, tuple[Tensor, Tensor]] = {}
        handles = [
            layer.module.register_forward_hook(saver(seen, j)) for j, layer in enumerate(layers)
        ]
        out = problem.model(x[i : i + 1])
        for h in handles:
            h.remove()
        per_example_loss(problem.distribution, out, y[i : i + 1]).sum().backward()
        row_in, row_g = [], []
        for j, layer in enumerate(layers):
            a, s = seen[j]
            assert s.grad is not None
            if layer.kind == "linear" and layer.has_bias:
                a = torch.cat([a, a.new_ones(1)])
            row_in.append(a)
            row_g.append(s.grad[0])
        inputs.append(row_in)
        grads.append(row_g)
    problem.model.zero_grad(set_to_none=True)
    return inputs, grads


def outer_mean(rows: list[Tensor], other: list[Tensor] | None = None) -> Tensor:
    """(1/n) Σ r oᵀ by an explicit loop."""
    other = rows if other is None else other
    total = torch.zeros(rows[0].numel(), other[0].numel(), dtype=rows[0].dtype)
    for r, o in zip(rows, other, strict=True):
        total += torch.outer(r, o)
    return total / len(rows)


# ---------------------------------------------------------------------------------------------
# Linear layers


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_linear_factors_equal_per_example_outer_products(distribution: Distribution) -> None:
    problem = Problem(mlp((4, 3, 2)), distribution)
    x, y = data(distribution, 6, 4, 2)
    layers, capture, out = record(problem, x)
    gs = output_grads(capture, layers, problem, out, y, fisher="empirical")
    brute_a, brute_g = brute_rows(problem, layers, x, y)
    for j, (layer, g) in enumerate(zip(layers, gs, strict=True)):
        a_fac, g_fac = factors(layer, capture.inputs(layer), g, x.shape[0])
        torch.testing.assert_close(a_fac, outer_mean([r[j] for r in brute_a]))
        torch.testing.assert_close(g_fac, outer_mean([r[j] for r in brute_g]))


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_one_example_kronecker_product_is_the_empirical_fisher_block(
    distribution: Distribution,
) -> None:
    """For one example ∇W̄ = g āᵀ exactly, so its outer product is A ⊗ G in the right vec order:
    kron(G, A) for PyTorch's row-major flatten, kron(A, G) for the paper's column stacking."""
    problem = Problem(mlp((4, 3, 2)), distribution)
    x, y = data(distribution, 1, 4, 2)
    layers, capture, out = record(problem, x)
    gs = output_grads(capture, layers, problem, out, y, fisher="empirical")
    problem.loss(out, y).backward()
    for layer, g in zip(layers, gs, strict=True):
        a_fac, g_fac = factors(layer, capture.inputs(layer), g, 1)
        grad = grad_matrix(layer)
        row_major = grad.flatten()
        torch.testing.assert_close(torch.kron(g_fac, a_fac), torch.outer(row_major, row_major))
        col_major = grad.T.flatten()
        torch.testing.assert_close(torch.kron(a_fac, g_fac), torch.outer(col_major, col_major))


def test_cross_factors_equal_per_example_outer_products() -> None:
    problem = Problem(mlp((4, 3, 3, 2)), "categorical")
    x, y = data("categorical", 5, 4, 2)
    layers, capture, out = record(problem, x)
    gs = output_grads(capture, layers, problem, out, y, fisher="empirical")
    brute_a, brute_g = brute_rows(problem, layers, x, y)
    for i in range(len(layers) - 1):
        a_cross, g_cross = cross_factors(
            capture.inputs(layers[i]), capture.inputs(layers[i + 1]), gs[i], gs[i + 1], 5
        )
        expected_a = outer_mean([r[i] for r in brute_a], [r[i + 1] for r in brute_a])
        expected_g = outer_mean([r[i] for r in brute_g], [r[i + 1] for r in brute_g])
        torch.testing.assert_close(a_cross, expected_a)
        torch.testing.assert_close(g_cross, expected_g)
        assert a_cross.shape == (layers[i].in_dim, layers[i + 1].in_dim)
        assert g_cross.shape == (layers[i].out_dim, layers[i + 1].out_dim)


# ---------------------------------------------------------------------------------------------
# The exact (type-2) Fisher


def dense_exact_fisher_block(problem: Problem, layer: Layer, x: Tensor) -> Tensor:
    """Jᵀ H J for one example, with J = ∂z/∂vec_row(W̄) from a dense Jacobian and H the Hessian
    of the per-example loss w.r.t. the output z, both by autograd."""
    names = [n for n, _ in problem.model.named_parameters()]
    prefix = f"{layer.name}."
    own = [n for n in names if n.startswith(prefix) and "." not in n[len(prefix) :]]
    params = dict(problem.model.named_parameters())

    def net(*tensors: Tensor) -> Tensor:
        values = {**params, **dict(zip(own, tensors, strict=True))}
        return torch.func.functional_call(problem.model, values, (x,))[0]

    z = net(*(params[n] for n in own)).detach()
    jac = torch.autograd.functional.jacobian(net, tuple(params[n] for n in own))
    k = z.numel()
    columns = [
        j.reshape(k, layer.out_dim, -1) for j in jac
    ]  # weight (K, out, in), bias (K, out, 1)
    j_bar = torch.cat(columns, dim=2).reshape(k, -1)  # ∂z/∂vec_row(W̄), (K, out·in_dim)
    target = problem.sample_targets(z.unsqueeze(0))  # H does not depend on the target

    def loss(zz: Tensor) -> Tensor:
        return per_example_loss(problem.distribution, zz.unsqueeze(0), target).sum()

    hess = torch.autograd.functional.hessian(loss, z)
    return j_bar.T @ hess @ j_bar


@pytest.mark.parametrize(
    ("distribution", "outputs"), [("categorical", 3), ("gaussian", 2), ("bernoulli", 3)]
)
def test_one_example_exact_fisher_block_is_the_kronecker_product(
    distribution: Distribution, outputs: int
) -> None:
    problem = Problem(mlp((4, 3, outputs), seed=2), distribution)
    x, _ = data(distribution, 1, 4, outputs)
    layers, capture, out = record(problem, x)
    gs = exact_output_grads(capture, layers, problem, out)
    for layer, g in zip(layers, gs, strict=True):
        assert g.shape == (outputs, layer.out_dim)
        a_fac, g_fac = factors(layer, capture.inputs(layer), g, 1)
        expected = dense_exact_fisher_block(problem, layer, x)
        torch.testing.assert_close(torch.kron(g_fac, a_fac), expected)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_batch_exact_factor_is_the_mean_of_single_example_ones(distribution: Distribution) -> None:
    """G_exact over a batch is the per-example average (Linear and Conv2d, k-major stacking)."""
    model = conv_net(kernel_size=3, stride=2, padding=1)
    problem = Problem(model, distribution)
    x = torch.randn(4, 2, 7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.zeros(0)
    batch = kronecker_factors(model, problem, x, y, fisher="exact")
    singles = [kronecker_factors(model, problem, x[i : i + 1], y, fisher="exact") for i in range(4)]
    for name, (_, g_fac) in batch.items():
        torch.testing.assert_close(g_fac, sum(s[name][1] for s in singles) / 4)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_sampled_fisher_is_unbiased_for_the_exact_one(distribution: Distribution) -> None:
    """The average of G over 2000 sampled draws (the batch repeated) approaches G_exact."""
    model = mlp((4, 3, 3), seed=4)
    problem = Problem(model, distribution)
    x, y = data(distribution, 4, 4, 3)
    exact = kronecker_factors(model, problem, x, y, fisher="exact")
    draws = x.repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    sampled = kronecker_factors(model, problem, draws, y, fisher="sampled", generator=gen)
    empirical = kronecker_factors(model, problem, x, y, fisher="empirical")
    for name, (a_exact, g_exact) in exact.items():
        a_sampled, g_sampled = sampled[name]
        torch.testing.assert_close(a_sampled, a_exact)
        error = torch.linalg.matrix_norm(g_sampled - g_exact) / torch.linalg.matrix_norm(g_exact)
        far = torch.linalg.matrix_norm(empirical[name][1] - g_exact)
        assert error < 0.08, (name, error)
        assert far / torch.linalg.matrix_norm(g_exact) > 2 * error  # the check can tell


# ---------------------------------------------------------------------------------------------
# Conv2d layers (KFC normalisation: A averaged over all patch rows, G summed over positions)


def manual_patches(layer: nn.Conv2d, x: Tensor) -> tuple[list[Tensor], tuple[int, int]]:
    """The im2col patches of one example (C, H, W) by explicit loops over output positions,
    zero padding written by hand (no F.unfold). Returns the patches and the output map size."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding == "same":
        top, left = dh * (kh - 1) // 2, dw * (kw - 1) // 2
        bottom, right = dh * (kh - 1) - top, dw * (kw - 1) - left
    else:
        top = bottom = int(layer.padding[0])
        left = right = int(layer.padding[1])
    c, h, w = x.shape
    padded = torch.zeros(c, h + top + bottom, w + left + right, dtype=x.dtype)
    padded[:, top : top + h, left : left + w] = x
    out_h = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    patches = []
    for oh in range(out_h):
        for ow in range(out_w):
            patch = [
                padded[ci, oh * sh + ki * dh, ow * sw + kj * dw]
                for ci in range(c)
                for ki in range(kh)
                for kj in range(kw)
            ]
            patches.append(torch.stack(patch))
    return patches, (out_h, out_w)


CONV_CASES = [
    {"kernel_size": 3, "stride": 2, "padding": 1, "dilation": 2},
    {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
    {"kernel_size": 3, "stride": 1, "padding": 0, "dilation": 1},
    {"kernel_size": (2, 3), "padding": "same", "dilation": (1, 2)},
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv", CONV_CASES)
def test_conv_factors_equal_loops_over_positions(conv: dict[str, Any], bias: bool) -> None:
    model = conv_net(bias=bias, **conv)
    problem = Problem(model, "categorical")
    m = 3
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(m, 2, 7, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (m,), generator=gen)
    layers, capture, out = record(problem, x)
    gs = output_grads(capture, layers, problem, out, y, fisher="empirical")
    conv_layer = layers[0]
    assert conv_layer.kind == "conv2d"
    a_fac, g_fac = factors(conv_layer, capture.inputs(conv_layer), gs[0], m)

    brute_in, brute_g = brute_rows(problem, layers, x, y)
    module = model[0]
    assert isinstance(module, nn.Conv2d)
    a_rows, g_rows = [], []
    g_sum = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(m):
        patches, (out_h, out_w) = manual_patches(module, brute_in[i][0])
        g_map = brute_g[i][0]
        assert g_map.shape == (3, out_h, out_w)
        per_example_grad = torch.zeros(conv_layer.out_dim, conv_layer.in_dim, dtype=torch.float64)
        for t, patch in enumerate(patches):
            a_t = torch.cat([patch, patch.new_ones(1)]) if bias else patch
            g_t = g_map[:, t // out_w, t % out_w]
            a_rows.append(a_t)
            g_sum += torch.outer(g_t, g_t)
            per_example_grad += torch.outer(g_t, a_t)
            g_rows.append(g_t)
        # Patch columns are in the order of grad_matrix's flattened weight: Σ_t g_t ā_tᵀ = ∇W̄.
        problem.model.zero_grad(set_to_none=True)
        problem.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(per_example_grad, grad_matrix(conv_layer))
        # The rows of inputs() and output_grads() pair up example by example, position by position.
        rows = slice(i * len(patches), (i + 1) * len(patches))
        paired = gs[0][rows].T @ capture.inputs(conv_layer)[rows]
        torch.testing.assert_close(paired, per_example_grad)
    torch.testing.assert_close(a_fac, outer_mean(a_rows))  # mean over the m·T patch rows
    torch.testing.assert_close(g_fac, g_sum / m)  # summed over positions, mean over examples
    torch.testing.assert_close(g_fac, outer_mean(g_rows) * len(patches))


def test_one_by_one_conv_on_one_pixel_equals_linear() -> None:
    linear_model = mlp((4, 3, 2), seed=7)
    conv = nn.Conv2d(4, 3, 1).double()
    first, head = linear_model[0], linear_model[2]
    assert isinstance(first, nn.Linear)
    with torch.no_grad():
        conv.weight.copy_(first.weight.reshape(3, 4, 1, 1))
        assert conv.bias is not None
        conv.bias.copy_(first.bias)
    conv_model = nn.Sequential(conv, nn.Sigmoid(), nn.Flatten(), head)
    x, y = data("categorical", 5, 4, 2)
    lin = kronecker_factors(
        linear_model, Problem(linear_model, "categorical"), x, y, fisher="empirical"
    )
    con = kronecker_factors(
        conv_model, Problem(conv_model, "categorical"), x[:, :, None, None], y, fisher="empirical"
    )
    for (a_lin, g_lin), (a_con, g_con) in zip(lin.values(), con.values(), strict=True):
        torch.testing.assert_close(a_con, a_lin)
        torch.testing.assert_close(g_con, g_lin)


# ---------------------------------------------------------------------------------------------
# Precision, hooks, Gram products


def test_bf16_autocast_gives_float32_rows_close_to_float32() -> None:
    model = mlp((4, 3, 2)).float()
    x = torch.randn(8, 4)
    y = torch.randint(0, 2, (8,))
    full = kronecker_factors(model, Problem(model, "categorical"), x, y, fisher="empirical")
    low = kronecker_factors(
        model, Problem(model, "categorical", amp="bf16"), x, y, fisher="empirical"
    )
    for (a_full, g_full), (a_low, g_low) in zip(full.values(), low.values(), strict=True):
        assert a_low.dtype == g_low.dtype == torch.float32
        torch.testing.assert_close(a_low, a_full, rtol=0.05, atol=0.05)
        torch.testing.assert_close(g_low, g_full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("fisher", ["sampled", "empirical", "exact"])
def test_kronecker_factors_leaves_no_hooks_and_no_grad(fisher: Any) -> None:
    model = conv_net(kernel_size=3, stride=2, padding=1).float()
    problem = Problem(model, "categorical")
    x = torch.randn(4, 2, 7, 7)
    y = torch.randint(0, 3, (4,))
    result = kronecker_factors(model, problem, x, y, fisher=fisher)
    assert list(result) == ["0", "3"]
    assert all(not mod._forward_hooks for mod in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for a_fac, g_fac in result.values():
        torch.testing.assert_close(a_fac, a_fac.T)
        torch.testing.assert_close(g_fac, g_fac.T)
    with pytest.raises(ValueError, match=r"problem\.model"):
        kronecker_factors(mlp((4, 3, 2)), problem, x, y)


def test_factors_check_the_row_widths() -> None:
    layer = find_layers(nn.Linear(4, 3))[0][0]
    with pytest.raises(ValueError, match="expected 5 and 3"):
        factors(layer, torch.ones(2, 4), torch.ones(2, 3), 2)


@pytest.mark.parametrize(("d", "blocks"), [(300, 4), (257, 3), (512, 5), (100, 4), (300, 1)])
def test_gram_from_the_upper_block_triangle_equals_the_full_product(d: int, blocks: int) -> None:
    """Uneven block edges included; narrow inputs take the plain GEMM."""
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    got = gram(x, blocks)
    torch.testing.assert_close(got, x.T @ x, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(got, got.T, rtol=0, atol=1e-12)
    if blocks > 1 and d >= SYMMETRIC_MIN_DIM:  # the last block column mirrors the first rows
        assert torch.equal(
            got[d - d // blocks :, : d // blocks], got[: d // blocks, d - d // blocks :].T
        )


def test_accumulate_gram_folds_the_moving_average_into_one_gemm() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    average = torch.eye(4, dtype=torch.float64)
    want = 0.75 * average + 0.25 * rows.T @ rows / 5
    accumulate_gram(average, rows, divisor=5, weight=0.25)
    torch.testing.assert_close(average, want)
