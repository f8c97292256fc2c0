"""The result store: no lost row after a kill, no stale temp files, group-readable files, a failed
write that leaves the cell unfinished rather than half stored."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kfacbench.errors import KfacbenchError
from kfacbench.runs.environment import COMMIT_ENV, git_commit
from kfacbench.runs.schema import CELL_COLUMNS
from kfacbench.runs.store import (
    TMP_SUFFIX,
    DamagedPartError,
    RunStore,
    atomic_write_parquet,
    new_manifest,
)


def row(cell_id: str) -> dict[str, Any]:
    base: dict[str, Any] = dict.fromkeys(CELL_COLUMNS)
    return {**base, "cell_id": cell_id, "label": f"cell {cell_id}", "status": "ok", "steps": 3}


def curve(step: int) -> dict[str, Any]:
    return {"step": step, "train_loss": 1.0 / (step + 1)}


def filled(tmp_path: Path, ids: tuple[str, ...] = ("a", "b", "c")) -> RunStore:
    store = RunStore(tmp_path / "run")
    for cell_id in ids:
        store.write_cell(row(cell_id), [curve(0), curve(5)], [{"phase": "step", "calls": 5}])
    return store


def test_tables_hold_every_finished_cell(tmp_path: Path) -> None:
    store = filled(tmp_path)
    cells = pd.read_parquet(store.run_dir / "cells.parquet")
    assert list(cells["cell_id"]) == ["a", "b", "c"]
    assert len(pd.read_parquet(store.run_dir / "curves.parquet")) == 6
    assert store.in_sync()


@pytest.mark.parametrize("damage", ["row lost", "cells missing", "curves truncated", "duplicate"])
def test_tables_that_disagree_with_parts_are_rebuilt(tmp_path: Path, damage: str) -> None:
    """A kill while the tables were written (one row short, a file missing or cut short) is
    repaired from parts/ the next time the run is opened, instead of staying one cell short."""
    store = filled(tmp_path)
    cells_path, curves_path = store.run_dir / "cells.parquet", store.run_dir / "curves.parquet"
    cells = pd.read_parquet(cells_path)
    if damage == "row lost":
        atomic_write_parquet(cells_path, cells.iloc[:2])
    elif damage == "cells missing":
        cells_path.unlink()
    elif damage == "curves truncated":
        curves_path.write_bytes(curves_path.read_bytes()[:40])
    else:
        atomic_write_parquet(cells_path, pd.concat([cells, cells.iloc[:1]]))
    reopened = RunStore(store.run_dir)
    assert not reopened.in_sync()
    assert reopened.reconcile()
    assert sorted(pd.read_parquet(cells_path)["cell_id"]) == ["a", "b", "c"]
    assert len(pd.read_parquet(curves_path)) == 6
    assert reopened.in_sync() and not reopened.reconcile()


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    store = filled(tmp_path)
    left = [store.run_dir / f".cells.parquet.x1{TMP_SUFFIX}", store.parts / f".a.x2{TMP_SUFFIX}"]
    for path in left:
        path.write_bytes(b"half a file")
    assert RunStore(store.run_dir).remove_stale_files() == 2
    assert not any(path.exists() for path in left)
    assert (store.run_dir / "cells.parquet").exists()


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def test_files_follow_the_umask(tmp_path: Path, umask: None) -> None:
    """mkstemp makes 0600 files; a group sharing a cluster filesystem must be able to read."""
    store = filled(tmp_path, ("a",))
    store.write_text("env.json", "{}\n")
    for path in [*store.run_dir.glob("*.*"), *store.parts.glob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, path


def test_a_failed_write_leaves_the_cell_unfinished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = filled(tmp_path, ("a",))
    bad = row("b") | {"steps": "not an integer"}  # the cells part cannot be written
    with pytest.raises((ValueError, TypeError)):
        store.write_cell(bad, [curve(0)], [{"phase": "step", "calls": 1}])
    assert store.finished_ids() == {"a"}
    assert sorted(p.name for p in store.parts.iterdir()) == [
        "a.cells.parquet",
        "a.curves.parquet",
        "a.phases.parquet",
    ]


def test_a_damaged_part_is_one_line_for_readers_and_set_aside_for_the_writer(
    tmp_path: Path,
) -> None:
    store = filled(tmp_path)
    (store.run_dir / "cells.parquet").unlink()  # out of sync: the parts must be read
    part = store.parts / "b.curves.parquet"
    part.write_bytes(part.read_bytes()[:30])
    reader = RunStore(store.run_dir)
    with pytest.raises(DamagedPartError) as info:
        reader.reconcile()
    assert str(info.value).startswith(f"{part}: damaged (") and "\n" not in str(info.value)
    assert info.value.cell_id == "b"

    seen: list[str] = []
    writer = RunStore(store.run_dir)
    assert writer.reconcile(lambda cell_id, message: seen.append(cell_id))
    assert seen == ["b"] and writer.finished_ids() == {"a", "c"}
    assert sorted(pd.read_parquet(store.run_dir / "cells.parquet")["cell_id"]) == ["a", "c"]
    assert sorted(p.name for p in (store.parts / "damaged").iterdir()) == [
        "b.cells.parquet",
        "b.curves.parquet",
        "b.phases.parquet",
    ]


def test_the_named_commit_is_recorded_where_git_cannot_read_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device's copy of the working tree reads its own history (once `b762f5e72cfb-dirty` for
    a run of 5058249); the commit the session names is what env.json and the manifest get."""
    monkeypatch.setenv(COMMIT_ENV, "5058249")
    assert git_commit() == "5058249"
    manifest = new_manifest("kfacbench run quick", {"git_commit": git_commit()})
    assert (manifest["commit"], manifest["dirty"]) == ("5058249", False)
    monkeypatch.setenv(COMMIT_ENV, "5058249-dirty")
    assert new_manifest("kfacbench run quick", {"git_commit": git_commit()})["dirty"] is True


@pytest.mark.parametrize("value", ["HEAD", "main", "505824", "5058249 extra", "/work/x"])
def test_a_named_commit_that_is_not_one_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(COMMIT_ENV, value)
    with pytest.raises(KfacbenchError, match=f"^{COMMIT_ENV}=.*expected a commit") as info:
        git_commit()
    assert "\n" not in str(info.value)
