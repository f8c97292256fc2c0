"""MNIST / Fashion-MNIST IDX reader: format, corruption, checksums, search folders, splits."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from kfacbench.data import idx
from kfacbench.data.idx import (
    load_idx_dataset,
    mnist_autoencoder_splits,
    mnist_classification_splits,
    read_idx,
)
from kfacbench.errors import DataError

REAL_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CODES = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in the official IDX layout: 00 00 type ndim, big-endian dims, big-endian data."""
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    header = bytes([0, 0, CODES[dtype], array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(dtype).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def write_dataset(folder: Path, gz: bool = True, n_train: int = 6, n_test: int = 4) -> list:
    """The four files under their official names; returns the arrays written."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = [*fake_split(rng, n_train), *fake_split(rng, n_test)]
    names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ]
    for name, array in zip(names, arrays, strict=True):
        write(folder / (f"{name}.gz" if gz else name), idx_bytes(array), gz)
    return arrays


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFACBENCH_DATA", raising=False)


# --- read_idx ---------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, ">i4", ">f4"])
def test_round_trip(tmp_path: Path, gz: bool, dtype: str) -> None:
    array = np.arange(2 * 3 * 5).reshape(2, 3, 5).astype(dtype)
    got = read_idx(write(tmp_path / "f", idx_bytes(array), gz))
    np.testing.assert_array_equal(got, array)
    assert got.shape == (2, 3, 5) and got.dtype.isnative


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(
        read_idx(write(tmp_path / "x.raw", idx_bytes(array), True)), array
    )
    np.testing.assert_array_equal(
        read_idx(write(tmp_path / "x.gz", idx_bytes(array), False)), array
    )


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize(
    ("header", "what"),
    [
        (b"\x01\x00\x08\x01", "corrupt header"),  # first byte not zero
        (b"\x00\x00\x07\x01", "corrupt header"),  # unknown type code
        (b"\x00\x00", "corrupt header"),  # shorter than the magic number
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),  # dimensions cut off
    ],
)
def test_corrupt_header(tmp_path: Path, gz: bool, header: bytes, what: str) -> None:
    path = write(tmp_path / "bad-idx", header, gz)
    with pytest.raises(DataError, match=what) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_payload_names_sizes(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 28, 28), np.uint8))
    path = write(tmp_path / "t10k-images-idx3-ubyte", data[:-5], False)
    with pytest.raises(DataError) as err:
        read_idx(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg
    assert f"needs {len(data)} bytes" in msg and f"file has {len(data) - 5}" in msg


def test_trailing_bytes(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((4, 2), np.uint8))
    for gz in (False, True):
        path = write(tmp_path / f"f{gz}", data + b"xyz", gz)
        with pytest.raises(DataError, match="trailing bytes") as err:
            read_idx(path)
        assert str(path) in str(err.value)


def test_truncated_gzip_stream(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(np.arange(4000, dtype=np.uint8).reshape(40, 100)))
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match="not a valid gzip stream") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_garbage_after_gzip_stream(tmp_path: Path) -> None:
    path = tmp_path / "f.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))) + b"garbage!")
    with pytest.raises(DataError, match="gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


# --- load_idx_dataset ---------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_dataset(tmp_path: Path, gz: bool) -> None:
    arrays = write_dataset(tmp_path, gz=gz)
    got = load_idx_dataset("mnist", tmp_path, verify_md5=False)
    for a, b in zip(got, arrays, strict=True):
        np.testing.assert_array_equal(a, b)


def test_dataset_subfolder_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_dataset(tmp_path / "mnist")
    np.testing.assert_array_equal(
        load_idx_dataset("mnist", tmp_path, verify_md5=False)[0], arrays[0]
    )
    monkeypatch.setenv("KFACBENCH_DATA", str(tmp_path))
    np.testing.assert_array_equal(load_idx_dataset("mnist", None, verify_md5=False)[0], arrays[0])


def test_missing_file_names_file_and_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / "env"
    monkeypatch.setenv("KFACBENCH_DATA", str(env))
    with pytest.raises(DataError) as err:
        load_idx_dataset("mnist", tmp_path / "mine")
    msg = str(err.value)
    assert msg.startswith("MNIST file train-images-idx3-ubyte.gz not found in ")
    for folder in (tmp_path / "mine", tmp_path / "mine" / "mnist", env, env / "mnist"):
        assert str(folder) in msg
    assert "KFACBENCH_DATA" in msg and "--data-dir" in msg and "\n" not in msg


def test_fashion_searches_debian_folder() -> None:
    assert DEBIAN_FASHION in idx.EXTRA_DIRS["fashion_mnist"]
    assert not idx.EXTRA_DIRS["mnist"]


def test_md5_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as err:
        load_idx_dataset("mnist", tmp_path)
    msg = str(err.value)
    contents = hashlib.md5(gzip.decompress(path.read_bytes())).hexdigest()
    assert str(path) in msg
    assert f"md5 {contents}, expected 6bbc9ace898e44ae57da46a324031adb" in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg  # the official .gz md5, as published


def test_md5_mismatch_raw_file(tmp_path: Path) -> None:
    write_dataset(tmp_path, gz=False)
    with pytest.raises(DataError, match="expected f4a8712d7a061bf5bd6d2ca38dc4d50a") as err:
        load_idx_dataset("fashion_mnist", tmp_path)
    assert "Fashion-MNIST file" in str(err.value)


def test_count_mismatch(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    labels = np.zeros(3, np.uint8)  # 4 test images
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(labels), True)
    with pytest.raises(DataError, match="4 images but 3 labels") as err:
        load_idx_dataset("mnist", tmp_path, verify_md5=False)
    assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in str(err.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in str(err.value)


def test_label_out_of_range(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    write(
        tmp_path / "train-labels-idx1-ubyte.gz",
        idx_bytes(np.array([0, 1, 2, 3, 10, 5], np.uint8)),
        True,
    )
    with pytest.raises(DataError, match=r"label 10, expected 0\.\.9"):
        load_idx_dataset("mnist", tmp_path, verify_md5=False)


def test_wrong_image_shape(tmp_path: Path) -> None:
    write_dataset(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((6, 28, 27), np.uint8)), True)
    with pytest.raises(DataError, match=r"\(6, 28, 27\), expected uint8 images"):
        load_idx_dataset("mnist", tmp_path, verify_md5=False)


# --- splits -------------------------------------------------------------------------------------


def test_autoencoder_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_dataset(tmp_path)
    monkeypatch.setattr(idx, "_check_md5", lambda *args: None)  # tiny fake files
    data = mnist_autoencoder_splits("fashion_mnist", tmp_path)
    assert data.train_x.shape == (6, 784) and data.test_x.shape == (4, 784)
    assert data.train_x.dtype == torch.float32
    assert data.train_y is data.train_x and data.test_y is data.test_x
    torch.testing.assert_close(data.test_x[1], torch.from_numpy(arrays[2][1]).flatten() / 255.0)
    assert data.source == "real:fashion_mnist"


def test_classification_splits(tmp_path: Path) -> None:
    arrays = write_dataset(tmp_path, n_train=50)
    data = mnist_classification_splits("mnist", tmp_path, verify_md5=False)
    assert data.train_x.shape == (50, 1, 28, 28) and data.test_x.shape == (4, 1, 28, 28)
    assert abs(data.train_x.mean().item()) < 1e-4 and abs(data.train_x.std().item() - 1) < 1e-4
    assert data.train_y.dtype == torch.int64
    np.testing.assert_array_equal(data.test_y.numpy(), arrays[3])
    assert data.source == "real:mnist"


# --- real files (opt-in: skipped where they are absent) -----------------------------------------


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason=f"real MNIST test files not in {REAL_MNIST}")
def test_real_mnist_test_files() -> None:
    images_path = REAL_MNIST / "t10k-images-idx3-ubyte.gz"
    labels_path = REAL_MNIST / "t10k-labels-idx1-ubyte.gz"
    assert (
        hashlib.md5(images_path.read_bytes()).hexdigest()
        == idx.MD5["mnist"]["t10k-images-idx3-ubyte"][0]
    )
    for path, name in (
        (images_path, "t10k-images-idx3-ubyte"),
        (labels_path, "t10k-labels-idx1-ubyte"),
    ):
        idx._check_md5(path, idx._contents(path), "mnist", name)  # contents md5 table is right
    images, labels = read_idx(images_path), read_idx(labels_path)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(labels.tolist()) == set(range(10))


@pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian() -> None:
    train_x, train_y, test_x, test_y = load_idx_dataset("fashion_mnist", None)
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
