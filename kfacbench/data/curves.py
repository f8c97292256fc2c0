"""The CURVES data set of Hinton & Salakhutdinov (2006), regenerated.

H&S trained their deep autoencoders on 28×28 images of synthetic curves: each image is a smooth
curve through three random points, drawn as a thin pen stroke (20,000 training and 10,000 test
images). Their data file is not distributed with kfacbench; this module *regenerates* a data set
following that description, so results on it are comparable in kind, not in exact numbers, to
results on the original file. Results record it as ``generated:curves-v1(seed=...)``.

The generator (:func:`render_curves`), per image:

1. ``n_points`` control points are drawn uniformly in the frame, ``margin`` pixels from the edge;
2. a natural cubic spline through them, parametrised by chord length, gives the curve
   ``(x(t), y(t))``; where it overshoots the box the control points came from, the curve is
   shrunk about its centre and shifted back in, so no stroke is cut at the border;
3. the curve is sampled densely and drawn as the line integral of a Gaussian pen of width
   ``blur_sigma`` (pixels) along it, normalised so that a straight stroke has peak intensity 1
   and a cross-section ``exp(-r²/2σ²)`` at distance ``r`` from the curve; where the curve
   crosses itself the ink adds up and is clipped to 1.

The Gaussian is separable, so a whole batch of images is two small exponentials and one batched
matrix product (``image = Gyᵀ·diag(w)·Gx``); 30,000 images take a few seconds on two cores.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kfacbench.data import Splits
from kfacbench.data.files import default_cache_dir, load_cached, save_tensors_atomic

FORMAT = "curves-v1"
"""Name of the generator version; bump it when rendering changes, so old caches are not reused."""

CHUNK = 1024
"""Images rendered per batch: bounds memory (about 30 MB of temporaries per batch)."""


def render_curves(
    n: int,
    seed: int,
    *,
    size: int = 28,
    n_points: int = 3,
    margin: float = 3.0,
    blur_sigma: float = 0.7,
) -> torch.Tensor:
    """Render ``n`` curve images (see the module docstring for the construction).

    Args:
        n: number of images.
        seed: seed of the CPU generator; the same seed gives the same images (the control points
            of all images are drawn first, so the result does not depend on the batch size).
        size: image side in pixels.
        n_points: control points per curve (at least 2; 2 gives straight strokes).
        margin: distance in pixels between the frame's edge and the box holding the curve.
        blur_sigma: standard deviation in pixels of the Gaussian pen.

    Returns:
        Tensor ``(n, size * size)`` float32 in [0, 1], rows of pixels in row-major order.
    """
    if n_points < 2:
        raise ValueError(f"n_points must be at least 2, got {n_points}")
    lo, hi = margin, size - 1.0 - margin
    gen = torch.Generator().manual_seed(seed)
    points = lo + (hi - lo) * torch.rand(n, n_points, 2, generator=gen)
    n_samples = 2 * size * (n_points - 1)
    out = torch.empty(n, size * size)
    for start in range(0, n, CHUNK):
        chunk = points[start : start + CHUNK]
        curve = _fit_into(_spline(chunk, n_samples), lo, hi)
        out[start : start + CHUNK] = _draw(curve, size, blur_sigma).flatten(1)
    return out


def _spline(points: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Sample natural cubic splines through ``points`` (B, n, 2) at ``n_samples`` parameters.

    The parameter is the cumulative chord length, sampled uniformly from the first to the last
    point; the second derivatives ``M`` at the knots solve the usual tridiagonal system with
    ``M_0 = M_{n-1} = 0`` (natural end conditions).
    """
    b, n, _ = points.shape
    h = (points[:, 1:] - points[:, :-1]).norm(dim=-1).clamp_min(1e-3)  # (B, n-1)
    knots = torch.cat([torch.zeros(b, 1), h.cumsum(1)], dim=1)  # (B, n)
    slopes = (points[:, 1:] - points[:, :-1]) / h[..., None]
    m = torch.zeros(b, n, 2)
    if n > 2:
        # h_{i-1} M_{i-1} + 2 (h_{i-1} + h_i) M_i + h_i M_{i+1} = 6 (slope_i - slope_{i-1})
        inner = h[:, 1:-1]
        a = torch.diag_embed(2 * (h[:, :-1] + h[:, 1:]))
        a = a + torch.diag_embed(inner, offset=1) + torch.diag_embed(inner, offset=-1)
        m[:, 1:-1] = torch.linalg.solve(a, 6 * (slopes[:, 1:] - slopes[:, :-1]))
    t = torch.linspace(0, 1, n_samples) * knots[:, -1:]  # (B, S)
    seg = torch.searchsorted(knots[:, 1:-1].contiguous(), t, right=True)  # (B, S) in 0..n-2
    t0, t1 = knots.gather(1, seg), knots.gather(1, seg + 1)
    idx = seg[..., None].expand(-1, -1, 2)
    p0, p1 = points.gather(1, idx), points.gather(1, idx + 1)
    m0, m1 = m.gather(1, idx), m.gather(1, idx + 1)
    hs = (t1 - t0)[..., None]
    u, v = (t1 - t)[..., None], (t - t0)[..., None]
    return (
        (m0 * u**3 + m1 * v**3) / (6 * hs)
        + (p0 / hs - m0 * hs / 6) * u
        + (p1 / hs - m1 * hs / 6) * v
    )


def _fit_into(curve: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Shrink (about the bounding-box centre) and shift each curve (B, S, 2) into [lo, hi]²."""
    cmin, cmax = curve.amin(1, keepdim=True), curve.amax(1, keepdim=True)
    centre = (cmin + cmax) / 2
    extent = (cmax - cmin).amax(-1, keepdim=True).clamp_min(1e-6)
    scale = ((hi - lo) / extent).clamp(max=1.0)
    curve = centre + (curve - centre) * scale
    cmin, cmax = curve.amin(1, keepdim=True), curve.amax(1, keepdim=True)
    return curve + (lo - cmin).clamp_min(0) - (cmax - hi).clamp_min(0)


def _draw(curve: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Ink of a Gaussian pen along each sampled curve (B, S, 2) -> images (B, size, size).

    Each sample carries the arc length around it as weight, so the ink does not depend on how
    fast the spline parameter moves; dividing by ``sqrt(2π)·σ`` makes the integral across a
    straight stroke peak at 1.
    """
    step = (curve[:, 1:] - curve[:, :-1]).norm(dim=-1)  # (B, S-1)
    w = torch.zeros(curve.shape[:2])
    w[:, :-1] += step / 2
    w[:, 1:] += step / 2
    w = w / (math.sqrt(2 * math.pi) * sigma)
    pix = torch.arange(size, dtype=torch.float32)
    gx = torch.exp(-((pix - curve[..., 0:1]) ** 2) / (2 * sigma**2))  # (B, S, size) columns
    gy = torch.exp(-((pix - curve[..., 1:2]) ** 2) / (2 * sigma**2))  # (B, S, size) rows
    return torch.bmm((gy * w[..., None]).transpose(1, 2), gx).clamp_(0, 1)


def load_curves(
    cache_dir: Path | None = None, *, seed: int = 0, n_train: int = 20_000, n_test: int = 10_000
) -> Splits:
    """The regenerated CURVES set (train and test), built once and then read from a cache.

    Train and test images come from disjoint generator streams (seeds ``2·seed`` and
    ``2·seed + 1``), so no test image is a training image. The cache file name holds the
    generator version, the seed and both sizes.

    Args:
        cache_dir: cache folder; None means :func:`~kfacbench.data.files.default_cache_dir`.
        seed: data seed (0 is the one the workloads use).
        n_train: training images (H&S: 20,000).
        n_test: test images (H&S: 10,000).

    Returns:
        Splits with ``(N, 784)`` float32 inputs in [0, 1] and targets identical to the inputs.
    """
    path = (cache_dir or default_cache_dir()) / f"{FORMAT}-seed{seed}-{n_train}-{n_test}.pt"
    cached = load_cached(path)
    if cached is not None and {"train", "test"} <= cached.keys():
        train, test = cached["train"], cached["test"]
    else:
        train, test = render_curves(n_train, 2 * seed), render_curves(n_test, 2 * seed + 1)
        save_tensors_atomic(path, {"train": train, "test": test})
    return Splits(train, train, test, test, f"generated:{FORMAT}(seed={seed})")
