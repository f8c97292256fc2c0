"""Search folders, missing-file messages, checksums and atomic caches."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from kfacbench.data.files import (
    default_cache_dir,
    find_file,
    load_cached,
    md5sum,
    save_tensors_atomic,
    search_dirs,
)
from kfacbench.errors import DataError


def test_search_dirs_order_and_dedup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = tmp_path / "env"
    monkeypatch.setenv("KFACBENCH_DATA", str(env))
    got = search_dirs(tmp_path, "mnist", [Path("/x"), tmp_path])
    assert got == [tmp_path, tmp_path / "mnist", env, env / "mnist", Path("/x")]


def test_search_dirs_skips_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KFACBENCH_DATA", raising=False)
    assert search_dirs(None, "mnist") == []
    assert search_dirs(None, "mnist", [Path("/x")]) == [Path("/x")]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KFACBENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KFACBENCH_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "kfacbench"


def test_find_file_prefers_earlier_folder(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "y").write_bytes(b"")
    (b / "x").write_bytes(b"")
    # Every name is tried in a folder before moving to the next folder.
    assert find_file(["x", "y"], [a, b], what="f", how_to_get="h") == a / "y"
    assert find_file(["x", "y"], [b, a], what="f", how_to_get="h") == b / "x"


def test_find_file_message(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        find_file(["a.gz", "a"], [tmp_path, tmp_path / "sub"], what="MNIST file", how_to_get="HOW")
    msg = str(err.value)
    assert msg == f"MNIST file a.gz not found in {tmp_path}, {tmp_path / 'sub'} (HOW)"
    assert "\n" not in msg


def test_md5sum_streams_large_file(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # > 1 MiB block
    path = tmp_path / "f"
    path.write_bytes(data)
    assert md5sum(path) == hashlib.md5(data).hexdigest()


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.pt"
    tensors = {"a": torch.arange(5.0), "b": torch.ones(2, 3)}
    save_tensors_atomic(path, tensors)
    got = load_cached(path)
    assert got is not None and got.keys() == tensors.keys()
    torch.testing.assert_close(got["a"], tensors["a"])
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]  # no temporary file left


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04truncated zip"])
def test_corrupt_cache_is_absent(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "c.pt"
    path.write_bytes(content)
    assert load_cached(path) is None
    assert load_cached(tmp_path / "missing.pt") is None


def test_cache_of_wrong_type_is_absent(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save([torch.ones(1)], path)
    assert load_cached(path) is None


def test_failed_save_leaves_old_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_tensors_atomic(path, {"a": torch.ones(1)})

    def broken_save(obj: object, f: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_tensors_atomic(path, {"a": torch.zeros(1)})
    monkeypatch.undo()
    got = load_cached(path)
    assert got is not None and got["a"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
