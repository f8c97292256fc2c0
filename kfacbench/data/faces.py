"""The FACES data set of Hinton & Salakhutdinov (2006), derived from the Olivetti faces.

H&S built FACES from the 400 Olivetti faces (40 people × 10 images, 64×64 grey levels): every
image was rotated (-90° to 90°), scaled (1.4 to 2.0), cropped and subsampled to 25×25, giving
165,600 images; 25 people are the training set (103,500 images), 5 people a validation set and
the last 10 people the test set (41,400 images). Their file is not distributed, so this module
*regenerates* FACES following that description (:func:`build_faces`); results on it are
comparable in kind, not in exact numbers, to results on the original. Results record it as
``derived:olivetti-faces-v1(seed=...)``. The validation people (25..29) are not rendered,
because the suite evaluates on the test set.

The source images are read from ``olivettifaces.mat`` (the MATLAB file of S. Roweis) or
``olivetti_faces.npy`` (e.g. scikit-learn's ``fetch_olivetti_faces().images`` saved with
``np.save``); the faces are © AT&T Laboratories Cambridge, credit them when used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kfacbench.data import Splits
from kfacbench.data.files import (
    default_cache_dir,
    find_file,
    load_cached,
    save_tensors_atomic,
    search_dirs,
)
from kfacbench.errors import DataError

FORMAT = "olivetti-faces-v1"
"""Name of the derivation version; bump it when the construction changes (invalidates caches)."""

MAT, NPY = "olivettifaces.mat", "olivetti_faces.npy"
HOW_TO_GET = (
    "set --data-dir or KFACBENCH_DATA to a folder holding olivettifaces.mat from "
    "https://cs.nyu.edu/~roweis/data/olivettifaces.mat, or olivetti_faces.npy: 400×64×64 in "
    "[0, 1], e.g. scikit-learn's fetch_olivetti_faces().images saved with numpy.save"
)
IMAGES_PER_PERSON = 10
OUT = 25
"""Side of the derived images (H&S: 25×25)."""
SUPERSAMPLE = 2
"""Each output pixel averages SUPERSAMPLE² bilinear samples, to avoid aliasing when subsampling."""
MAX_SHIFT_PX = 2.0
"""Largest random offset of the crop window, in pixels of the 64×64 source image."""
CHUNK = 16
"""Source images transformed per batch (each gives n_angles × n_scales outputs)."""


def load_olivetti(data_dir: Path | None) -> np.ndarray:
    """The 400 Olivetti faces as float32 ``(400, 64, 64)`` in [0, 1], upright.

    Image ``10p + k`` is person ``p``'s ``k``-th image, in both file formats. In the ``.mat``
    file, variable ``faces`` is ``4096×400`` uint8 and image ``k`` is
    ``faces[:, k].reshape(64, 64).T``.

    Raises:
        DataError: file missing (the message lists the folders searched), unreadable, or not
            400 images of 64×64 in range.
    """
    path = find_file(
        [MAT, NPY],
        search_dirs(data_dir, "olivetti"),
        what="Olivetti faces file",
        how_to_get=HOW_TO_GET,
    )
    try:
        if path.name == MAT:
            import scipy.io  # only FACES needs scipy: keep `import kfacbench.data` light

            variables = scipy.io.loadmat(path)
            if "faces" not in variables:
                raise ValueError("it has no variable 'faces'")
            faces = variables["faces"]
            if faces.shape != (4096, 400):
                raise ValueError(f"variable faces has shape {faces.shape}, expected (4096, 400)")
            images = faces.T.reshape(400, 64, 64).transpose(0, 2, 1)
        else:
            images = np.load(path, allow_pickle=False)
    except Exception as e:  # scipy and numpy raise many types on malformed files
        raise DataError(f"Olivetti faces file {path} cannot be read ({e}); {HOW_TO_GET}") from e
    if images.shape != (400, 64, 64):
        raise DataError(
            f"Olivetti faces file {path} holds shape {images.shape}, expected (400, 64, 64)"
        )
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255
    images = images.astype(np.float32)
    if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise DataError(
            f"Olivetti faces file {path} holds values outside [0, 1] (float files must be scaled "
            "to [0, 1], like scikit-learn's)"
        )
    return images


def _split_people(n_people: int) -> tuple[range, range]:
    """Train and test people, in the proportions of H&S's 25 / 5 (unused) / 10 split of 40."""
    n_test, n_val = n_people // 4, n_people // 8
    n_train = n_people - n_val - n_test
    return range(n_train), range(n_train + n_val, n_people)


def _render(images: torch.Tensor, base: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sample every image (M, 64, 64) through every variant's grid -> (M * V, OUT * OUT).

    ``base`` (V, S, S, 2) holds the variants' sampling grids without offset, ``offsets``
    (M, V, 2) each image-variant's shift in normalised coordinates. The V grids of one image are
    stacked vertically into one tall grid, so one ``grid_sample`` call serves all variants of an
    image without copying the image V times.
    """
    v, s = base.shape[0], base.shape[1]
    out = torch.empty(len(images) * v, OUT * OUT)
    for start in range(0, len(images), CHUNK):
        img = images[start : start + CHUNK, None]
        grid = (base + offsets[start : start + CHUNK, :, None, None, :]).reshape(-1, v * s, s, 2)
        sampled = F.grid_sample(
            img, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        pooled = F.avg_pool2d(sampled.reshape(-1, 1, s, s), SUPERSAMPLE)
        out[start * v : (start + len(img)) * v] = pooled.reshape(-1, OUT * OUT)
    return out


def build_faces(
    images: np.ndarray, *, seed: int = 0, n_angles: int = 23, n_scales: int = 18
) -> Splits:
    """Derive FACES from the Olivetti faces (or any person-ordered set of 64×64 images).

    Each image yields ``n_angles × n_scales`` variants (default 414: 400 × 414 = H&S's 165,600):
    rotations evenly spread over [-90°, 90°] and scalings over [1.4, 2.0], where scaling ``s``
    means the 25×25 output covers the central ``64/s`` pixels of the rotated source; each
    variant's crop window is shifted by a random offset of up to ``MAX_SHIFT_PX`` pixels
    (seeded). Output pixels average 2×2 bilinear samples. Images ``10p..10p+9`` are person
    ``p``; people are split in H&S's proportions (of 40: people 0..24 train, 25..29 unused
    validation, 30..39 test).

    Inputs are centred per pixel by the training set's mean image and divided by the training
    set's overall standard deviation (after centring); both are computed on train only and
    applied to both splits, so squared-error losses are on a comparable scale across pixels.

    Args:
        images: ``(M, 64, 64)`` in [0, 1], M a multiple of 10 with at least 4 people.
        seed: seed of the crop offsets.
        n_angles: number of rotations.
        n_scales: number of scalings.

    Returns:
        Splits with ``(N, 625)`` float32 inputs and targets identical to the inputs.
    """
    n_people, rest = divmod(len(images), IMAGES_PER_PERSON)
    if rest or n_people < 4 or images.shape[1:] != (64, 64):
        raise ValueError(f"expected (10·P, 64, 64) images with P >= 4 people, got {images.shape}")
    angles = torch.deg2rad(torch.linspace(-90, 90, n_angles, dtype=torch.float64))
    scales = torch.linspace(1.4, 2.0, n_scales, dtype=torch.float64)
    a, sc = torch.meshgrid(angles, scales, indexing="ij")
    a, sc = a.flatten(), sc.flatten()
    cos, sin, zero = torch.cos(a) / sc, torch.sin(a) / sc, torch.zeros_like(a)
    # Output (x, y) in [-1, 1]² -> source coordinates: rotate, then shrink by the scale.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    side = OUT * SUPERSAMPLE
    base = F.affine_grid(theta.float(), [len(a), 1, side, side], align_corners=False)
    gen = torch.Generator().manual_seed(seed)
    shift = MAX_SHIFT_PX * 2 / 64  # pixels -> normalised units (the source spans 2 units)
    offsets = shift * (2 * torch.rand(len(images), len(a), 2, generator=gen) - 1)
    source = torch.as_tensor(images, dtype=torch.float32)

    train_people, test_people = _split_people(n_people)

    def rows(people: range) -> slice:
        return slice(people.start * IMAGES_PER_PERSON, people.stop * IMAGES_PER_PERSON)

    tr, te = rows(train_people), rows(test_people)
    train = _render(source[tr], base, offsets[tr])
    test = _render(source[te], base, offsets[te])
    mean = train.mean(0)
    train.sub_(mean)
    test.sub_(mean)
    std = train.std()
    train.div_(std)
    test.div_(std)
    name = f"seed={seed}"
    if (n_angles, n_scales) != (23, 18):
        name += f",angles={n_angles},scales={n_scales}"
    return Splits(train, train, test, test, f"derived:{FORMAT}({name})")


def load_faces(data_dir: Path | None, cache_dir: Path | None = None, *, seed: int = 0) -> Splits:
    """FACES at full size, derived once from the Olivetti file and then read from a cache.

    The cache (about 360 MB) is keyed by the derivation version, the seed and a hash of the
    source images, so a different source file never reuses another's cache.

    Args:
        data_dir: the user's data folder holding the Olivetti file, or None.
        cache_dir: cache folder; None means :func:`~kfacbench.data.files.default_cache_dir`.
        seed: seed of the crop offsets (0 is the one the workloads use).
    """
    images = load_olivetti(data_dir)
    key = hashlib.md5(images.tobytes()).hexdigest()[:8]
    path = (cache_dir or default_cache_dir()) / f"{FORMAT}-seed{seed}-{key}.pt"
    cached = load_cached(path)
    if cached is not None and {"train", "test"} <= cached.keys():
        train, test = cached["train"], cached["test"]
        return Splits(train, train, test, test, f"derived:{FORMAT}(seed={seed})")
    splits = build_faces(images, seed=seed)
    save_tensors_atomic(path, {"train": splits.train_x, "test": splits.test_x})
    return splits
