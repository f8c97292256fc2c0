"""A byte-level text corpus that every machine has offline: the Python standard library's source.

The language-model workload needs real text without a download. Every CPython installation
ships its standard library as ``.py`` source, so the corpus is the concatenation of those files
(``sysconfig.get_paths()["stdlib"]``), sorted by relative path, each followed by a blank line.
Left out: ``site-packages``/``dist-packages`` (third-party code, different on every machine) and
the test suites (``test``, ``tests``, ``idle_test`` directories: CPython's own regression tests,
about half of the bytes, and not installed by every distribution).

The corpus changes with the Python version, so :attr:`~kfacbench.data.Splits.source` records the
version, the file and byte counts and a SHA-256 of the bytes: results from two machines are
comparable only when their sources agree.

Split: a file is a test file when the first byte of the SHA-256 of its relative path is below
:data:`TEST_BYTE` (about 10% of the files): fixed, independent of which other files exist, and
whole files never straddle the split. Examples are non-overlapping windows of ``context + 1``
bytes; the input is the first ``context`` bytes and the target the last ``context`` (next-byte
prediction at every position). Bytes are stored as uint8 (the model and the loss widen them).
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path

import torch

from kfacbench.data import Splits
from kfacbench.errors import KfacbenchError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
"""Directories of the standard library tree whose files are not part of the corpus."""
TEST_BYTE = 26
"""Files whose path hash starts with a byte below this (26/256 ≈ 10%) form the test split."""
VOCAB = 256
"""Byte-level vocabulary."""


def stdlib_dir() -> Path:
    """The running Python's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """The corpus's ``.py`` files under ``root``, sorted by relative path."""
    files = [
        p
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_test_file(relative: str) -> bool:
    """Whether the file at ``relative`` (a POSIX path) belongs to the test split."""
    return hashlib.sha256(relative.encode()).digest()[0] < TEST_BYTE


def windows(stream: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, ``(n, context)`` uint8 each, from non-overlapping windows of
    ``context + 1`` bytes (the trailing partial window is dropped)."""
    n = (len(stream) - 1) // context
    data = torch.frombuffer(bytearray(stream[: n * context + 1]), dtype=torch.uint8)
    starts = torch.arange(n) * context
    idx = starts[:, None] + torch.arange(context + 1)
    rows = data[idx]
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def python_stdlib_splits(context: int, root: Path | None = None) -> Splits:
    """The standard-library corpus as byte windows (module docstring).

    Args:
        context: bytes per example (the model's context length).
        root: the standard library directory (default: this Python's).

    Raises:
        KfacbenchError: no corpus files under ``root``; the message says how to get them.
    """
    root = root or stdlib_dir()
    files = corpus_files(root) if root.is_dir() else []
    if not files:
        raise KfacbenchError(
            f"text corpus: no Python standard-library source (*.py) under {root}; it ships with"
            " CPython (on Debian/Ubuntu: apt install libpython3-stdlib), or run the workload"
            " with data = 'synthetic'"
        )
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    digest = hashlib.sha256()
    for path in files:
        text = path.read_bytes() + b"\n\n"
        digest.update(text)
        parts[is_test_file(path.relative_to(root).as_posix())].append(text)
    train, test = b"".join(parts[False]), b"".join(parts[True])
    train_x, train_y = windows(train, context)
    test_x, test_y = windows(test, context)
    source = (
        f"real:python-stdlib-{platform.python_version()}(files={len(files)},"
        f" bytes={len(train) + len(test)}, train={len(train)}, test={len(test)},"
        f" sha256={digest.hexdigest()[:16]})"
    )
    return Splits(train_x, train_y, test_x, test_y, source)
