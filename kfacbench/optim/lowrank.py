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

Between the two lies a third form: the inverse *formed* by Woodbury (cheap, r < d) and then
*stored* dense, (I_d − RᵀW)/δ, one more d×d×r matmul at the refresh. Applying the thin form
costs 4·k·d·r flops per step against 2·k·d² dense (k the other side's dimension), so when r is
near d and the refresh is amortised over many steps the dense apply wins: :func:`dense_pays`
is that cost rule (ASDL's swift K-FAC always stores its Woodbury inverses dense).

All factors of a refresh are factorised together: the r×r systems of every low-rank factor share
r (the batch size), so they go to one batched Cholesky; dense fall-backs are batched per size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor


@dataclass
class DampedInverse:
    """(RᵀR + δI)⁻¹ of one factor, in whichever form is cheaper to apply.

    Attributes:
        damping: δ (a 0-dim tensor, kept on the device).
        rows: R, ``(r, d)``, for the Woodbury form; ``None`` for the dense form.
        solved: W = (δI_r + RRᵀ)⁻¹ R, ``(r, d)``, for the Woodbury form.
        dense: the ``(d, d)`` damped inverse, for the dense forms.
        float64: whether its system had to be formed and factorised in float64.
        woodbury_formed: the dense inverse was formed by Woodbury (r < d; :func:`dense_pays`).
    """

    damping: Tensor
    rows: Tensor | None = None
    solved: Tensor | None = None
    dense: Tensor | None = None
    float64: bool = False
    woodbury_formed: bool = False

    @property
    def form(self) -> str:
        """``woodbury`` (thin, applied through R and W), ``woodbury-dense`` (formed by Woodbury,
        stored dense) or ``dense`` (formed from RᵀR)."""
        if self.low_rank:
            return "woodbury"
        return "woodbury-dense" if self.woodbury_formed else "dense"

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


def dense_pays(dim: int, rank: int, other: int, applications: int) -> bool:
    """Whether a Woodbury inverse (rank < dim) is cheaper stored dense, over one refresh period.

    Per application to a ``(other, dim)`` matrix the thin form costs two thin matmuls, 4·k·d·r
    flops, the dense one 2·k·d²; storing it dense costs 2·d²·r once. Dense wins when
    2d²r + T·2kd² < T·4kdr, i.e. d·(r + T·k) < 2·T·k·r.

    Args:
        dim: d, the factor's dimension.
        rank: r, the rank of its rows (only r < d reaches Woodbury).
        other: k, the dimension of the other side of the gradient matrix.
        applications: T, the steps the inverse is used for (the refresh interval).
    """
    return rank < dim and dim * (rank + applications * other) < 2 * applications * other * rank


def _cholesky_inverses(
    grams: Callable[[torch.dtype], Tensor], dtype: torch.dtype, what: str
) -> tuple[Tensor, bool]:
    """Inverses of a batch of SPD matrices ``grams(dtype)`` by Cholesky.

    When float32 loses definiteness (a Gram matrix of nearly dependent rows whose rounding errors
    exceed δ: e.g. reduce-sum patches of a conv on 28×28 maps, whose entries reach 1e5), the
    matrices are *rebuilt* from the rows in float64, not just cast, and inverted there (with a
    warning). One host sync (the success check) per batch. Returns the inverses and whether they
    were computed in float64.
    """
    if dtype == torch.float64:
        return torch.cholesky_inverse(torch.linalg.cholesky(grams(dtype))), True
    mats = grams(dtype)
    chol, info = torch.linalg.cholesky_ex(mats)
    if bool((info != 0).any()):
        warnings.warn(
            f"SKFAC: Cholesky of {what} failed in {dtype}; rebuilding them in float64",
            stacklevel=3,
        )
        return torch.cholesky_inverse(torch.linalg.cholesky(grams(torch.float64))), True
    return torch.cholesky_inverse(chol), False


def damped_inverses(
    rows: Sequence[Tensor],
    dampings: Sequence[Tensor],
    *,
    float64: bool = False,
    store_dense: Sequence[bool] | None = None,
) -> list[DampedInverse]:
    """(RᵢᵀRᵢ + δᵢI)⁻¹ for every factor, Woodbury where rank < dimension, dense otherwise.

    Args:
        rows: per factor, R of shape ``(r, d)``, so that the factor is RᵀR.
        dampings: per factor, δ > 0 as a 0-dim tensor.
        float64: form and factorise every system in float64 from the start (for callers that
            saw a float32 failure before: it saves the failing attempt).
        store_dense: per factor, whether a Woodbury inverse is to be stored dense (the
            ``woodbury-dense`` form; see :func:`dense_pays`). Default: none is.

    Returns:
        One :class:`DampedInverse` per factor, in order, in the rows' dtype. The Woodbury systems
        are factorised in one batched call per rank r and the dense fall-backs in one per
        dimension d.
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
    for (size, members), woodbury in [
        *((g, True) for g in low.items()),
        *((g, False) for g in dense.items()),
    ]:
        what = (
            f"{len(members)} Woodbury systems of size {size}"
            if woodbury
            else f"{len(members)} factors of size {size}"
        )
        inv, wide = _cholesky_inverses(
            partial(_damped, [rows[i] for i in members], [dampings[i] for i in members], woodbury),
            torch.float64 if float64 else rows[members[0]].dtype,
            what,
        )
        for k, i in enumerate(members):
            dtype = rows[i].dtype
            if woodbury:
                solved = (inv[k] @ rows[i].to(inv.dtype)).to(dtype)
                if store_dense is not None and store_dense[i]:
                    out[i] = _stored_dense(rows[i], solved, dampings[i], wide)
                else:
                    out[i] = DampedInverse(dampings[i], rows=rows[i], solved=solved, float64=wide)
            else:
                out[i] = DampedInverse(dampings[i], dense=inv[k].to(dtype), float64=wide)
    return [d for d in out if d is not None]


def _damped(
    rows: Sequence[Tensor], dampings: Sequence[Tensor], outer: bool, dtype: torch.dtype
) -> Tensor:
    """The stack of RRᵀ + δI (``outer``, the Woodbury system) or RᵀR + δI, formed in ``dtype``."""
    cast = [r.to(dtype) for r in rows]
    stack = torch.stack([r @ r.T if outer else r.T @ r for r in cast])
    delta = torch.stack(list(dampings)).to(dtype)
    stack.diagonal(dim1=-2, dim2=-1).add_(delta[:, None])  # in place: no n×d×d identity
    return stack


def _stored_dense(rows: Tensor, solved: Tensor, damping: Tensor, wide: bool) -> DampedInverse:
    """The Woodbury inverse (I − RᵀW)/δ as a dense matrix: one d×d×r matmul."""
    eye = torch.eye(rows.shape[1], dtype=rows.dtype, device=rows.device)
    dense = torch.addmm(eye, rows.T, solved, alpha=-1).div_(damping)
    return DampedInverse(damping, dense=dense, float64=wide, woodbury_formed=True)
