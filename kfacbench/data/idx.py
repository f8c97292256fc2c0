"""MNIST and Fashion-MNIST from their official IDX files.

The IDX format (http://yann.lecun.com/exdb/mnist/) is a 4-byte magic number (two zero bytes, a
type code, the number of dimensions), the dimensions as big-endian uint32, then the data in C
order. Files are accepted gzip-compressed (as distributed) or raw; compression is detected from
the content (gzip magic bytes ``1f 8b``), not the file name, because users rename files.

Checksums: what identifies the data is the MD5 of the uncompressed contents, so that is what is
checked, for ``.gz`` and raw files alike. Checking the ``.gz`` file's own MD5 would reject good
copies that were recompressed: Debian's ``dataset-fashion-mnist`` package ships recompressed
files whose ``.gz`` MD5s differ from the official ones while their contents are identical. The
official ``.gz`` MD5s are kept for the error message, since they are what users find published.
The contents' MD5s were cross-checked: MNIST's test files by decompressing the official ``.gz``
files (whose MD5s match), Fashion-MNIST's by decompressing Debian's copies, and all eight
against several independently published lists.

Beyond checksums, images and labels are checked structurally (28×28 uint8, equal counts, labels
0..9), which is all that happens with ``verify_md5=False``.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kfacbench.data import Splits
from kfacbench.data.files import find_file, md5sum, search_dirs
from kfacbench.errors import DataError

Dataset = Literal["mnist", "fashion_mnist"]

# IDX type code -> big-endian numpy dtype.
_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Official file name (uncompressed) -> (MD5 of the .gz file, MD5 of the uncompressed contents).
MD5: dict[Dataset, dict[str, tuple[str, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "6bbc9ace898e44ae57da46a324031adb",
        ),
        "train-labels-idx1-ubyte": (
            "d53e105ee54ea40749a09fcbcd1e9432",
            "a25bea736e30d166cdddb491f175f624",
        ),
        "t10k-images-idx3-ubyte": (
            "9fb629c4189551a2d022fa330f9573f3",
            "2646ac647ad5339dbf082846283269ea",
        ),
        "t10k-labels-idx1-ubyte": (
            "ec29112dd5afa0611ce80d1b7f02629c",
            "27ae3e4e09519cfbb04c329615203637",
        ),
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": (
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        ),
        "train-labels-idx1-ubyte": (
            "25c81989df183df01b3e8a0aad5dffbe",
            "9018921c3c673c538a1fc5bad174d6f9",
        ),
        "t10k-images-idx3-ubyte": (
            "bef4ecab320f06d8554ea6380940ec79",
            "8181f5470baa50b63fa0f6fddb340f0a",
        ),
        "t10k-labels-idx1-ubyte": (
            "bb300cfdad3c16e7a12a480ee83cd310",
            "15d484375f8d13e6eb1aabb0c3f46965",
        ),
    },
}

SOURCES: dict[Dataset, str] = {
    "mnist": "http://yann.lecun.com/exdb/mnist/",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist "
    "or Debian's dataset-fashion-mnist package",
}

EXTRA_DIRS: dict[Dataset, tuple[Path, ...]] = {
    "mnist": (),
    # Debian's dataset-fashion-mnist installs the four official file names (gzip) here.
    "fashion_mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}

_NAMES: dict[Dataset, str] = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _contents(path: Path) -> bytes:
    """The file's bytes, decompressed when they start with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read IDX file {path}: {e.strerror or e}") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:  # truncated stream, bad CRC, trailing garbage
        raise DataError(
            f"IDX file {path} is not a valid gzip stream ({len(raw)} bytes; {e}): "
            "it is truncated or corrupt, get a fresh copy"
        ) from e


def _parse(data: bytes, path: Path) -> np.ndarray:
    """Validate an IDX header and payload length and return the array (native byte order)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(
            f"IDX file {path} has a corrupt header (magic bytes {data[:4].hex() or 'missing'}, "
            "expected 0000 + type code 08/09/0b/0c/0d/0e + number of dimensions)"
        )
    dtype, ndim = _DTYPES[data[2]], data[3]
    start = 4 + 4 * ndim
    if len(data) < start:
        raise DataError(
            f"IDX file {path} is truncated: header of {ndim} dimensions needs {start} bytes, "
            f"file has {len(data)}"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = start + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        what = "is truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(
            f"IDX file {path} {what}: shape {shape} needs {expected} bytes (uncompressed), "
            f"file has {len(data)}"
        )
    return np.frombuffer(data, dtype, offset=start).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw.

    Raises:
        DataError: unreadable or corrupt gzip stream, corrupt header, or a payload shorter or
            longer than the header's dimensions say (sizes in the message).
    """
    return _parse(_contents(path), path)


def _check_md5(path: Path, contents: bytes, dataset: Dataset, name: str) -> None:
    """Compare the uncompressed contents' MD5 with the official one (see the module docstring)."""
    gz_md5, raw_md5 = MD5[dataset][name]
    actual = hashlib.md5(contents).hexdigest()
    if actual == raw_md5:
        return
    file_md5 = md5sum(path)
    gz_note = f" (md5 of the .gz file {file_md5}, official {gz_md5})" if file_md5 != actual else ""
    raise DataError(
        f"{_NAMES[dataset]} file {path} has md5 {actual}, expected {raw_md5} for the "
        f"uncompressed contents{gz_note}: it is corrupt or not the official {_NAMES[dataset]} "
        f"file; get it from {SOURCES[dataset]}"
    )


def _load_file(
    dataset: Dataset, name: str, dirs: list[Path], verify_md5: bool
) -> tuple[Path, np.ndarray]:
    path = find_file(
        [f"{name}.gz", name],
        dirs,
        what=f"{_NAMES[dataset]} file",
        how_to_get=f"set --data-dir or KFACBENCH_DATA to a folder holding the official IDX files "
        f"from {SOURCES[dataset]}",
    )
    contents = _contents(path)
    if verify_md5:
        _check_md5(path, contents, dataset, name)
    return path, _parse(contents, path)


def load_idx_dataset(
    dataset: Dataset, data_dir: Path | None, *, verify_md5: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check the four official files of MNIST or Fashion-MNIST.

    Each file is looked for as ``<name>.gz`` then ``<name>`` in
    ``search_dirs(data_dir, dataset, EXTRA_DIRS[dataset])``.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        data_dir: the user's data folder, or None.
        verify_md5: check the files against the official checksums (see the module docstring).

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: uint8 arrays of shapes
        ``(N, 28, 28)`` and ``(N,)``.

    Raises:
        DataError: a missing, corrupt or unofficial file, or images and labels that do not fit
            together; the message names the file.
    """
    dirs = search_dirs(data_dir, dataset, EXTRA_DIRS[dataset])
    out: list[np.ndarray] = []
    for split in ("train", "t10k"):
        img_path, images = _load_file(dataset, f"{split}-images-idx3-ubyte", dirs, verify_md5)
        lab_path, labels = _load_file(dataset, f"{split}-labels-idx1-ubyte", dirs, verify_md5)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(
                f"{_NAMES[dataset]} file {img_path} holds {images.dtype} {images.shape}, "
                "expected uint8 images of shape (N, 28, 28)"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise DataError(
                f"{_NAMES[dataset]} file {lab_path} holds {labels.dtype} {labels.shape}, "
                "expected uint8 labels of shape (N,)"
            )
        if len(labels) != len(images):
            raise DataError(
                f"{_NAMES[dataset]} files {img_path} and {lab_path} do not match: "
                f"{len(images)} images but {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DataError(
                f"{_NAMES[dataset]} file {lab_path} has label {labels.max()}, expected 0..9"
            )
        out += [images, labels]
    return out[0], out[1], out[2], out[3]


def mnist_autoencoder_splits(
    dataset: Dataset, data_dir: Path | None, *, verify_md5: bool = True
) -> Splits:
    """Autoencoder data: pixels scaled to [0, 1] (valid Bernoulli targets), flattened to 784.

    Returns:
        Splits with ``(N, 784)`` float32 inputs, targets identical to the inputs, source
        ``"real:<dataset>"``.
    """
    train_img, _, test_img, _ = load_idx_dataset(dataset, data_dir, verify_md5=verify_md5)
    train = torch.from_numpy(train_img).reshape(len(train_img), -1).float().div_(255)
    test = torch.from_numpy(test_img).reshape(len(test_img), -1).float().div_(255)
    return Splits(train, train, test, test, f"real:{dataset}")


def mnist_classification_splits(
    dataset: Dataset, data_dir: Path | None, *, verify_md5: bool = True
) -> Splits:
    """Classification data: ``(N, 1, 28, 28)`` images standardised by the training set.

    Pixels are shifted and scaled by the mean and standard deviation of all training pixels
    (one pair of numbers, computed on train only and applied to both splits).

    Returns:
        Splits with float32 inputs, int64 labels and source ``"real:<dataset>"``.
    """
    train_img, train_lab, test_img, test_lab = load_idx_dataset(
        dataset, data_dir, verify_md5=verify_md5
    )
    train = torch.from_numpy(train_img).float().unsqueeze(1)
    test = torch.from_numpy(test_img).float().unsqueeze(1)
    mean, std = train.mean(), train.std()
    train.sub_(mean).div_(std)
    test.sub_(mean).div_(std)
    labels = (torch.from_numpy(train_lab).long(), torch.from_numpy(test_lab).long())
    return Splits(train, labels[0], test, labels[1], f"real:{dataset}")
