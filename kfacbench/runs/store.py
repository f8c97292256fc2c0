"""Writing a run directory: atomic writes, resume bookkeeping, the run's manifest.

A run directory (``results/runs/<suite>/<timestamp>/``) holds

- ``cells.parquet``, ``curves.parquet``, ``phases.parquet``: the long-format tables of
  DESIGN.md, rebuilt after every finished cell;
- ``parts/<cell-id>.{curves,phases,cells}.parquet``: one set per finished cell, the source of truth.
  The cell's row is written last, so its presence marks the cell finished; a run killed mid-cell
  leaves no row and ``--resume`` reruns exactly that cell;
- ``suite.toml`` (the suite as run) and ``env.json`` (device, driver, CUDA, torch, versions,
  commit, host: :func:`kfacbench.runs.environment.environment`).

The tables' columns are defined in :mod:`kfacbench.runs.schema`.

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a crash) never sees half a file; temporary files left by a killed writer are removed
when the run is resumed. Files get the permissions the umask allows (``mkstemp`` alone would
make them private to their owner, unreadable by a group sharing a cluster filesystem).

The consolidated tables can never lose a row for good: they are rebuilt whenever they disagree
with ``parts/`` (a kill while they were being written), when a run is resumed and when a run
directory is read (:meth:`RunStore.reconcile`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from kfacbench.errors import KfacbenchError
from kfacbench.runs.schema import CELL_COLUMNS, TABLES

TMP_SUFFIX = ".tmp"


class DamagedPartError(KfacbenchError):
    """A file under ``parts/`` cannot be read: that cell's stored results are lost."""

    def __init__(self, message: str, cell_id: str) -> None:
        super().__init__(message)
        self.cell_id = cell_id


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (all or nothing)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(path, write)


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as parquet, atomically, with a CRC checksum per page: parquet has none
    by default, and flipped bytes in a data page would be read back as other values without an
    error (:func:`kfacbench.runs.rundir.read_table` verifies the checksums)."""
    _atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False, write_page_checksum=True))


def cells_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows of the ``cells`` table with its column order and nullable integer columns."""
    frame = pd.DataFrame(list(rows), columns=list(CELL_COLUMNS))
    return frame.astype(
        {
            "inv_interval": "Int64",
            "steps": "Int64",
            "graphed_steps": "Int64",
            "graphs_captured": "Int64",
            "world_size": "Int64",
            "torch_threads": "Int64",
            "cpus": "Int64",
            "busy": "boolean",
        }
    )


def fresh_dir(parent: Path) -> Path:
    """A new, empty directory ``parent/<UTC timestamp>`` (``-2``, ``-3``, ... when taken)."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    path = parent / stamp
    n = 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = parent / f"{stamp}-{n}"


class RunStore:
    """The result directory of one run of a suite.

    Args:
        run_dir: the directory (created if missing).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.parts = self.run_dir / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self._loaded: dict[Path, pd.DataFrame] = {}  # parts read once, not once per cell

    @classmethod
    def new(cls, root: Path, suite: str) -> RunStore:
        """A fresh run directory ``root/<suite>/<UTC timestamp>``."""
        return cls(fresh_dir(root / suite))

    def remove_stale_files(self) -> int:
        """Delete temporary files a killed writer left behind; return how many. Only the run's
        writer may call this, before it writes: a reader could delete a live writer's file."""
        stale = [*self.run_dir.glob(f".*{TMP_SUFFIX}"), *self.parts.glob(f".*{TMP_SUFFIX}")]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    def finished_ids(self) -> set[str]:
        """Ids of the cells whose results are complete."""
        return {p.name.removesuffix(".cells.parquet") for p in self.parts.glob("*.cells.parquet")}

    def write_cell(
        self,
        cell_row: Mapping[str, Any],
        curves: Iterable[Mapping[str, Any]],
        phases: Iterable[Mapping[str, Any]],
    ) -> None:
        """Store one finished cell (curves and phases first, its row last) and rebuild tables.

        If any part cannot be written, the cell's parts are removed again, so a failed write
        leaves the cell unfinished (``--resume`` reruns it) rather than half stored.
        """
        cell_id = str(cell_row["cell_id"])
        try:
            for name, rows in (("curves", curves), ("phases", phases)):
                frame = pd.DataFrame([{"cell_id": cell_id, **r} for r in rows])
                atomic_write_parquet(self.parts / f"{cell_id}.{name}.parquet", frame)
            atomic_write_parquet(self.parts / f"{cell_id}.cells.parquet", cells_frame([cell_row]))
        except BaseException:
            self.discard(cell_id)
            raise
        finally:
            for name in TABLES:
                self._loaded.pop(self.parts / f"{cell_id}.{name}.parquet", None)
        self.consolidate()

    def discard(self, cell_id: str) -> None:
        """Remove a cell's parts (its row first, so it is never finished without its curves)."""
        for name in ("cells", "curves", "phases"):
            (self.parts / f"{cell_id}.{name}.parquet").unlink(missing_ok=True)

    def consolidate(self) -> None:
        """Rebuild ``cells``, ``curves`` and ``phases`` parquet files from finished parts.

        The cells table is written last: :meth:`in_sync` compares it with ``parts/``, so a kill
        while the tables are written is seen as a disagreement and repaired.
        """
        done = sorted(self.finished_ids())
        for name in ("curves", "phases", "cells"):
            frames = [self._part(self.parts / f"{cid}.{name}.parquet") for cid in done]
            frames = [f for f in frames if not f.empty]
            if name == "cells":
                table = cells_frame(
                    {str(k): v for k, v in r.items()} for f in frames for r in f.to_dict("records")
                )
            else:
                table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            atomic_write_parquet(self.run_dir / f"{name}.parquet", table)

    def in_sync(self) -> bool:
        """Whether the consolidated tables hold exactly the finished cells of ``parts/``: all
        three are readable parquet files and the cells table's ids are the finished ids (it is
        written last, so a kill while the tables were written shows up there)."""
        done = self.finished_ids()
        if not done and not (self.run_dir / "cells.parquet").exists():
            return True  # nothing finished, nothing written yet
        try:
            for name in ("curves", "phases"):
                pq.read_metadata(self.run_dir / f"{name}.parquet")
            ids = pd.read_parquet(self.run_dir / "cells.parquet", columns=["cell_id"])["cell_id"]
        except Exception:  # missing or damaged: rebuild
            return False
        return len(ids) == ids.nunique() and set(ids.astype(str)) == done

    def reconcile(self, set_aside: Callable[[str, str], None] | None = None) -> bool:
        """Rebuild the tables if they disagree with ``parts/``; return whether it did.

        Args:
            set_aside: for the run's writer: when a part is damaged, move that cell's parts
                aside (:meth:`set_aside`, so it runs again) and call ``set_aside(cell_id,
                message)``. Without it a damaged part raises :class:`DamagedPartError`.
        """
        if self.in_sync():
            return False
        while True:
            try:
                self.consolidate()
                return True
            except DamagedPartError as exc:
                if set_aside is None:
                    raise
                self.set_aside(exc.cell_id)
                set_aside(exc.cell_id, str(exc))

    def _part(self, path: Path) -> pd.DataFrame:
        if path not in self._loaded:
            try:
                self._loaded[path] = pd.read_parquet(path) if path.exists() else pd.DataFrame()
            except Exception as exc:  # pyarrow raises a dozen types for a damaged file
                reason = " ".join(str(exc).split())[:200]
                raise DamagedPartError(
                    f"{path}: damaged ({type(exc).__name__}: {reason}); `kfacbench run SUITE"
                    f" --resume {self.run_dir}` sets the cell aside and runs it again",
                    path.name.split(".", 1)[0],
                ) from None
        return self._loaded[path]

    def set_aside(self, cell_id: str, why: str = "damaged") -> Path:
        """Move a cell's parts to ``parts/<why>/`` (kept for inspection, no longer finished),
        so ``--resume`` runs the cell again; return the folder. The tables are rebuilt without
        the cell the next time a cell is written or the run is reconciled."""
        aside = self.parts / why
        aside.mkdir(exist_ok=True)
        for name in ("cells", "curves", "phases"):  # the row first: never finished without curves
            path = self.parts / f"{cell_id}.{name}.parquet"
            if path.exists():
                os.replace(path, aside / path.name)
            self._loaded.pop(path, None)
        return aside

    def write_text(self, name: str, text: str) -> None:
        """Write a small text file (``suite.toml``, ``env.json``) into the run dir."""
        atomic_write_bytes(self.run_dir / name, text.encode())


def settings_of(labels: pd.Series) -> pd.Series:
    """Cell labels without their ``seed=N``: the setting that repeats over seeds."""
    return labels.str.replace(r" seed=\d+$", "", regex=True)


def new_manifest(command: str, env: Mapping[str, Any]) -> dict[str, Any]:
    """A run's ``manifest.json``: the command, the commit it ran at (``dirty``: with
    uncommitted changes, so the commit alone does not make the run again) and the machine."""
    commit = env.get("git_commit")
    return {
        "command": command,
        "commit": commit,
        "dirty": bool(commit and str(commit).endswith("-dirty")),
        "machine": {
            key: env.get(key)
            for key in ("device_kind", "device_name", "cpu_count", "torch_version", "platform")
        },
        "created_at": env.get("created_at"),
    }


def dumps(obj: Any) -> str:
    """Stable JSON (sorted keys) for hyperparameter and config columns."""
    return json.dumps(obj, sort_keys=True, default=str)
