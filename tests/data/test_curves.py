"""The regenerated CURVES set: rendering maths, determinism, sanity of the images, caching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kfacbench.data import curves
from kfacbench.data.curves import load_curves, render_curves


def test_shape_dtype_range() -> None:
    x = render_curves(200, seed=0)
    assert x.shape == (200, 784) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1


def test_deterministic_and_seed_dependent() -> None:
    torch.testing.assert_close(render_curves(50, 3), render_curves(50, 3), rtol=0, atol=0)
    assert not torch.allclose(render_curves(50, 3), render_curves(50, 4))


def test_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = render_curves(70, 1)
    monkeypatch.setattr(curves, "CHUNK", 16)
    torch.testing.assert_close(render_curves(70, 1), whole)


def test_images_are_strokes_not_blank_or_saturated() -> None:
    x = render_curves(1000, seed=0)
    ink = (x > 0.1).float().mean(1)
    # Each image holds a visible stroke: bright somewhere, but only on a small part of the frame.
    assert x.amax(1).min() > 0.5
    assert ink.min() > 0.003 and ink.max() < 0.35
    assert 0.03 < ink.mean() < 0.2
    # The curve stays inside the margin (3 px): the border rows and columns are dark.
    img = x.reshape(-1, 28, 28)
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1)
    assert border.max() < 1e-3


def test_straight_stroke_profile() -> None:
    # A horizontal stroke along y = 10 from x = 5 to x = 20: the pen's line integral, normalised,
    # is exp(-r^2 / 2 sigma^2) across the stroke, with peak 1 on it.
    sigma = 0.7
    xs = torch.linspace(5, 20, 400)
    curve = torch.stack([xs, torch.full_like(xs, 10.0)], -1)[None]
    img = curves._draw(curve, 28, sigma)[0]
    torch.testing.assert_close(img[10, 8:18], torch.ones(10), atol=1e-3, rtol=0)
    expected = math.exp(-1 / (2 * sigma**2))
    torch.testing.assert_close(img[11, 8:18], torch.full((10,), expected), atol=1e-3, rtol=0)
    assert img[10, :2].max() < 1e-6 and img[:5].max() < 1e-6


def test_spline_interpolates_control_points() -> None:
    points = torch.tensor([[[5.0, 5.0], [20.0, 12.0], [8.0, 22.0], [15.0, 16.0]]])
    sampled = curves._spline(points, 2000)[0]
    torch.testing.assert_close(sampled[0], points[0, 0])
    torch.testing.assert_close(sampled[-1], points[0, -1])
    for p in points[0, 1:-1]:
        assert (sampled - p).norm(dim=1).min() < 0.05
    # Smooth: consecutive steps change direction gradually (no kinks).
    steps = sampled.diff(dim=0)
    cos = torch.nn.functional.cosine_similarity(steps[1:], steps[:-1])
    assert cos.min() > 0.99


def test_two_points_make_a_straight_segment() -> None:
    points = torch.tensor([[[4.0, 6.0], [20.0, 14.0]]])
    sampled = curves._spline(points, 50)[0]
    line = points[0, 0] + torch.linspace(0, 1, 50)[:, None] * (points[0, 1] - points[0, 0])
    torch.testing.assert_close(sampled, line)


def test_load_curves_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = load_curves(tmp_path, seed=1, n_train=40, n_test=30)
    assert data.train_x.shape == (40, 784) and data.test_x.shape == (30, 784)
    assert data.train_y is data.train_x and data.test_y is data.test_x
    assert data.source == "generated:curves-v1(seed=1)"
    assert (tmp_path / "curves-v1-seed1-40-30.pt").is_file()
    # Train and test come from different streams.
    assert not torch.allclose(data.train_x[:30], data.test_x)

    def no_render(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(curves, "render_curves", no_render)
    again = load_curves(tmp_path, seed=1, n_train=40, n_test=30)
    torch.testing.assert_close(again.train_x, data.train_x, rtol=0, atol=0)
    torch.testing.assert_close(again.test_x, data.test_x, rtol=0, atol=0)
    assert again.train_y is again.train_x


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "curves-v1-seed0-10-5.pt"
    path.write_bytes(b"not a cache")
    data = load_curves(tmp_path, n_train=10, n_test=5)
    torch.testing.assert_close(data.train_x, render_curves(10, 0))
    assert path.stat().st_size > 1000


def test_default_cache_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFACBENCH_CACHE", str(tmp_path))
    load_curves(n_train=4, n_test=2)
    assert (tmp_path / "curves-v1-seed0-4-2.pt").is_file()
