"""Reading a run directory: schema-checked tables and metadata; every damage is a one-line error.

The commands that read runs (``show``, ``report``, ``compare``, ``regress``) get their tables
here, never from ``pd.read_parquet`` directly. A file can be missing, truncated, emptied, have
flipped bytes or lack a column (a table written by another kfacbench version, or edited by
hand); pandas and pyarrow then raise a dozen exception types from deep inside, or return a
frame that crashes the command later. Here each of those becomes a :class:`RunDirError` naming
the file and what is wrong with it, raised before the command uses the table.

Each caller names the columns it uses (``required``): a table is valid for a command when those
columns are there and hold the right kind of value (:data:`KINDS`), whatever else it holds.
Flipped bytes inside the data are caught by the pages' CRC checksums, which
:func:`kfacbench.runs.store.atomic_write_parquet` writes and :func:`read_table` verifies (files
written before checksums existed are read without that check). Before the tables are read, those
that disagree with the run's ``parts/`` (a kill while they were written) are rebuilt from them
(:meth:`kfacbench.runs.store.RunStore.reconcile`), so a reader never sees a table one cell short.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from pandas.api.types import infer_dtype, is_numeric_dtype

from kfacbench.errors import RunDirError
from kfacbench.runs.schema import KINDS, ROW_KEYS, TABLES, Kind
from kfacbench.runs.store import RunStore

_DAMAGED = "damaged, or written by another kfacbench version"

# What pandas and pyarrow raise for a file that is not a readable parquet table (found by
# truncating and flipping bytes at every offset of real tables): pyarrow's own errors
# (ArrowInvalid, a ValueError, for a bad footer, size or checksum), OSError for undecodable
# thrift metadata, and ValueError (UnicodeDecodeError, JSONDecodeError), KeyError and TypeError
# from pandas parsing a damaged schema of its own.
_UNREADABLE = (pa.ArrowException, OSError, ValueError, KeyError, TypeError)


def _reason(exc: BaseException) -> str:
    """The first line of a reader's exception, without the file name pyarrow repeats."""
    lines = str(exc).strip().splitlines()
    line = (lines[0] if lines else type(exc).__name__).strip()
    if line.startswith("Could not open Parquet input source"):
        line = line.split(": ", 1)[-1]
    return line.split(". ", 1)[0].removesuffix(".")


def read_table(path: Path, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read one parquet table and check that it has the ``required`` columns, of their kind.

    A zero-row table without columns is what the store writes for ``curves`` and ``phases`` when
    no finished cell has rows; it is valid and comes back as an empty frame with the required
    columns, so callers need no special case for it.

    Args:
        path: the ``.parquet`` file.
        required: the columns the caller uses.

    Raises:
        RunDirError: the file is missing, unreadable (empty, truncated, corrupted), or lacks a
            required column or holds the wrong kind of value in one.
    """
    path = Path(path)
    if not path.is_file():
        what = "not a file" if path.exists() else "missing (not a kfacbench run directory?)"
        raise RunDirError(f"{path}: {what}")
    try:
        frame = pd.read_parquet(path, page_checksum_verification=True)
    except _UNREADABLE as exc:
        raise RunDirError(
            f"{path}: not a readable parquet table (truncated or corrupted: {_reason(exc)})"
        ) from None
    if frame.empty and len(frame.columns) == 0:
        return pd.DataFrame(columns=list(required))
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise RunDirError(f"{path}: missing column(s) {', '.join(missing)} ({_DAMAGED})")
    for column in required:
        kind = KINDS.get(column)
        if kind is not None and not _holds(frame[column], kind):
            raise RunDirError(f"{path}: column {column} does not hold {kind} values ({_DAMAGED})")
    return frame


def _holds(values: pd.Series, kind: Kind) -> bool:
    """Whether a column holds values of ``kind`` (an all-missing column holds any kind)."""
    if values.isna().all():
        return True
    if kind == "number":
        return is_numeric_dtype(values)
    if infer_dtype(values, skipna=True) != "string":
        return False
    if kind == "json object":
        return all(_json_object(v) for v in values.dropna())
    return True


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def load_tables(
    run_dir: Path, required: Mapping[str, Sequence[str]] | None = None
) -> dict[str, pd.DataFrame]:
    """The ``cells``, ``curves`` and ``phases`` tables of a run directory, checked.

    Args:
        run_dir: the run directory.
        required: the tables to read, each with the columns the caller uses (see
            :func:`read_table`); by default all three, with no column required.

    Returns:
        The tables read, by name.

    Raises:
        RunDirError: no such directory, a damaged table (:func:`read_table`), a ``cells`` table
            without rows (nothing finished yet) or a table with a repeated row key.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    if (run_dir / "parts").is_dir():  # tables that disagree with the parts are rebuilt first
        with contextlib.suppress(OSError):  # a read-only run is read as it is
            RunStore(run_dir).reconcile()
    if required is None:
        required = dict.fromkeys(TABLES, ())
    tables = {}
    for name, columns in required.items():
        path = run_dir / f"{name}.parquet"
        table = read_table(path, columns)
        key = list(ROW_KEYS.get(name, ()))
        if key and set(key) <= set(table.columns) and table.duplicated(key).any():
            first = table[table.duplicated(key)].iloc[0]
            rows = ", ".join(f"{k}={first[k]}" for k in key)
            raise RunDirError(f"{path}: repeated rows for {rows} ({_DAMAGED})")
        tables[name] = table
    if "cells" in tables and tables["cells"].empty:
        raise RunDirError(f"{run_dir / 'cells.parquet'}: no finished cells yet")
    return tables


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        RunDirError: the file is unreadable, not JSON, or not a JSON object (``what`` says what
            it should hold).
    """
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RunDirError(
            f"{path}: not readable JSON (truncated or corrupted: {_reason(exc)})"
        ) from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: not a JSON object of {what} ({_DAMAGED})")
    return value


def read_env(run_dir: Path) -> dict[str, Any]:
    """The run's ``env.json`` (device, versions, host: see
    :func:`kfacbench.runs.environment.environment`).

    Raises:
        RunDirError: the file is missing, unreadable, not JSON, or not a JSON object.
    """
    path = Path(run_dir) / "env.json"
    if not path.is_file():
        raise RunDirError(f"{path}: missing (not a kfacbench run directory?)")
    return _read_json_object(path, "environment facts")


def read_manifest(path: Path) -> dict[str, Any]:
    """A run's ``manifest.json`` (:func:`kfacbench.runs.store.new_manifest`).

    Raises:
        RunDirError: the file is unreadable, not a JSON object, or has no ``command``.
    """
    manifest = _read_json_object(path, "the command, commit and machine of a run")
    if "command" not in manifest:
        raise RunDirError(f"{path}: not a kfacbench manifest (no 'command' key)")
    return manifest


def amortized_step_ms(cells: pd.DataFrame) -> pd.Series:
    """Per cell, its step cost: training time / steps in ms, every refresh of a second-order
    method included (NaN for a cell that took no step). The number methods are compared by: a
    median step hides what the refreshes cost."""
    steps = cells["steps"].astype(float).where(cells["steps"] > 0)
    return cells["train_time_s"] / steps * 1e3
