"""CIFAR-10 python batches: folder and archive, pixel layout, corrupt and hostile files."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kfacbench.data.cifar import cifar10_splits, load_cifar10_arrays
from kfacbench.errors import DataError

NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def batch_bytes(data: np.ndarray, labels: list[float], protocol: int = 2) -> bytes:
    """A batch in the official layout: a dict with bytes keys (the real ones come from Python 2)."""
    batch = {
        b"batch_label": b"fake batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [f"img{i}.png".encode() for i in range(len(labels))],
    }
    return pickle.dumps(batch, protocol=protocol)


def fake_batches(protocol: int = 2, n: int = 3) -> dict[str, tuple[np.ndarray, list[int], bytes]]:
    rng = np.random.default_rng(0)
    out = {}
    for name in NAMES:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        out[name] = (data, labels, batch_bytes(data, labels, protocol))
    return out


def write_folder(folder: Path, batches: dict) -> Path:
    folder.mkdir(parents=True)
    for name, (_, _, raw) in batches.items():
        (folder / name).write_bytes(raw)
    return folder


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


class Hostile:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFACBENCH_DATA", raising=False)


def check_arrays(got: tuple, batches: dict) -> None:
    train_x, train_y, test_x, test_y = got
    assert train_x.shape == (15, 3, 32, 32) and train_x.dtype == np.uint8
    assert test_x.shape == (3, 3, 32, 32) and test_y.dtype == np.int64
    expected = np.concatenate([batches[n][0] for n in NAMES[:5]])
    # Official layout: 1024 red, 1024 green, 1024 blue values, each image row-major.
    k, c, r, q = 7, 2, 5, 30
    assert train_x[k, c, r, q] == expected[k, c * 1024 + r * 32 + q]
    np.testing.assert_array_equal(train_x.reshape(15, -1), expected)
    np.testing.assert_array_equal(train_y, np.concatenate([batches[n][1] for n in NAMES[:5]]))
    np.testing.assert_array_equal(test_y, batches["test_batch"][1])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_folder(tmp_path: Path, protocol: int) -> None:
    batches = fake_batches(protocol)
    write_folder(tmp_path / "cifar10" / "cifar-10-batches-py", batches)
    check_arrays(load_cifar10_arrays(tmp_path), batches)


def test_batches_directly_in_data_dir(tmp_path: Path) -> None:
    batches = fake_batches()
    folder = write_folder(tmp_path / "batches", batches)
    check_arrays(load_cifar10_arrays(folder), batches)


def test_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = fake_batches()
    write_archive(tmp_path / "cifar-10-python.tar.gz", {n: b[2] for n, b in batches.items()})
    monkeypatch.setenv("KFACBENCH_DATA", str(tmp_path))
    check_arrays(load_cifar10_arrays(None, verify_md5=False), batches)


def test_archive_md5(tmp_path: Path) -> None:
    path = write_archive(
        tmp_path / "cifar-10-python.tar.gz", {n: b[2] for n, b in fake_batches().items()}
    )
    with pytest.raises(DataError, match="expected c58f30108f718f92721af3b95e74349a") as err:
        load_cifar10_arrays(tmp_path)
    assert str(path) in str(err.value)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar10_arrays(tmp_path)
    msg = str(err.value)
    assert msg.startswith("CIFAR-10 batch cifar-10-batches-py/data_batch_1 not found in ")
    assert str(tmp_path / "cifar10") in msg and "cifar-10-python.tar.gz" in msg


def test_missing_batch_in_folder(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "cifar-10-batches-py", fake_batches())
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError) as err:
        load_cifar10_arrays(tmp_path)
    assert f"data_batch_4 not found in {folder} " in str(err.value)


def test_missing_archive_member(tmp_path: Path) -> None:
    members = {n: b[2] for n, b in fake_batches().items() if n != "test_batch"}
    write_archive(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match="lacks member cifar-10-batches-py/test_batch"):
        load_cifar10_arrays(tmp_path, verify_md5=False)


def bad_batches(tmp_path: Path) -> dict[str, bytes]:
    """Each kind of broken batch, as the bytes of data_batch_3."""
    good = fake_batches()["data_batch_3"]
    return {
        "not a pickle": b"this is not a pickle",
        "truncated": good[2][: len(good[2]) // 2],
        "wrong shape": batch_bytes(np.zeros((3, 3000), np.uint8), [0, 1, 2]),
        "wrong dtype": batch_bytes(np.zeros((3, 3072), np.float32), [0, 1, 2]),
        "label count": batch_bytes(good[0], [0, 1]),
        "label range": batch_bytes(good[0], [0, 1, 10]),
        "label type": batch_bytes(good[0], [0, 1.5, 2]),
        "not a dict": pickle.dumps([1, 2, 3], protocol=2),
        "hostile": pickle.dumps({b"data": Hostile(tmp_path / "pwned")}, protocol=2),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "not a pickle",
        "truncated",
        "wrong shape",
        "wrong dtype",
        "label count",
        "label range",
        "label type",
        "not a dict",
        "hostile",
    ],
)
def test_bad_batch_in_folder(tmp_path: Path, kind: str) -> None:
    folder = write_folder(tmp_path / "cifar-10-batches-py", fake_batches())
    (folder / "data_batch_3").write_bytes(bad_batches(tmp_path)[kind])
    with pytest.raises(DataError) as err:
        load_cifar10_arrays(tmp_path)
    assert f"CIFAR-10 batch {folder / 'data_batch_3'} " in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_hostile_pickle_in_archive(tmp_path: Path) -> None:
    members = {n: b[2] for n, b in fake_batches().items()}
    members["test_batch"] = pickle.dumps(Hostile(tmp_path / "pwned"))
    path = write_archive(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(DataError, match=r"refusing to load global posix\.system") as err:
        load_cifar10_arrays(tmp_path, verify_md5=False)
    assert f"{path}:cifar-10-batches-py/test_batch" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_truncated_archive(tmp_path: Path) -> None:
    path = write_archive(
        tmp_path / "cifar-10-python.tar.gz", {n: b[2] for n, b in fake_batches(n=50).items()}
    )
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="truncated or corrupt near member") as err:
        load_cifar10_arrays(tmp_path, verify_md5=False)
    assert str(path) in str(err.value)


def test_splits_standardised_per_channel(tmp_path: Path) -> None:
    batches = fake_batches(n=20)
    write_folder(tmp_path / "cifar-10-batches-py", batches)
    data = cifar10_splits(tmp_path)
    assert data.train_x.shape == (100, 3, 32, 32) and data.train_x.dtype == torch.float32
    assert data.test_x.shape == (20, 3, 32, 32) and data.test_y.dtype == torch.int64
    torch.testing.assert_close(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(data.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert data.source == "real:cifar10"
