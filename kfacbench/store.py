"""Result tables of a run: atomic writes, resume bookkeeping, environment metadata.

A run directory (``results/runs/<suite>/<timestamp>/``) holds

- ``cells.parquet``, ``curves.parquet``, ``phases.parquet``: the long-format tables of
  DESIGN.md, rebuilt after every finished cell;
- ``parts/<cell-id>.{curves,phases,cells}.parquet``: one set per finished cell, the source of truth.
  The cell's row is written last, so its presence marks the cell finished; a run killed mid-cell
  leaves no row and ``--resume`` reruns exactly that cell;
- ``suite.toml`` (the suite as run) and ``env.json`` (device, driver, CUDA, torch, versions,
  commit, host).

Every file is written to a temporary name in the same directory and renamed into place, so a
reader (or a crash) never sees half a file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import socket
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import kfacbench

TABLES = ("cells", "curves", "phases")

CELL_COLUMNS = (
    "cell_id", "suite", "label", "workload", "optimizer", "batch_size", "inv_interval", "seed",
    "hparams", "config", "method_info", "data_mode", "data_source", "status", "error", "steps",
    "train_time_s", "time_to_target_s", "metric", "target", "final_train_loss", "final_eval_loss",
    "final_eval_metric", "median_step_ms", "timer_overhead_ms", "timer_overhead_ratio",
    "peak_mem_mb", "device_kind", "device_name", "world_size", "backend", "tf32", "amp",
    "torch_version", "kfacbench_version", "git_commit", "host", "started_at", "finished_at",
)  # fmt: skip
"""Columns of the ``cells`` table, in order."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename (all or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as parquet, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cells_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows of the ``cells`` table with its column order and nullable integer columns."""
    frame = pd.DataFrame(list(rows), columns=list(CELL_COLUMNS))
    return frame.astype({"inv_interval": "Int64", "steps": "Int64", "world_size": "Int64"})


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

    def finished_ids(self) -> set[str]:
        """Ids of the cells whose results are complete."""
        return {p.name.removesuffix(".cells.parquet") for p in self.parts.glob("*.cells.parquet")}

    def write_cell(
        self,
        cell_row: Mapping[str, Any],
        curves: Iterable[Mapping[str, Any]],
        phases: Iterable[Mapping[str, Any]],
    ) -> None:
        """Store one finished cell (curves and phases first, its row last) and rebuild tables."""
        cell_id = str(cell_row["cell_id"])
        for name in TABLES:
            self._loaded.pop(self.parts / f"{cell_id}.{name}.parquet", None)
        for name, rows in (("curves", curves), ("phases", phases)):
            frame = pd.DataFrame([{"cell_id": cell_id, **r} for r in rows])
            atomic_write_parquet(self.parts / f"{cell_id}.{name}.parquet", frame)
        atomic_write_parquet(self.parts / f"{cell_id}.cells.parquet", cells_frame([cell_row]))
        self.consolidate()

    def consolidate(self) -> None:
        """Rebuild ``cells``, ``curves`` and ``phases`` parquet files from finished parts."""
        done = sorted(self.finished_ids())
        for name in TABLES:
            frames = [self._part(self.parts / f"{cid}.{name}.parquet") for cid in done]
            frames = [f for f in frames if not f.empty]
            if name == "cells":
                table = cells_frame(
                    {str(k): v for k, v in r.items()} for f in frames for r in f.to_dict("records")
                )
            else:
                table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
            atomic_write_parquet(self.run_dir / f"{name}.parquet", table)

    def _part(self, path: Path) -> pd.DataFrame:
        if path not in self._loaded:
            self._loaded[path] = pd.read_parquet(path) if path.exists() else pd.DataFrame()
        return self._loaded[path]

    def write_text(self, name: str, text: str) -> None:
        """Write a small text file (``suite.toml``, ``env.json``) into the run dir."""
        atomic_write_bytes(self.run_dir / name, text.encode())


def settings_of(labels: pd.Series) -> pd.Series:
    """Cell labels without their ``seed=N``: the setting that repeats over seeds."""
    return labels.str.replace(r" seed=\d+$", "", regex=True)


def load_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The ``cells``, ``curves`` and ``phases`` tables of a run directory."""
    run_dir = Path(run_dir)
    missing = [n for n in TABLES if not (run_dir / f"{n}.parquet").exists()]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: not a kfacbench run directory (missing {', '.join(missing)}.parquet)"
        )
    return {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in TABLES}


def _command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    """First line of a helper command's output, or ``None`` if it is absent or fails."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else None


def git_commit() -> str | None:
    """The commit of the kfacbench source tree (with ``-dirty`` if modified), if in git."""
    src = Path(kfacbench.__file__).resolve().parent.parent
    return _command_output(["git", "describe", "--always", "--dirty", "--abbrev=12"], src)


def environment(device: torch.device) -> dict[str, Any]:
    """Metadata that makes a result interpretable later (written as ``env.json``)."""
    env: dict[str, Any] = {
        "device_kind": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "driver_version": None,
        "kfacbench_version": kfacbench.__version__,
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver_version"] = _command_output(query)
    return env


def device_name(device: torch.device) -> str:
    """A human name for the device (GPU model, or the CPU model from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def dumps(obj: Any) -> str:
    """Stable JSON (sorted keys) for hyperparameter and config columns."""
    return json.dumps(obj, sort_keys=True, default=str)
