"""CIFAR-10 from the official "python version" batches.

The official distribution (https://www.cs.toronto.edu/~kriz/cifar.html) is
``cifar-10-python.tar.gz``, holding ``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``:
pickled dicts with bytes keys, ``b"data"`` a uint8 array ``(10000, 3072)`` (1024 red, then 1024
green, then 1024 blue pixels, each a 32×32 image in row-major order) and ``b"labels"`` a list of
ints 0..9. Either the extracted folder or the archive itself is read (archive members are read
in one pass, nothing is extracted to disk).

Pickle files can run arbitrary code when loaded, and data files come from wherever a user found
them, so batches are loaded with a restricted unpickler that resolves only the few globals the
official batches (and batches re-pickled from Python 3) need to rebuild numpy arrays.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfacbench.data import Splits
from kfacbench.data.files import find_file, md5sum, search_dirs
from kfacbench.errors import DataError

ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
HOW_TO_GET = (
    "set --data-dir or KFACBENCH_DATA to a folder holding cifar-10-batches-py/ or "
    "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"
)

# The functions numpy's pickling refers to, taken from numpy itself rather than imported by
# their private module paths (which moved from numpy.core to numpy._core in numpy 2).
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = np.empty(0).__reduce_ex__(5)[0]

_ALLOWED: dict[tuple[str, str], Any] = {
    # ndarray.__reduce__ (protocols 0-4); numpy 1 and numpy 2 module names.
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # ndarray.__reduce_ex__(5).
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    # Python 3 pickles bytes as _codecs.encode(str, "latin1") under protocols 0-2.
    ("_codecs", "encode"): codecs.encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED``, so loading cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle and validate one batch; ``where`` names it (file, or archive and member)."""
    try:
        batch = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # malformed pickles raise many exception types
        raise DataError(
            f"CIFAR-10 batch {where} cannot be unpickled ({type(e).__name__}: {e}): it is "
            "truncated, corrupt or not an official batch"
        ) from e
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR-10 batch {where} holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2):
        found = images.shape if isinstance(images, np.ndarray) else type(images).__name__
        raise DataError(
            f"CIFAR-10 batch {where} has data {found}, expected a uint8 array (n, 3072)"
        )
    if images.shape[1] != 3072:
        raise DataError(
            f"CIFAR-10 batch {where} has data of shape {images.shape}, expected (n, 3072)"
        )
    label_array = np.asarray(labels)
    if label_array.dtype.kind not in "iu":
        raise DataError(
            f"CIFAR-10 batch {where} has labels of type {label_array.dtype}, expected ints"
        )
    if label_array.shape != (len(images),):
        raise DataError(
            f"CIFAR-10 batch {where} has labels of shape {label_array.shape} for "
            f"{len(images)} images"
        )
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise DataError(
            f"CIFAR-10 batch {where} has labels in {label_array.min()}..{label_array.max()}, "
            "expected 0..9"
        )
    return images.reshape(-1, 3, 32, 32), label_array.astype(np.int64)


def _read_folder(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Batch name -> (file path for messages, bytes)."""
    out = {}
    for name in (*TRAIN_BATCHES, TEST_BATCH):
        path = folder / name
        if not path.is_file():
            raise DataError(
                f"CIFAR-10 batch {name} not found in {folder} (the folder must hold "
                f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH}; {HOW_TO_GET})"
            )
        out[name] = (str(path), path.read_bytes())
    return out


def _read_archive(path: Path, verify_md5: bool) -> dict[str, tuple[str, bytes]]:
    """Batch name -> (archive and member for messages, bytes)."""
    if verify_md5 and (actual := md5sum(path)) != ARCHIVE_MD5:
        raise DataError(
            f"CIFAR-10 archive {path} has md5 {actual}, expected {ARCHIVE_MD5}: it is corrupt "
            f"or not the official file ({HOW_TO_GET})"
        )
    wanted = {f"{FOLDER}/{name}" for name in (*TRAIN_BATCHES, TEST_BATCH)}
    found: dict[str, bytes] = {}
    member = "(start of archive)"
    try:
        # One sequential pass: seeking back in a gzip stream would decompress it again.
        with tarfile.open(path, "r:gz") as tar:
            for info in tar:
                member = info.name
                if member in wanted and info.isfile():
                    reader = tar.extractfile(info)
                    assert reader is not None  # regular files always have a reader
                    found[member] = reader.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(
            f"CIFAR-10 archive {path} is truncated or corrupt near member {member} ({e})"
        ) from e
    if missing := sorted(wanted - found.keys()):
        raise DataError(
            f"CIFAR-10 archive {path} lacks member {missing[0]} (expected {FOLDER}/ with "
            f"{', '.join(TRAIN_BATCHES)} and {TEST_BATCH})"
        )
    return {m.rsplit("/", 1)[1]: (f"{path}:{m}", data) for m, data in found.items()}


def load_cifar10_arrays(
    data_dir: Path | None, *, verify_md5: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check the official CIFAR-10 batches.

    In each folder of ``search_dirs(data_dir, "cifar10")``, in order, the reader takes
    ``cifar-10-batches-py/``, then batches lying directly in the folder, then the archive
    ``cifar-10-python.tar.gz``; the first found is used.

    Args:
        data_dir: the user's data folder, or None.
        verify_md5: check the archive's MD5 (the extracted batches have no published checksums
            and are checked structurally only).

    Returns:
        ``(train_x, train_y, test_x, test_y)``: uint8 images ``(N, 3, 32, 32)`` and int64
        labels ``(N,)``.

    Raises:
        DataError: missing, corrupt, truncated, hostile or misshapen files; the message names
            the file (and the archive member).
    """
    found = find_file(
        [f"{FOLDER}/{TRAIN_BATCHES[0]}", TRAIN_BATCHES[0], ARCHIVE],
        search_dirs(data_dir, "cifar10"),
        what="CIFAR-10 batch",
        how_to_get=HOW_TO_GET,
    )
    raw = _read_archive(found, verify_md5) if found.name == ARCHIVE else _read_folder(found.parent)
    batches = {name: _parse_batch(data, where) for name, (where, data) in raw.items()}
    train = [batches[name] for name in TRAIN_BATCHES]
    test_x, test_y = batches[TEST_BATCH]
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    return train_x, train_y, test_x, test_y


def cifar10_splits(data_dir: Path | None, *, verify_md5: bool = True) -> Splits:
    """CIFAR-10 standardised per colour channel by the training set's mean and std.

    Returns:
        Splits with ``(N, 3, 32, 32)`` float32 inputs, int64 labels and source
        ``"real:cifar10"``.
    """
    train_x, train_y, test_x, test_y = load_cifar10_arrays(data_dir, verify_md5=verify_md5)
    train, test = torch.from_numpy(train_x).float(), torch.from_numpy(test_x).float()
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True)
    train.sub_(mean).div_(std)
    test.sub_(mean).div_(std)
    return Splits(train, torch.from_numpy(train_y), test, torch.from_numpy(test_y), "real:cifar10")
