"""Damped inverses of low-rank Kronecker factors by Sherman–Morrison–Woodbury (SKFAC's core).

SKFAC (Tang et al., CVPR 2021, §3) builds each factor from one minibatch, F = RᵀR with R the
``(r, d)`` matrix of scaled per-example rows (r = m examples for a Linear layer or a reduced conv
layer). When r < d the damped factor is a rank-r update of a multiple of the identity, and the
Woodbury identity gives its inverse from an r×r system:

    (RᵀR + δI_d)⁻¹ = (1/δ) [I_d − Rᵀ (δI_r + RRᵀ)⁻¹ R].

With the paper's U = √m Rᵀ this is ALGORITHMS.md's (UUᵀ/m + λI)⁻¹ = (1/λ)[I − U(mλI + UᵀU)⁻¹Uᵀ].
Only K = δI_r + RRᵀ is factorised (Cholesky; SPD for δ > 0), and the d×d inverse is never formed:
:meth:`DampedInverse.right` applies it to a gradient matrix V as (V − (VRᵀ) W)/δ with
W = K⁻¹R stored at the refresh, two thin matmuls of cost O(out·d·r). When r ≥ d the identity
saves nothing, and the ordinary damped inverse (RᵀR + δI)⁻¹ is formed instead (the automatic
fall-back).

All factors of a refresh are factorised together: the r×r systems of every low-rank factor share
r (the batch size), so they go to one batched Cholesky; dense fall-backs are batched per size.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DampedInverse:
    """(RᵀR + δI)⁻¹ of one factor, in whichever form is cheaper to apply.

    Attributes:
        damping: δ (a 0-dim tensor, kept on the device).
        rows: R, ``(r, d)``, for the Woodbury form; ``None`` for the dense form.
        solved: W = (δI_r + RRᵀ)⁻¹ R, ``(r, d)``, for the Woodbury form.
        dense: the ``(d, d)`` damped inverse, for the dense form (r ≥ d).
    """

    damping: Tensor
    rows: Tensor | None = None
    solved: Tensor | None = None
    dense: Tensor | None = None

    @property
    def low_rank(self) -> bool:
        """Whether the Woodbury form is used (rank below the dimension)."""
        return self.rows is not None

    @property
    def dim(self) -> int:
        """d, the factor's dimension."""
        mat = self.rows if self.rows is not None else self.dense
        assert mat is not None
        return mat.shape[-1]

    def scale(self) -> Tensor | float:
        """The scalar the unscaled applications must be multiplied by: 1/δ (Woodbury) or 1."""
        return 1.0 / self.damping if self.low_rank else 1.0

    def right_unscaled(self, v: Tensor) -> Tensor:
        """v F⁻¹ up to :meth:`scale`, for ``v`` of shape ``(k, d)``."""
        if self.rows is None:
            assert self.dense is not None
            return v @ self.dense
        assert self.solved is not None
        return torch.addmm(v, v @ self.rows.T, self.solved, alpha=-1)

    def left_unscaled(self, v: Tensor) -> Tensor:
        """F⁻¹ v up to :meth:`scale`, for ``v`` of shape ``(d, k)`` (F is symmetric)."""
        if self.rows is None:
            assert self.dense is not None
            return self.dense @ v
        assert self.solved is not None
        return torch.addmm(v, self.solved.T, self.rows @ v, alpha=-1)

    def right(self, v: Tensor) -> Tensor:
        """v (RᵀR + δI)⁻¹."""
        return self.right_unscaled(v) * self.scale()

    def left(self, v: Tensor) -> Tensor:
        """(RᵀR + δI)⁻¹ v."""
        return self.left_unscaled(v) * self.scale()

    def matrix(self) -> Tensor:
        """The dense ``(d, d)`` inverse (diagnostics and tests; the optimizer never calls it)."""
        mat = self.rows if self.rows is not None else self.dense
        assert mat is not None
        return self.left(torch.eye(self.dim, dtype=mat.dtype, device=mat.device))


def kronecker_apply(g_inv: DampedInverse, a_inv: DampedInverse, v: Tensor) -> Tensor:
    """(A_δ ⊗ G_δ)⁻¹ applied to the ``(out, in)`` gradient matrix: G_δ⁻¹ V A_δ⁻¹, with the two
    1/δ scalings folded into one multiply."""
    out = g_inv.left_unscaled(a_inv.right_unscaled(v))
    return out * (g_inv.scale() * a_inv.scale())


def _batched_cholesky_inverse(mats: Tensor, what: str) -> Tensor:
    """Inverses of a batch of SPD matrices by Cholesky, retried in float64 (with a warning) when
    float32 loses definiteness. One host sync (the success check) per batch."""
    chol, info = torch.linalg.cholesky_ex(mats)
    if bool((info != 0).any()):
        warnings.warn(
            f"SKFAC: Cholesky of {what} failed in float32; retrying in float64", stacklevel=3
        )
        chol = torch.linalg.cholesky(mats.double())
        return torch.cholesky_inverse(chol).to(mats.dtype)
    return torch.cholesky_inverse(chol)


def damped_inverses(rows: Sequence[Tensor], dampings: Sequence[Tensor]) -> list[DampedInverse]:
    """(RᵢᵀRᵢ + δᵢI)⁻¹ for every factor, Woodbury where rank < dimension, dense otherwise.

    Args:
        rows: per factor, R of shape ``(r, d)``, so that the factor is RᵀR.
        dampings: per factor, δ > 0 as a 0-dim tensor.

    Returns:
        One :class:`DampedInverse` per factor, in order. The Woodbury systems are factorised in
        one batched call per rank r and the dense fall-backs in one per dimension d.
    """
    out: list[DampedInverse | None] = [None] * len(rows)
    low: dict[int, list[int]] = {}
    dense: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        rank, dim = r.shape
        if rank < dim:
            low.setdefault(rank, []).append(i)
        else:
            dense.setdefault(dim, []).append(i)
    for rank, members in low.items():
        grams = [rows[i] @ rows[i].T for i in members]
        inv = _batched_cholesky_inverse(
            _damped(grams, [dampings[i] for i in members]),
            f"{len(members)} Woodbury systems of size {rank}",
        )
        for k, i in enumerate(members):
            out[i] = DampedInverse(dampings[i], rows=rows[i], solved=inv[k] @ rows[i])
    for dim, members in dense.items():
        grams = [rows[i].T @ rows[i] for i in members]
        inv = _batched_cholesky_inverse(
            _damped(grams, [dampings[i] for i in members]),
            f"{len(members)} factors of size {dim}",
        )
        for k, i in enumerate(members):
            out[i] = DampedInverse(dampings[i], dense=inv[k])
    return [d for d in out if d is not None]


def _damped(grams: Sequence[Tensor], dampings: Sequence[Tensor]) -> Tensor:
    """The stack of ``gram + δ I`` (all grams of one size)."""
    stack = torch.stack(list(grams))
    delta = torch.stack(list(dampings)).to(stack.dtype)
    eye = torch.eye(stack.shape[-1], dtype=stack.dtype, device=stack.device)
    return stack + delta[:, None, None] * eye
