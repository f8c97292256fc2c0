"""Kronecker-factor maths shared by K-FAC and SKFAC: factor rows, products and moving averages.

The rows come from :mod:`kfacbench.optim.capture` (its module docstring has the notation: ā, g,
W̄ and the three Fishers); here they become the factors Ā = E[ā āᵀ] and G = E[g gᵀ] of each
layer's Fisher block (Martens & Grosse 2015, §3), with the normalisation and weight-sharing rules
below.

**vec ordering.** The paper's vec stacks *columns*, for which vec(g āᵀ) = ā ⊗ g and the block is
``torch.kron(A, G)``. PyTorch flattens row-major, for which ``(g āᵀ).flatten()`` = g ⊗ ā and the
same block is ``torch.kron(G, A)``. Either way (Ā ⊗ G)⁻¹ vec(V) = vec(G⁻¹ V Ā⁻¹) for an
``(out_dim, in_dim)`` matrix V, which is all the optimizers use.

**Normalisation.** G is always the per-example expectation (the rows are gradients of the *sum* of
per-example losses, i.e. m times the mean-loss gradient). For Conv2d layers (KFC, Grosse & Martens
2016, §3) ā is one im2col patch per example and output position t ∈ T and g the output-gradient at
that position. Under the assumptions of independent activations and derivatives (IAD), spatial
homogeneity (SH) and spatially uncorrelated derivatives (SUD), the block is
E[Σ_t ā_t ā_tᵀ] ⊗ (1/|T|) E[Σ_t g_t g_tᵀ] (their Ω ⊗ Γ). Here the 1/|T| sits on the other
factor: A = E[(1/|T|) Σ_t ā_t āᵀ_t] is the average over all m·|T| patch rows and
G = E[Σ_t g_t g_tᵀ] is summed over positions and averaged over examples. The Kronecker product is
the same, and with the factored damping's π (K-FAC §6.3) the damped inverse is too (π absorbs any
rescaling c·A, G/c); a damping without π (SKFAC's √λ per factor) does see the split. This one keeps
A a plain second moment of the patches, on the scale of a Linear layer's A, and G on the scale of
the per-example gradient.

**Weight sharing** (Eschenhagen et al., NeurIPS 2023). A Linear layer applied to inputs with
extra leading dimensions (a transformer's positions) shares its weight over R positions as a
conv shares it over T. Two approximations of its Fisher block, chosen by ``weight_sharing``:

- ``expand`` (positions as extra examples): Ā = (1/(mR)) Σ_{i,r} ā_{i,r} ā_{i,r}ᵀ and
  G = (1/m) Σ_{i,r} g_{i,r} g_{i,r}ᵀ, exactly the KFC normalisation above (KFC is expand);
- ``reduce`` (positions pooled first): Ā = (1/m) Σ_i â_i â_iᵀ with â_i = (1/R) Σ_r ā_{i,r}, and
  G = (1/m) Σ_i ĝ_i ĝ_iᵀ with ĝ_i = Σ_r g_{i,r}: m rows instead of m·R, so cheaper factors.

They agree when R = 1. Expand is exact for deep linear networks applied position-wise (the
expand setting), reduce for ones that pool positions before the output (the reduce setting).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import Tensor, nn

from kfacbench.core.problem import Problem
from kfacbench.optim.capture import (
    Capture,
    Fisher,
    Layer,
    exact_output_grads,
    find_layers,
    output_grads,
)

WeightSharing = Literal["expand", "reduce"]
"""How a layer that shares its weight over positions is approximated; see the module docstring."""
WEIGHT_SHARING: tuple[WeightSharing, ...] = ("expand", "reduce")


SYMMETRIC_BLOCKS = 4
"""Block rows of :func:`gram`: b(b+1)/2 of the b² blocks are computed, 5/8 of the FLOPs at 4."""
SYMMETRIC_MIN_DIM = 256
"""Narrower factors take one GEMM: below this the saved FLOPs do not pay for the extra calls
and the mirror copy (README, "Symmetric factor products")."""


def gram(x: Tensor, blocks: int | None = None) -> Tensor:
    """xᵀx for rows ``x`` of shape ``(n, d)``, computing only its upper block triangle.

    A factor Ā = āᵀā is symmetric, so a plain GEMM does almost twice the work needed (BLAS's
    SYRK exists for this, but torch does not expose it). Split the columns into ``blocks``
    ranges; block row i is one GEMM x_iᵀ x[:, lo_i:] written into the output, and the blocks
    below the diagonal are copied from their mirror images (the diagonal blocks are as symmetric
    as a plain GEMM's output).
    """
    blocks = SYMMETRIC_BLOCKS if blocks is None else blocks
    d = x.shape[1]
    if blocks <= 1 or d < SYMMETRIC_MIN_DIM:
        return torch.mm(x.T, x)
    edges = [d * i // blocks for i in range(blocks + 1)]
    out = x.new_empty(d, d)
    for lo, hi in itertools.pairwise(edges):  # block rows of the upper triangle, in place
        torch.mm(x[:, lo:hi].T, x[:, lo:], out=out[lo:hi, lo:])
    for lo, hi in itertools.pairwise(edges):  # the strictly lower blocks mirror them
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


def factor_rows(
    layer: Layer,
    a: Tensor,
    g: Tensor,
    batch_size: int,
    weight_sharing: WeightSharing = "expand",
) -> tuple[Tensor, Tensor, int, int]:
    """The rows whose Gram matrices are a layer's Kronecker factors, and their divisors.

    ``A = āᵀā / na`` and ``G = gᵀg / ng`` with ``(ā, g, na, ng)`` returned here; see
    :func:`factors` for the arguments and the two weight-sharing rules.
    """
    if a.shape[-1] != layer.in_dim or g.shape[-1] != layer.out_dim:
        raise ValueError(
            f"layer {layer.name!r}: rows of width {a.shape[-1]} and {g.shape[-1]}, expected"
            f" {layer.in_dim} and {layer.out_dim}"
        )
    if weight_sharing == "reduce":
        positions = a.shape[0] // batch_size
        a = a.reshape(batch_size, positions, -1).mean(1)
        g = g.reshape(-1, positions, g.shape[-1]).sum(1)
    elif weight_sharing != "expand":
        raise ValueError(f"unknown weight_sharing {weight_sharing!r}; known: expand, reduce")
    return a, g, a.shape[0], batch_size


def factors(
    layer: Layer,
    a: Tensor,
    g: Tensor,
    batch_size: int,
    weight_sharing: WeightSharing = "expand",
) -> tuple[Tensor, Tensor]:
    """The Kronecker factors ``(A, G)`` of one layer from its rows (Martens & Grosse 2015, §3).

    ``expand``: A = āᵀā / rows(ā), the average over all input rows (examples, and positions
    for Conv2d and sequences). G = gᵀg / m: summed over rows within an example (positions; the
    K columns of the exact Fisher) and averaged over the ``batch_size`` examples. For Linear
    layers on plain ``(m, features)`` inputs these are E[ā āᵀ] and E[g gᵀ]; for Conv2d see the
    module docstring (KFC normalisation). ``reduce`` averages each example's R input rows and
    sums its output-gradient rows before the products (Eschenhagen et al. 2023; the module
    docstring); with one row per example the two are the same.

    Args:
        layer: the layer (checks the widths).
        a: rows from :meth:`Capture.inputs`, ``(rows, in_dim)``, example-major.
        g: rows from :func:`output_grads` or :func:`exact_output_grads`, ``(rows', out_dim)``,
            in the same order (K blocks of them for the exact Fisher).
        batch_size: m, the number of examples the rows come from.
        weight_sharing: ``expand`` or ``reduce``.

    Returns:
        ``A`` of shape ``(in_dim, in_dim)`` and ``G`` of shape ``(out_dim, out_dim)``.
    """
    a, g, na, ng = factor_rows(layer, a, g, batch_size, weight_sharing)
    return gram(a).div_(na), gram(g).div_(ng)


def accumulate_gram(average: Tensor, rows: Tensor, divisor: int, weight: float) -> None:
    """``average ← (1 − weight)·average + weight·rowsᵀrows/divisor`` as one GEMM (``addmm``).

    The moving average (§5) folded into the product's β and α: one kernel per factor instead of
    a product, a division and an interpolation, and no temporary factor. Used on CUDA, where a
    single GEMM beats :func:`gram`'s blocked upper triangle (several narrower GEMMs and a mirror
    copy, measured faster on the CPU only: README, "Symmetric factor products").
    """
    average.addmm_(rows.T, rows, beta=1.0 - weight, alpha=weight / divisor)


def cross_factors(
    a_prev: Tensor, a_next: Tensor, g_prev: Tensor, g_next: Tensor, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Cross-layer factors of consecutive layers i, i+1 for the block-tridiagonal inverse (§4.3).

    Ā_{i-1,i} = E[ā_{i-1} ā_iᵀ] from the two layers' inputs and G_{i,i+1} = E[g_i g_{i+1}ᵀ] from
    their output-gradients, normalised like :func:`factors`. Rows must be aligned example by
    example, which holds for chains of Linear layers (the case §4.3 covers).

    Args:
        a_prev: input rows of layer i, ``(m, in_i)``.
        a_next: input rows of layer i+1, ``(m, in_{i+1})``.
        g_prev: output-gradient rows of layer i, ``(m, out_i)``.
        g_next: output-gradient rows of layer i+1, ``(m, out_{i+1})``.
        batch_size: m.

    Returns:
        ``Ā_{i-1,i}`` of shape ``(in_i, in_{i+1})`` and ``G_{i,i+1}`` of shape
        ``(out_i, out_{i+1})``.
    """
    if a_prev.shape[0] != a_next.shape[0] or g_prev.shape[0] != g_next.shape[0]:
        raise ValueError(
            "cross factors need the same rows in both layers (chains of Linear layers), got"
            f" {a_prev.shape[0]}/{a_next.shape[0]} input and {g_prev.shape[0]}/{g_next.shape[0]}"
            " gradient rows"
        )
    return (
        torch.mm(a_prev.T, a_next).div_(a_prev.shape[0]),
        torch.mm(g_prev.T, g_next).div_(batch_size),
    )


def kronecker_factors(
    model: nn.Module,
    problem: Problem,
    x: Tensor,
    y: Tensor,
    *,
    fisher: Fisher = "sampled",
    generator: torch.Generator | None = None,
    weight_sharing: WeightSharing = "expand",
) -> dict[str, tuple[Tensor, Tensor]]:
    """The Kronecker factors ``(A, G)`` of every supported layer of ``model`` on one batch.

    A diagnostic for any model (inspecting or plotting curvature, checking an implementation):
    one recorded forward pass and one gradient pass w.r.t. the layer outputs. It leaves no hooks
    and no ``.grad`` behind. The model runs in its current mode (BatchNorm in training mode updates
    its running statistics).

    Args:
        model: the network; must be ``problem.model``.
        problem: gives the forward pass (autocast included), the loss and the distribution.
        x: inputs, ``(m, ...)``.
        y: data targets (used by ``fisher="empirical"`` only).
        fisher: ``"sampled"``, ``"empirical"`` or ``"exact"`` (see the module docstring).
        generator: the random source of sampled targets.
        weight_sharing: ``expand`` or ``reduce`` for layers applied at several positions.

    Returns:
        ``{layer name: (A, G)}`` in :func:`find_layers` order.
    """
    if problem.model is not model:
        raise ValueError("kronecker_factors: problem.model must be model")
    layers, _ = find_layers(model)
    capture = Capture(layers)
    try:
        with capture.recording():
            output = problem.forward(x)
        if fisher == "exact":
            gs = exact_output_grads(capture, layers, problem, output, retain_graph=False)
        else:
            gs = output_grads(
                capture,
                layers,
                problem,
                output,
                y,
                fisher=fisher,
                generator=generator,
                retain_graph=False,
            )
        m = output.shape[0]
        return {
            layer.name: factors(layer, capture.inputs(layer), g, m, weight_sharing)
            for layer, g in zip(layers, gs, strict=True)
        }
    finally:
        capture.clear()
