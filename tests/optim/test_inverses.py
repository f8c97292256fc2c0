"""Damped inverses against explicit float64 inverses: size buckets, identity padding, every
method, Newton-Schulz's warm start and fallback, float64 retries."""

from __future__ import annotations

import pytest
import torch

from kfacbench.optim.inverses import (
    BUCKET_RATIO,
    METHODS,
    NEWTON_TOL,
    DampedInverter,
    damped_inverses,
    invert,
    plan_buckets,
)


def spd(n: int, seed: int, rows: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows or 2 * n, n, generator=gen)
    return x.T @ x / x.shape[0]


def explicit(mat: torch.Tensor, damping: float) -> torch.Tensor:
    eye = torch.eye(mat.shape[0], dtype=torch.float64)
    return torch.linalg.inv(mat.double() + damping * eye)


def test_buckets_keep_sizes_within_the_ratio_largest_first() -> None:
    # 100 takes 80 and 71 (71·√2 = 100.4 ≥ 100) but not 70 (98.99); 3 and 3 pad to nothing.
    assert plan_buckets([70, 100, 3, 80, 71, 3]) == [(100, [1, 3, 4]), (70, [0]), (3, [2, 5])]
    assert plan_buckets([5, 3, 3]) == [(5, [0]), (3, [1, 2])]  # 3·√2 = 4.24 < 5
    assert plan_buckets([]) == []
    assert plan_buckets([5, 4, 5], ratio=1.0) == [(5, [0, 2]), (4, [1])]


@pytest.mark.parametrize("method", METHODS)
def test_inverter_pads_buckets_and_matches_explicit_inverses(method: str) -> None:
    """Sizes 9, 8, 7 share one padded call, 4 and 3 another; every inverse is the member's own
    (Newton-Schulz from its second refresh, warm-started from the first: the factors moved by
    10%, as moving averages do between refreshes)."""
    sizes = [9, 4, 8, 3, 7]
    inverter = DampedInverter(sizes, [method] * 2, [f"f{i}" for i in range(5)], BUCKET_RATIO)
    assert [(b.size, b.members) for b in inverter.buckets] == [(9, [0, 2, 4]), (4, [1, 3])]
    dampings = [torch.tensor(d) for d in (0.5, 0.1, 1.0, 0.3, 0.2)]
    for refresh in range(2):
        mats = [(1 + 0.1 * refresh) * spd(n, seed=i) for i, n in enumerate(sizes)]
        got = inverter.refresh(mats, dampings)
        for m, d, inv in zip(mats, dampings, got, strict=True):
            assert inv.shape == m.shape and inv.dtype == torch.float32
            torch.testing.assert_close(inv.double(), explicit(m, float(d)), rtol=1e-4, atol=1e-5)
    assert inverter.fallbacks == 0
    info = inverter.info()
    assert info["inverse_methods"] == {f"f{i}": method for i in range(5)}
    assert info["inverse_buckets"][0] == {"size": 9, "factors": 3, "method": method}


def test_newton_schulz_converges_quadratically_from_a_close_start() -> None:
    """From X₀ with ‖I − MX₀‖ ≈ 0.1 the residual after k steps is about 0.1^(2^k)."""
    m = spd(6, 0, rows=40).double()
    m = 0.5 * (m + m.T) + 0.1 * torch.eye(6, dtype=torch.float64)  # symmetric to the last bit
    exact = torch.linalg.inv(m)
    warm = exact @ (torch.eye(6, dtype=torch.float64) - 0.1 * torch.eye(6, dtype=torch.float64))
    got, ok = invert(m.unsqueeze(0), "newton", warm.unsqueeze(0))
    assert bool(ok.all())
    torch.testing.assert_close(got[0], exact, rtol=1e-12, atol=1e-12)


def test_newton_schulz_miss_falls_back_to_cholesky() -> None:
    """A warm start that cannot converge (X₀ = 0 stays 0) fails the residual check; the factor is
    inverted by Cholesky and counted, with no warning."""
    sizes = [5, 5]
    inverter = DampedInverter(sizes, ["newton"], ["a", "b"], 1.0)
    mats, dampings = [spd(5, 0), spd(5, 1)], [torch.tensor(0.2), torch.tensor(0.2)]
    inverter.refresh(mats, dampings)  # Cholesky: no warm start yet
    bucket = inverter.buckets[0]
    assert bucket.previous is not None
    bucket.previous = bucket.previous.clone()
    bucket.previous[1] = 0.0  # b's start is hopeless, a's is exact
    got = inverter.refresh(mats, dampings)
    assert inverter.fallbacks == 1
    for m, inv in zip(mats, got, strict=True):
        torch.testing.assert_close(inv.double(), explicit(m, 0.2), rtol=1e-4, atol=1e-5)
    residual = torch.eye(5) - (mats[1] + 0.2 * torch.eye(5)) @ got[1]
    assert float(torch.linalg.matrix_norm(residual)) <= NEWTON_TOL[torch.float32]


@pytest.mark.parametrize("method", ["cholesky", "inv", "eigh"])
def test_damped_inverses_retry_failures_in_float64(method: str) -> None:
    """A system that fails in float32 (rank one plus a damping below float32's rounding) is
    solved again in float64 with a warning; one that is not positive definite at all fails
    naming it."""
    v = torch.full((1, 3), 100.0)
    rank_one = v.T @ v  # 1e4 everywhere: a damping of 1e-6 vanishes in float32, not in float64
    with pytest.warns(UserWarning, match=f"{method} of damped tiny failed in float32"):
        (inv,) = damped_inverses([rank_one], [torch.tensor(1e-6)], method, ["tiny"])
    assert inv.dtype == torch.float32 and torch.isfinite(inv).all()
    torch.testing.assert_close(inv.double(), explicit(rank_one, 1e-6), rtol=1e-3, atol=1e-3)
    with (
        pytest.raises(torch.linalg.LinAlgError, match="damped bad failed in float64 too"),
        pytest.warns(UserWarning),
    ):
        damped_inverses([-torch.eye(3)], [torch.tensor(1.0)], method, ["bad"])  # exactly 0
