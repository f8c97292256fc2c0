"""FACES derived from Olivetti: reading the source files, the derivation, the split, the cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from kfacbench.data import faces
from kfacbench.data.faces import build_faces, load_faces, load_olivetti
from kfacbench.errors import DataError

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "olivetti"


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFACBENCH_DATA", raising=False)


def fake_faces(n: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64, 64), dtype=np.float32)


def test_shapes_split_and_normalisation() -> None:
    data = build_faces(fake_faces(), n_angles=2, n_scales=2)
    # 4 people: 3 train, 0 validation, 1 test; 10 images each, 4 variants per image.
    assert data.train_x.shape == (120, 625) and data.test_x.shape == (40, 625)
    assert data.train_x.dtype == torch.float32
    assert data.train_y is data.train_x and data.test_y is data.test_x
    torch.testing.assert_close(data.train_x.mean(0), torch.zeros(625), atol=1e-5, rtol=0)
    assert abs(data.train_x.std().item() - 1) < 1e-5
    assert data.source == "derived:olivetti-faces-v1(seed=0,angles=2,scales=2)"


def test_people_split_follows_hinton_salakhutdinov() -> None:
    train, test = faces._split_people(40)
    assert (train, test) == (range(25), range(30, 40))


def test_split_is_by_person() -> None:
    # Person p's images are constant p/10: train people 0, 1, 2 and test person 3.
    images = np.repeat(np.arange(4, dtype=np.float32) / 10, 10)[:, None, None] * np.ones((64, 64))
    data = build_faces(images.astype(np.float32), n_angles=2, n_scales=3)
    # Train: mean 0.1 per pixel, centred values -0.1, 0, 0.1 in equal numbers -> std 0.1·√(2/3).
    std = 0.1 * math.sqrt(2 / 3)
    torch.testing.assert_close(
        data.train_x[:60], torch.full((60, 625), -0.1 / std), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(data.test_x, torch.full((60, 625), 0.2 / std), atol=1e-4, rtol=0)


def test_rotation_direction() -> None:
    # Test person's images are bright in the top half; the two angles are -90° and +90°.
    images = fake_faces()
    images[30:] = 0
    images[30:, :32] = 1
    data = build_faces(images, n_angles=2, n_scales=1)
    test = data.test_x.reshape(10, 2, 25, 25)
    left, right = test[..., :12].mean(), test[..., 13:].mean()
    right_at_minus_90 = test[:, 0, :, 13:].mean() - test[:, 0, :, :12].mean()
    left_at_plus_90 = test[:, 1, :, :12].mean() - test[:, 1, :, 13:].mean()
    assert right_at_minus_90 > 2 and left_at_plus_90 > 2
    assert abs(left - right) < 0.5  # both halves bright equally often over the two angles


def test_deterministic_and_seeded() -> None:
    a = build_faces(fake_faces(), seed=1, n_angles=2, n_scales=2)
    b = build_faces(fake_faces(), seed=1, n_angles=2, n_scales=2)
    c = build_faces(fake_faces(), seed=2, n_angles=2, n_scales=2)
    assert torch.equal(a.train_x, b.train_x)
    assert not torch.allclose(a.train_x, c.train_x)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="P >= 4"):
        build_faces(fake_faces(30))
    with pytest.raises(ValueError, match="P >= 4"):
        build_faces(fake_faces(45))


# --- source files -------------------------------------------------------------------------------


def test_npy_float_and_uint8(tmp_path: Path) -> None:
    images = fake_faces(400)
    np.save(tmp_path / "olivetti_faces.npy", images)
    np.testing.assert_array_equal(load_olivetti(tmp_path), images)
    (tmp_path / "olivetti").mkdir()
    as_bytes = (images * 255).astype(np.uint8)
    np.save(tmp_path / "olivetti" / "olivetti_faces.npy", as_bytes)
    (tmp_path / "olivetti_faces.npy").unlink()
    np.testing.assert_allclose(load_olivetti(tmp_path), as_bytes / 255, rtol=1e-6)


def test_mat_layout(tmp_path: Path) -> None:
    # In the .mat file, image k is faces[:, k].reshape(64, 64).T.
    faces_var = np.random.default_rng(0).integers(0, 256, (4096, 400), dtype=np.uint8)
    scipy.io.savemat(tmp_path / "olivettifaces.mat", {"faces": faces_var})
    got = load_olivetti(tmp_path)
    assert got.shape == (400, 64, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got[123], faces_var[:, 123].reshape(64, 64).T / 255, rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "content", "what"),
    [
        ("olivettifaces.mat", b"garbage", "cannot be read"),
        ("olivetti_faces.npy", b"garbage", "cannot be read"),
    ],
)
def test_unreadable_file(tmp_path: Path, name: str, content: bytes, what: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=what) as err:
        load_olivetti(tmp_path)
    assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_wrong_shape_or_range(tmp_path: Path) -> None:
    path = tmp_path / "olivetti_faces.npy"
    np.save(path, fake_faces(40))
    with pytest.raises(DataError, match=r"shape \(40, 64, 64\), expected \(400, 64, 64\)"):
        load_olivetti(tmp_path)
    np.save(path, fake_faces(400) * 255)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_olivetti(tmp_path)
    scipy.io.savemat(tmp_path / "olivettifaces.mat", {"other": np.zeros(3)})
    with pytest.raises(DataError, match=r"olivettifaces\.mat cannot be read"):
        load_olivetti(tmp_path)


def test_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFACBENCH_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError) as err:
        load_olivetti(tmp_path)
    msg = str(err.value)
    assert msg.startswith("Olivetti faces file olivettifaces.mat not found in ")
    assert str(tmp_path / "olivetti") in msg and str(tmp_path / "env" / "olivetti") in msg


def test_load_faces_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "olivetti_faces.npy", fake_faces(400))
    calls = []
    original = faces.build_faces

    def small_build(images: np.ndarray, *, seed: int = 0) -> object:
        calls.append(seed)
        return original(images[:40], seed=seed, n_angles=2, n_scales=1)

    monkeypatch.setattr(faces, "build_faces", small_build)
    first = load_faces(tmp_path, tmp_path / "cache")
    second = load_faces(tmp_path, tmp_path / "cache")
    assert calls == [0]
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_x, second.test_x)
    assert second.train_y is second.train_x
    assert second.source == "derived:olivetti-faces-v1(seed=0)"
    # A different source file does not reuse the cache.
    np.save(tmp_path / "olivetti_faces.npy", fake_faces(400, seed=1))
    load_faces(tmp_path, tmp_path / "cache")
    assert calls == [0, 0]


@pytest.mark.skipif(
    not (REAL / "olivettifaces.mat").is_file(), reason=f"no olivettifaces.mat in {REAL}"
)
def test_real_olivetti() -> None:
    images = load_olivetti(REAL)
    assert images.shape == (400, 64, 64) and images.dtype == np.float32
    assert images.min() >= 0 and 0.8 < images.max() <= 1 and 0.3 < images.mean() < 0.7
    # Upright faces: the mean face is mirror-symmetric left-right (not top-bottom, as it would be
    # if transposed), and its darkest rows, the eyes, lie in the upper half.
    mean = images.mean(0)
    assert np.abs(mean - mean[:, ::-1]).mean() < 0.5 * np.abs(mean - mean[::-1]).mean()
    assert 8 < mean.mean(1)[4:40].argmin() + 4 < 24
