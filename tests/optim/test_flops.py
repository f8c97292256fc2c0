"""The FLOP model against hand counts on small networks."""

from __future__ import annotations

import pytest
from torch import nn

from kfacbench.optim.flops import (
    LayerShape,
    gram_flops,
    inverse_flops,
    kfac_flops,
    layer_shapes,
    refreshes,
    sgd_flops,
)


def test_layer_shapes_count_rows_per_example() -> None:
    mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3, bias=False))
    assert layer_shapes(mlp, (4,)) == [LayerShape(5, 5, 1), LayerShape(5, 3, 1)]
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
    assert layer_shapes(conv, (1, 4, 4)) == [LayerShape(10, 2, 16, "conv2d"), LayerShape(33, 2, 1)]


def test_sgd_and_kfac_steps_by_hand() -> None:
    """4-5-3 MLP with biases, batch 10, on a CPU (every factor narrower than the symmetric
    product's 256 columns: full GEMMs; equal sizes share a Cholesky bucket)."""
    shapes = [LayerShape(5, 5, 1), LayerShape(6, 3, 1)]
    params = 4 * 5 + 5 + 5 * 3 + 3
    sgd = sgd_flops(shapes, 10, params)
    assert sgd.forward == 2 * 10 * (25 + 18)
    assert sgd.backward == 2 * 860 - 2 * 10 * 25  # no input gradient of the first layer
    assert sgd.update == 4 * 43
    kfac = kfac_flops(shapes, 10, params, inverse_methods=["cholesky"] * 3, device="cpu")
    sampled = 2 * 10 * 18
    products = 2 * 10 * (25 + 25) + 2 * 10 * (36 + 9)
    assert kfac.curvature == sampled + products
    assert kfac.precondition == 2 * 5 * 5 * 10 + 2 * 6 * 3 * 9
    assert kfac.inverse == pytest.approx(6**3 + 2 * 5**3 + 3**3)  # potrf + potri: n³
    assert kfac.forward == sgd.forward and kfac.backward == sgd.backward
    assert kfac.amortized(2, 4) == pytest.approx(
        kfac.forward
        + kfac.backward
        + kfac.curvature
        + kfac.precondition
        + kfac.update
        + kfac.inverse / 2
    )
    reduce = kfac_flops(
        [LayerShape(5, 5, 3)],
        10,
        30,
        inverse_methods=["inv"],
        device="cpu",
        weight_sharing="reduce",
    )
    assert reduce.curvature == 2 * 10 * (25 + 25)  # one row per example, no sampled pass
    with pytest.raises(ValueError, match="2 buckets but 1 inverse methods"):
        kfac_flops(
            shapes[:1] * 1 + [LayerShape(7, 5, 1)], 10, 1, inverse_methods=["inv"], device="cpu"
        )


def test_device_dependent_counts() -> None:
    assert gram_flops(10, 256, "cpu") == pytest.approx(2 * 10 * 256**2 * 5 / 8)
    assert gram_flops(10, 256, "cuda") == 2 * 10 * 256**2
    assert gram_flops(10, 255, "cpu") == 2 * 10 * 255**2
    assert inverse_flops(10, "cholesky", "cuda") == pytest.approx(1000 / 3 + 2000)
    assert inverse_flops(10, "eigh", "cpu") == 11_000


def test_refreshes_count_the_first_three_steps() -> None:
    assert refreshes(100, 20) == 7  # 0, 1, 2, 20, 40, 60, 80
    assert refreshes(2, 20) == 2
    assert refreshes(10, 1) == 10
