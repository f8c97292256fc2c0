"""Woodbury damped inverses against explicit dense inverses."""

from __future__ import annotations

import warnings

import pytest
import torch

from kfacbench.optim import lowrank
from kfacbench.optim.lowrank import damped_inverses, dense_pays, kronecker_apply


def dense_inverse(rows: torch.Tensor, delta: float) -> torch.Tensor:
    d = rows.shape[1]
    return torch.linalg.inv(rows.T @ rows + delta * torch.eye(d, dtype=rows.dtype))


@pytest.mark.parametrize(("r", "d"), [(3, 10), (9, 10), (10, 10), (16, 5)])
def test_inverse_applications_equal_the_explicit_damped_inverse(r: int, d: int) -> None:
    """(UUᵀ/m + λI)⁻¹ with U = √m Rᵀ, applied from both sides to random gradients: Woodbury
    for r < d, the ordinary inverse (fall-back) for r ≥ d."""
    gen = torch.Generator().manual_seed(r * 100 + d)
    m = r
    u = torch.randn(d, m, generator=gen, dtype=torch.float64)
    rows = u.T / m**0.5
    lam = 0.3
    (inv,) = damped_inverses([rows], [torch.tensor(lam, dtype=torch.float64)])
    assert inv.low_rank == (r < d)
    want = torch.linalg.inv(u @ u.T / m + lam * torch.eye(d, dtype=torch.float64))
    v = torch.randn(7, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(inv.right(v), v @ want)
    torch.testing.assert_close(inv.left(v.T), want @ v.T)
    torch.testing.assert_close(inv.matrix(), want)
    if inv.low_rank:
        assert inv.dense is None  # the d×d inverse is never formed on the Woodbury path
        assert inv.solved is not None and inv.solved.shape == (r, d)


def test_mixed_sizes_are_batched_and_each_matches() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 12), (4, 9), (6, 12), (12, 5), (8, 5), (4, 12)]
    rows = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    deltas = [0.1 * (i + 1) for i in range(len(rows))]
    invs = damped_inverses(rows, [torch.tensor(x, dtype=torch.float64) for x in deltas])
    assert [inv.low_rank for inv in invs] == [True, True, True, False, False, True]
    for inv, r, delta in zip(invs, rows, deltas, strict=True):
        torch.testing.assert_close(inv.matrix(), dense_inverse(r, delta))


def test_woodbury_inverses_stored_dense_equal_the_explicit_inverse() -> None:
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 12), (4, 9), (6, 5)]]
    deltas = [torch.tensor(x, dtype=torch.float64) for x in (0.1, 0.2, 0.3)]
    invs = damped_inverses(rows, deltas, store_dense=[True, False, True])
    assert [inv.form for inv in invs] == ["woodbury-dense", "woodbury", "dense"]
    assert invs[0].dense is not None and invs[0].rows is None  # no thin pieces kept
    for inv, r, delta in zip(invs, rows, deltas, strict=True):
        torch.testing.assert_close(inv.matrix(), dense_inverse(r, float(delta)))


@pytest.mark.parametrize(
    ("dim", "rank", "other", "applications"),
    [(1001, 1000, 500, 10), (1001, 256, 500, 5), (13, 8, 20, 1), (13, 8, 20, 20), (40, 8, 3, 50)],
)
def test_dense_pays_when_its_flops_over_the_interval_are_fewer(
    dim: int, rank: int, other: int, applications: int
) -> None:
    """The rule against the flop counts written out: thin 2 matmuls per step (4kdr) vs one
    dense (2kd²) plus the d×d×r materialisation once."""
    thin = applications * 4 * other * dim * rank
    dense = 2 * dim * dim * rank + applications * 2 * other * dim * dim
    assert dense_pays(dim, rank, other, applications) == (dense < thin)
    assert not dense_pays(dim, dim, other, applications)  # r = d is never Woodbury


def test_kronecker_apply_equals_the_dense_kronecker_solve() -> None:
    """G_δ⁻¹ V A_δ⁻¹ == (G_δ ⊗ A_δ)⁻¹ vec(V) for row-major vec (factors.py's ordering)."""
    gen = torch.Generator().manual_seed(1)
    ra = torch.randn(3, 6, generator=gen, dtype=torch.float64)  # Woodbury side
    rg = torch.randn(8, 4, generator=gen, dtype=torch.float64)  # dense side
    da, dg = 0.2, 0.7
    a_inv, g_inv = damped_inverses(
        [ra, rg], [torch.tensor(da, dtype=torch.float64), torch.tensor(dg, dtype=torch.float64)]
    )
    v = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    big = torch.kron(
        rg.T @ rg + dg * torch.eye(4, dtype=torch.float64),
        ra.T @ ra + da * torch.eye(6, dtype=torch.float64),
    )
    want = torch.linalg.solve(big, v.flatten()).reshape(4, 6)
    torch.testing.assert_close(kronecker_apply(g_inv, a_inv, v), want)


def test_nearly_dependent_rows_are_rebuilt_in_float64() -> None:
    """Rows so large that float32 rounding of RRᵀ exceeds δ (reduce-sum conv patches reach 1e5):
    the Gram matrix is rebuilt in float64, and the result still matches the exact inverse."""
    gen = torch.Generator().manual_seed(3)
    basis = torch.randn(4, 40, generator=gen, dtype=torch.float64)
    rows64 = 300.0 * torch.randn(32, 4, generator=gen, dtype=torch.float64) @ basis  # rank 4
    rows64 += 1e-3 * torch.randn(32, 40, generator=gen, dtype=torch.float64)
    rows = rows64.float()
    with pytest.warns(UserWarning, match="rebuilding them in float64"):
        (inv,) = damped_inverses([rows], [torch.tensor(0.1)])
    assert inv.float64
    v = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    want = v @ dense_inverse(rows.double(), 0.1)
    got = inv.right(v.float()).double()
    assert torch.linalg.norm(got - want) < 1e-3 * torch.linalg.norm(want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for float64 up front: no failing attempt
        (again,) = damped_inverses([rows], [torch.tensor(0.1)], float64=True)
    assert again.float64 and again.solved is not None and again.solved.dtype == torch.float32
    torch.testing.assert_close(again.right(v.float()), inv.right(v.float()))


def test_failed_float32_cholesky_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.cholesky_ex

    def failing(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chol, info = real(mats)
        return chol, torch.ones_like(info)

    monkeypatch.setattr(lowrank.torch.linalg, "cholesky_ex", failing)
    rows = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="rebuilding them in float64"):
        (inv,) = damped_inverses([rows], [torch.tensor(0.5)])
    assert inv.solved is not None and inv.solved.dtype == torch.float32
    torch.testing.assert_close(inv.matrix(), dense_inverse(rows.double(), 0.5).float())
