"""Where data files are looked for, how they are checked, and how derived data is cached.

Real data sets are never downloaded: machines running the suite are often offline, and a silent
download in the middle of a timed sweep would be a surprise. Instead each reader looks through a
short, predictable list of folders (:func:`search_dirs`) and, when a file is missing, says which
folders it searched and where to get the file.

Generated or derived data (CURVES, FACES) is expensive enough to build that it is cached as a
``torch.save`` file. Caches are written atomically and a cache that cannot be read is rebuilt, so
an interrupted run never leaves a cache that breaks the next one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from kfacbench.errors import DataError

DATA_ENV = "KFACBENCH_DATA"
"""Environment variable naming a folder of real data files (searched after ``--data-dir``)."""

CACHE_ENV = "KFACBENCH_CACHE"
"""Environment variable naming the cache folder for generated/derived data."""


def default_cache_dir() -> Path:
    """The cache folder: ``$KFACBENCH_CACHE`` if set, else ``~/.cache/kfacbench``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "kfacbench"


def search_dirs(data_dir: Path | None, dataset: str, extra: Sequence[Path] = ()) -> list[Path]:
    """Folders to look in for ``dataset``'s files, most specific first.

    The order is ``data_dir``, ``data_dir/dataset``, ``$KFACBENCH_DATA``,
    ``$KFACBENCH_DATA/dataset``, then ``extra`` (e.g. a distribution package's folder), so a
    user's explicit choice always wins over the environment and system-wide copies.

    Args:
        data_dir: the folder the user gave (``--data-dir``), or None.
        dataset: sub-folder name conventionally holding this data set (``"mnist"``, ...).
        extra: further folders, searched last.

    Returns:
        The folders in search order, without duplicates; folders need not exist.
    """
    dirs: list[Path] = []
    env = os.environ.get(DATA_ENV)
    for base in (data_dir, Path(env) if env else None):
        if base is not None:
            dirs += [base, base / dataset]
    dirs += extra
    return list(dict.fromkeys(dirs))


def find_file(names: Sequence[str], dirs: Sequence[Path], *, what: str, how_to_get: str) -> Path:
    """The first existing file among ``names`` in ``dirs`` (all names in a folder before the next).

    Args:
        names: accepted file names (relative paths), in order of preference.
        dirs: folders to search, in order.
        what: what the file is, for the error message (e.g. ``"MNIST file"``).
        how_to_get: where to get it, for the error message.

    Raises:
        DataError: no such file; the message names the first name, every folder searched and
            ``how_to_get``.
    """
    for folder in dirs:
        for name in names:
            path = folder / name
            if path.is_file():
                return path
    searched = ", ".join(str(d) for d in dirs) or "(no folder: none given)"
    raise DataError(f"{what} {names[0]} not found in {searched} ({how_to_get})")


def md5sum(path: Path) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks so large archives need no memory."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` to ``path`` so that readers see either the old file or the whole new one.

    The data are written to a temporary file in the same folder (same file system, so the final
    ``os.replace`` is atomic) and the temporary file is removed if anything fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(tensors, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors saved at ``path``, or None when there is no usable cache there.

    A file that cannot be loaded (truncated, corrupt, written by something else) is treated like
    a missing one: the caller rebuilds and overwrites it. Loading uses ``weights_only=True``, so a
    planted cache file cannot run code.
    """
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # any unreadable cache is simply rebuilt
        return None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        return None
    return data
