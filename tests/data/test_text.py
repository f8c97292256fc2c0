"""The standard-library text corpus: which files, the fixed split by file, byte windows."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest
import torch

from kfacbench.data.text import (
    TEST_BYTE,
    corpus_files,
    is_test_file,
    python_stdlib_splits,
    stdlib_dir,
    windows,
)
from kfacbench.errors import KfacbenchError


def fake_stdlib(root: Path, n: int = 60) -> dict[str, bytes]:
    """A stdlib-like tree: modules, a package, and directories the corpus leaves out."""
    files = {f"mod{i:02d}.py": f"def f{i}():\n    return {i}\n".encode() for i in range(n)}
    files["pkg/__init__.py"] = b"x = 1\n"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text)
    for skipped in ("site-packages/third.py", "test/test_x.py", "pkg/tests/t.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"not in the corpus\n")
    (root / "notes.txt").write_bytes(b"not python\n")
    return files


def test_corpus_files_are_sorted_and_leave_out_third_party_and_tests(tmp_path: Path) -> None:
    files = fake_stdlib(tmp_path)
    got = [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)]
    assert got == sorted(files)


def test_the_split_is_by_file_and_fixed_by_the_path_hash() -> None:
    for rel in ("os.py", "json/decoder.py", "email/mime/text.py"):
        want = hashlib.sha256(rel.encode()).digest()[0] < TEST_BYTE
        assert is_test_file(rel) is want
    share = sum(is_test_file(f"m{i}.py") for i in range(5000)) / 5000
    assert abs(share - TEST_BYTE / 256) < 0.02


def test_windows_pair_each_byte_with_the_next() -> None:
    stream = bytes(range(23))
    x, y = windows(stream, 5)
    assert x.dtype == torch.uint8 and x.shape == y.shape == (4, 5)  # (23 - 1) // 5 windows
    assert x[1].tolist() == [5, 6, 7, 8, 9] and y[1].tolist() == [6, 7, 8, 9, 10]
    assert torch.equal(x[1:, 0], y[:-1, -1])  # non-overlapping: window i+1 starts where i ended


def test_splits_record_version_counts_and_checksum(tmp_path: Path) -> None:
    files = fake_stdlib(tmp_path)
    splits = python_stdlib_splits(8, tmp_path)
    test_bytes = sum(len(t) + 2 for rel, t in files.items() if is_test_file(rel))
    total = sum(len(t) + 2 for t in files.values())
    assert splits.source.startswith(f"real:python-stdlib-{platform.python_version()}(")
    assert f"files={len(files)}," in splits.source and f"bytes={total}," in splits.source
    assert f"test={test_bytes}," in splits.source
    assert splits.train_x.shape[1] == 8 and splits.test_x.shape[0] == (test_bytes - 1) // 8
    again = python_stdlib_splits(8, tmp_path)
    assert again.source == splits.source and torch.equal(again.train_y, splits.train_y)
    (tmp_path / "mod00.py").write_bytes(b"changed\n")
    assert python_stdlib_splits(8, tmp_path).source != splits.source  # the checksum moved


def test_a_missing_corpus_is_a_one_line_error_naming_the_directory(tmp_path: Path) -> None:
    with pytest.raises(KfacbenchError, match=rf"no Python standard-library source .* {tmp_path}"):
        python_stdlib_splits(8, tmp_path / "absent")


def test_this_pythons_standard_library_is_a_corpus_of_megabytes() -> None:
    splits = python_stdlib_splits(128, stdlib_dir())
    n_train, n_test = splits.train_x.shape[0], splits.test_x.shape[0]
    assert n_train * 128 > 5_000_000 and 0.04 < n_test / (n_train + n_test) < 0.2
