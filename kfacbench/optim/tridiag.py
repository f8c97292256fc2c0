"""K-FAC's block-tridiagonal inverse F̂⁻¹ (Martens & Grosse 2015, §4.3 and Appendix B).

For a chain of ℓ fully connected layers, the block-diagonal approximation (§4.2) drops all
interactions between layers. §4.3 keeps those between neighbours: it models the K-FAC matrix F̃
(blocks F̃_{i,j} = Ā_{i-1,j-1} ⊗ G_{i,j}) as the covariance of a directed Gaussian chain
θ_ℓ → θ_{ℓ-1} → … → θ_1, where θ_i given θ_{i+1} has mean Ψ_{i,i+1} θ_{i+1} and covariance
Σ_{i|i+1}. Matching F̃'s diagonal and first off-diagonal blocks fixes

- Ψ_{i,i+1} = F̃_{i,i+1} F̃_{i+1,i+1}⁻¹ = Ψ^Ā_{i-1,i} ⊗ Ψ^G_{i,i+1}, with
  Ψ^Ā_{i-1,i} = Ā_{i-1,i} Ā_{i,i}⁻¹ and Ψ^G_{i,i+1} = G_{i,i+1} G_{i+1,i+1}⁻¹;
- Σ_{i|i+1} = F̃_{i,i} − Ψ_{i,i+1} F̃_{i+1,i+1} Ψ_{i,i+1}ᵀ
  = Ā_{i-1,i-1} ⊗ G_{i,i} − Ψ^Ā Ā_{i,i} Ψ^Āᵀ ⊗ Ψ^G G_{i+1,i+1} Ψ^Gᵀ, and Σ_ℓ = F̃_{ℓ,ℓ};

and the chain's precision matrix is F̂⁻¹ = Ξᵀ Λ Ξ, with Ξ unit block-upper-bidiagonal (−Ψ_{i,i+1}
above the diagonal) and Λ = blockdiag(Σ_{1|2}⁻¹, …, Σ_{ℓ-1|ℓ}⁻¹, Σ_ℓ⁻¹). F̂ equals F̃ on the
diagonal and first off-diagonal blocks; F̂⁻¹ is block-tridiagonal.

**Σ⁻¹ (Appendix B).** Σ_{i|i+1} = A₁ ⊗ G₁ − A₂ ⊗ G₂ is a difference of Kronecker products, which
simultaneous diagonalisation inverts without forming it: with A₁ = L Lᵀ and the eigendecomposition
L⁻¹ A₂ L⁻ᵀ = E S Eᵀ, K_A = L⁻ᵀ E satisfies K_Aᵀ A₁ K_A = I and K_Aᵀ A₂ K_A = S; likewise for G.
Then Σ⁻¹ = (K_A ⊗ K_G)(I − S_A ⊗ S_G)⁻¹(K_A ⊗ K_G)ᵀ, whose middle factor is an elementwise scale.
Here A₂ = C Ā_{i,i}⁻¹ Cᵀ with C = Ā_{i-1,i}, so L⁻¹ A₂ L⁻ᵀ = Y Yᵀ for the whitened cross-moment
Y = L⁻¹ C M⁻ᵀ (Ā_{i,i} = M Mᵀ): S_A holds the squared canonical correlations between ā_{i-1} and
ā_i, which lie in [0, 1] for any joint second-moment matrix and in [0, 1) once the diagonal
factors are damped. So Σ_{i|i+1} is positive definite and 1 − s_G s_A > 0.

**Damping.** The paper (§6.3) damps only the diagonal blocks: F̃_{i,i} is replaced by its factored
Tikhonov form (Ā_{i-1,i-1} + π_i γ I) ⊗ (G_{i,i} + γ/π_i I), and Ψ and Σ are then computed from
the damped factors while the cross factors stay as estimated. This module takes the diagonal
factors already damped (the caller owns π and γ) and uses them everywhere, which is that recipe.

**vec convention.** As in the paper, vec stacks columns, so for a layer's ``(out, in)`` gradient
matrix V, (A ⊗ G) vec(V) = vec(G V Aᵀ) and the dense block of F̃ is ``torch.kron(A, G)`` applied to
``V.mT.flatten()``. Every Kronecker product is applied in this matrix form and never formed.

**Numerics and cost.** Near 1, s_A and s_G decide 1/(1 − s_G s_A), and a whitening in float32
loses them when the damped factors are ill-conditioned, so :func:`tridiag_inverse` works in
float64 (one Cholesky per factor, one eigh per Σ factor pair, triangular solves) and casts its
results back (it runs every T3 steps). :func:`tridiag_apply`, run every step, is matrix products
and one elementwise scale per layer, with no host synchronisation; on the CURVES autoencoder it
takes about 1.1× the multiply-adds of the block-diagonal eigenbasis apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TridiagInverse:
    """Precomputed pieces of F̂⁻¹ for a chain of ℓ layers (refreshed every inv_interval steps).

    Layer i (0-based) has an ``(out_i, in_i)`` gradient matrix. All tensors have the dtype of the
    factors given to :func:`tridiag_inverse`.

    Attributes:
        psi_a: Ψ^Ā_{i-1,i} = Ā_{i-1,i} Ā_{i,i}⁻¹ of shape ``(in_i, in_{i+1})``, for i < ℓ − 1.
        psi_g: Ψ^G_{i,i+1} = G_{i,i+1} G_{i+1,i+1}⁻¹ of shape ``(out_i, out_{i+1})``, for i < ℓ − 1.
        k_a: K_A of Σ_{i|i+1}, ``(in_i, in_i)``, for i < ℓ − 1: Σ_{i|i+1}⁻¹ acts on V as
            K_G (scale ∘ (K_Gᵀ V K_A)) K_Aᵀ (Appendix B).
        k_g: K_G of Σ_{i|i+1}, ``(out_i, out_i)``, for i < ℓ − 1.
        scale: 1 / (1 − s_G s_Aᵀ) of Σ_{i|i+1}, ``(out_i, in_i)``, for i < ℓ − 1.
        a_inv: Ā⁻¹ of the last layer: Σ_ℓ = Ā ⊗ G has no subtracted term, so Σ_ℓ⁻¹ acts as
            G⁻¹ V Ā⁻¹, two products instead of four.
        g_inv: G⁻¹ of the last layer.
    """

    psi_a: list[Tensor]
    psi_g: list[Tensor]
    k_a: list[Tensor]
    k_g: list[Tensor]
    scale: list[Tensor]
    a_inv: Tensor
    g_inv: Tensor


def _check_shapes(
    diag_a: Sequence[Tensor],
    diag_g: Sequence[Tensor],
    cross_a: Sequence[Tensor],
    cross_g: Sequence[Tensor],
) -> None:
    """Raise ValueError unless the factors describe one chain of layers."""
    n = len(diag_a)
    if n == 0 or len(diag_g) != n or len(cross_a) != n - 1 or len(cross_g) != n - 1:
        raise ValueError(
            f"tridiag_inverse needs ℓ ≥ 1 diagonal and ℓ − 1 cross factors of each kind, got"
            f" {len(diag_a)}/{len(diag_g)} diagonal and {len(cross_a)}/{len(cross_g)} cross"
        )
    ins = [a.shape[-1] for a in diag_a]
    outs = [g.shape[-1] for g in diag_g]
    for i in range(n):
        if diag_a[i].shape != (ins[i], ins[i]) or diag_g[i].shape != (outs[i], outs[i]):
            raise ValueError(
                f"layer {i}: diagonal factors must be square, got {tuple(diag_a[i].shape)} and"
                f" {tuple(diag_g[i].shape)}"
            )
    for i in range(n - 1):
        want_a, want_g = (ins[i], ins[i + 1]), (outs[i], outs[i + 1])
        if cross_a[i].shape != want_a or cross_g[i].shape != want_g:
            raise ValueError(
                f"cross factors of layers {i}, {i + 1}: expected {want_a} and {want_g}, got"
                f" {tuple(cross_a[i].shape)} and {tuple(cross_g[i].shape)}"
            )


def _choleskys(mats: Sequence[Tensor], whats: Sequence[str]) -> list[Tensor]:
    """Lower Cholesky factors of damped (hence positive definite) factors, symmetrised first,
    with one host read of all their error codes (not one per factor) and a ValueError naming
    the first that is not positive definite."""
    out, infos = [], []
    for mat in mats:
        chol, info = torch.linalg.cholesky_ex(0.5 * (mat + mat.mT))
        out.append(chol)
        infos.append(info)
    failed = torch.stack(infos).ne(0)
    if bool(failed.any()):
        raise ValueError(
            f"tridiag_inverse: {whats[int(failed.nonzero()[0, 0])]} is not positive definite"
            " even in float64; the diagonal factors must be damped"
        )
    return out


def _pair(chol_1: Tensor, cross: Tensor, chol_next: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ψ, K and s for one factor kind (Ā or G) of the pair of layers i, i+1.

    Args:
        chol_1: Cholesky factor L of the layer's own damped factor (A₁ = L Lᵀ).
        cross: the cross factor C between the layer and the next.
        chol_next: Cholesky factor M of the next layer's damped factor.

    Returns:
        Ψ = C (M Mᵀ)⁻¹; K = L⁻ᵀ E; s ∈ [0, 1], the eigenvalues of Y Yᵀ = E diag(s) Eᵀ with
        Y = L⁻¹ C M⁻ᵀ, so that L⁻¹ (Ψ M Mᵀ Ψᵀ) L⁻ᵀ = Y Yᵀ (Appendix B).
    """
    psi = torch.cholesky_solve(cross.mT, chol_next).mT
    y = torch.linalg.solve_triangular(chol_1, cross, upper=False)
    y = torch.linalg.solve_triangular(chol_next, y.mT, upper=False).mT
    yyt = y @ y.mT
    s, e = torch.linalg.eigh(0.5 * (yyt + yyt.mT))  # eigh reads one triangle: make them agree
    k = torch.linalg.solve_triangular(chol_1.mT, e, upper=True)
    return psi, k, s.clamp(0.0, 1.0)


def tridiag_inverse(
    diag_a: Sequence[Tensor],
    diag_g: Sequence[Tensor],
    cross_a: Sequence[Tensor],
    cross_g: Sequence[Tensor],
) -> TridiagInverse:
    """Precompute F̂⁻¹ = Ξᵀ Λ Ξ of a chain of ℓ layers (§4.3) for :func:`tridiag_apply`.

    The work runs in float64 (see the module docstring) and the results are cast back to the
    factors' dtype. It synchronises with the host (the decompositions' error checks: one read
    for the Choleskys, one per ``eigh``, which torch has no error-code variant of), as every
    inverse refresh does; the apply path does not. K-FAC's γ search calls it for each candidate,
    so a tridiagonal K-FAC's search steps synchronise too (block-diagonal K-FAC reuses the
    refresh's eigendecompositions and does not).

    Args:
        diag_a: damped Ā_{i-1,i-1} of layers i = 0..ℓ−1, ``(in_i, in_i)``, bias coordinate last.
        diag_g: damped G_{i,i}, ``(out_i, out_i)``.
        cross_a: Ā_{i-1,i} = E[ā_{i-1} ā_iᵀ] between layers i and i+1 (i = 0..ℓ−2),
            ``(in_i, in_{i+1})``, undamped.
        cross_g: G_{i,i+1} = E[g_i g_{i+1}ᵀ], ``(out_i, out_{i+1})``, undamped.

    Returns:
        The pieces of F̂⁻¹.

    Raises:
        ValueError: the factors do not describe one chain, or a diagonal factor is not positive
            definite (undamped and singular).
    """
    _check_shapes(diag_a, diag_g, cross_a, cross_g)
    dtype = diag_a[0].dtype
    n = len(diag_a)
    whats = [f"Ā of layer {i}" for i in range(n)] + [f"G of layer {i}" for i in range(n)]
    chols = _choleskys([m.double() for m in (*diag_a, *diag_g)], whats)
    chol_a, chol_g = chols[:n], chols[n:]
    psi_a, psi_g, k_a, k_g, scale = [], [], [], [], []
    # 1 − s_G s_A > 0 for consistent statistics; the floor only keeps broken ones finite.
    floor = torch.finfo(torch.float64).eps
    for i in range(n - 1):
        pa, ka, sa = _pair(chol_a[i], cross_a[i].double(), chol_a[i + 1])
        pg, kg, sg = _pair(chol_g[i], cross_g[i].double(), chol_g[i + 1])
        psi_a.append(pa.to(dtype))
        psi_g.append(pg.to(dtype))
        k_a.append(ka.to(dtype))
        k_g.append(kg.to(dtype))
        scale.append((1.0 - torch.outer(sg, sa)).clamp_min(floor).reciprocal().to(dtype))
    a_inv = torch.cholesky_inverse(chol_a[-1]).to(dtype)
    g_inv = torch.cholesky_inverse(chol_g[-1]).to(dtype)
    return TridiagInverse(psi_a, psi_g, k_a, k_g, scale, a_inv, g_inv)


def tridiag_apply(inv: TridiagInverse, grads: Sequence[Tensor]) -> list[Tensor]:
    """F̂⁻¹ applied to the gradient of a chain of layers: w = Ξᵀ Λ Ξ v (§4.3).

    In matrix form (column-stacking vec, so (Ψ^Ā ⊗ Ψ^G) vec(V) = vec(Ψ^G V Ψ^Āᵀ)):

    - u = Ξ v: U_i = V_i − Ψ^G_{i,i+1} V_{i+1} Ψ^Āᵀ_{i-1,i}, U_ℓ = V_ℓ;
    - z = Λ u: Z_i = K_G (scale ∘ (K_Gᵀ U_i K_A)) K_Aᵀ = Σ_{i|i+1}⁻¹ U_i (Appendix B),
      Z_ℓ = G⁻¹ U_ℓ Ā⁻¹ = Σ_ℓ⁻¹ U_ℓ;
    - w = Ξᵀ z: W_1 = Z_1, W_{i+1} = Z_{i+1} − Ψ^Gᵀ_{i,i+1} Z_i Ψ^Ā_{i-1,i}.

    Only matrix products and elementwise ops: no host synchronisation.

    Args:
        inv: pieces from :func:`tridiag_inverse`.
        grads: ``(out_i, in_i)`` gradient matrix of each layer (weight, bias as last column).

    Returns:
        F̂⁻¹ applied, one matrix per layer, same shapes.
    """
    n = len(inv.k_a) + 1
    if len(grads) != n:
        raise ValueError(f"tridiag_apply: {len(grads)} gradient matrices for a chain of {n}")
    dot = torch.linalg.multi_dot  # picks the cheaper association of each triple product
    z = []  # z = Λ Ξ v, layer by layer
    for i, (ka, kg, d) in enumerate(zip(inv.k_a, inv.k_g, inv.scale, strict=True)):
        u = grads[i] - dot([inv.psi_g[i], grads[i + 1], inv.psi_a[i].mT])
        z.append(dot([kg, d * dot([kg.mT, u, ka]), ka.mT]))
    z.append(dot([inv.g_inv, grads[-1], inv.a_inv]))
    w = [z[0]]
    for zi, z_next, pa, pg in zip(z[:-1], z[1:], inv.psi_a, inv.psi_g, strict=True):
        w.append(z_next - dot([pg.mT, zi, pa]))
    return w
