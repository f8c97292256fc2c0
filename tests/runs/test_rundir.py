"""Damaged run directories: every command that reads runs answers with one line and exit code 2.

One real run is made per module, copied per test without its ``parts/`` (so nothing can rebuild
a damaged table from them), damaged in the test, and read through ``kfacbench.cli.main``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from shared_suites import PROFILED

from kfacbench import cli
from kfacbench.cli import show
from kfacbench.diagnostics.quality import diagnostics_frame
from kfacbench.errors import RunDirError
from kfacbench.profiling import kernels_frame
from kfacbench.report import data as report_data
from kfacbench.runs import compare, regress
from kfacbench.runs.rundir import load_tables, read_env, read_table
from kfacbench.runs.store import atomic_write_parquet

Argv = Callable[[Path, Path, Path], list[str]]
"""A command line from the damaged run, an intact run and a scratch folder."""

COMMANDS: dict[str, Argv] = {
    "show": lambda bad, good, tmp: ["show", str(bad)],
    "show --kernels": lambda bad, good, tmp: ["show", str(bad), "--kernels"],
    "report": lambda bad, good, tmp: ["report", str(bad), "-o", str(tmp / "report")],
    "compare BASE": lambda bad, good, tmp: ["compare", str(bad), str(good)],
    "compare NEW": lambda bad, good, tmp: ["compare", str(good), str(bad)],
    "regress": lambda bad, good, tmp: [
        "regress", "--run", str(bad), "--baseline", str(tmp / "b.parquet"), "--update-baseline",
    ],
}  # fmt: skip

_COMPARED = compare.required_columns("amortized")  # compare's default metric
READS: dict[str, Mapping[str, Sequence[str]]] = {
    "show": show.SHOW_TABLES,
    "show --kernels": {"kernels": show.SHOW_KERNELS},
    "report": report_data.REQUIRED,
    "compare BASE": _COMPARED,
    "compare NEW": _COMPARED,
    "regress": regress.REQUIRED,
}
"""The tables each command reads, with the columns it needs (the commands' own constants)."""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rundir")
    suite = root / "d.toml"
    suite.write_text(PROFILED.format(name="d"))  # SGD and SKFAC: regress can normalise
    assert cli.main(["run", str(suite), "--out", str(root / "out")]) == 0
    (run,) = (root / "out" / "d").iterdir()
    # A kernels table by hand: profiling the cells would take longer than everything else here.
    cells = pd.read_parquet(run / "cells.parquet")
    rows = [
        {
            "cell_id": c["cell_id"],
            "label": c["label"],
            "workload": c["workload"],
            "optimizer": c["optimizer"],
            "device": "cpu",
            "phase": phase,
            "kernel": f"aten::{phase}",
            "category": "gemm",
            "calls": 4,
            "total_ms": 2.0,
            "mean_ms": 0.5,
            "share": 0.25,
        }
        for c in cells.to_dict("records")
        for phase in ("forward", "backward")
    ]
    atomic_write_parquet(run / "kernels.parquet", kernels_frame(rows))
    # A diagnostics table by hand too (the report reads it beside the timed tables).
    diagnostics = [
        {
            "cell_id": c["cell_id"],
            "label": c["label"],
            "optimizer": c["optimizer"],
            "step": step,
            "approximation": "gradient",
            "fisher": "exact",
            "layer": "all",
            "rank": None,
            "metric": metric,
            "value": 0.5,
        }
        for c in cells.to_dict("records")
        for step in (0, 2)
        for metric in ("cosine", "model_ratio")
    ]
    table = diagnostics_frame([pd.DataFrame(diagnostics)])
    atomic_write_parquet(run / "diagnostics.parquet", table)
    return run


def copy_run(run_dir: Path, dest: Path, parts: bool = False) -> Path:
    """A copy of the run, by default without ``parts/``: its consolidated tables are all it has."""
    ignore = None if parts else shutil.ignore_patterns("parts")
    return Path(shutil.copytree(run_dir, dest, ignore=ignore))


def flip_data(path: Path) -> bytes:
    """The file with its last 8 bytes of page data flipped: the end of the largest column chunk
    is the end of its last page's values (a page header's statistics, which a flip could also
    hit, are no part of the data: reading through them is right)."""
    meta = pq.read_metadata(path)
    chunks = [
        meta.row_group(g).column(c)
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    ]
    big = max(chunks, key=lambda col: col.total_compressed_size)
    end = (big.dictionary_page_offset or big.data_page_offset) + big.total_compressed_size
    data = path.read_bytes()
    return data[: end - 8] + bytes(b ^ 0xFF for b in data[end - 8 : end]) + data[end:]


FILE_DAMAGE: dict[str, Callable[[Path], object]] = {
    "deleted": lambda p: p.unlink(),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "flipped": lambda p: p.write_bytes(flip_data(p)),
}


def fails_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str], *names: object) -> str:
    """Run the CLI; assert exit code 2 and one ``kfacbench: error:`` line naming ``names``."""
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfacbench: error: "), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("command", "table", "damage"),
    [
        (c, t, d)
        for c, reads in READS.items()
        for t in reads
        for d in FILE_DAMAGE
        # A report without kernels or diagnostics is fine.
        if (c, t, d) not in (("report", "kernels", "deleted"), ("report", "diagnostics", "deleted"))
    ],
)
def test_a_damaged_table_is_one_line(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    table: str,
    damage: str,
) -> None:
    bad = copy_run(run_dir, tmp_path / "bad")
    path = bad / f"{table}.parquet"
    FILE_DAMAGE[damage](path)
    fails_in_one_line(COMMANDS[command](bad, run_dir, tmp_path), capsys, path)


@pytest.mark.parametrize(
    ("command", "table", "column"),
    [(c, t, col) for c, reads in READS.items() for t, cols in reads.items() for col in cols],
)
def test_a_dropped_column_is_one_line(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    table: str,
    column: str,
) -> None:
    bad = copy_run(run_dir, tmp_path / "bad")
    path = bad / f"{table}.parquet"
    pd.read_parquet(path).drop(columns=column).to_parquet(path)
    line = fails_in_one_line(COMMANDS[command](bad, run_dir, tmp_path), capsys, path, column)
    assert "missing column" in line


@pytest.mark.parametrize(
    ("command", "table", "column", "values"),
    [
        ("show", "cells", "status", [1, 2]),
        ("show", "cells", "hparams", ["{}", "lr=0.1"]),
        ("compare NEW", "cells", "median_step_ms", ["1.5", "2.5"]),
        ("report", "curves", "train_loss", "x"),
        ("regress", "phases", "median_ms", "x"),
        ("show --kernels", "kernels", "kernel", 3),
    ],
)
def test_a_column_of_the_wrong_kind_is_one_line(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    table: str,
    column: str,
    values: Any,
) -> None:
    bad = copy_run(run_dir, tmp_path / "bad")
    path = bad / f"{table}.parquet"
    frame = pd.read_parquet(path)
    frame[column] = values
    frame.to_parquet(path)
    line = fails_in_one_line(COMMANDS[command](bad, run_dir, tmp_path), capsys, path, column)
    assert "does not hold" in line


@pytest.mark.parametrize(
    ("command", "table"),
    [(c, "cells") for c in COMMANDS if c != "show --kernels"] + [("regress", "phases")],
)
def test_a_table_without_rows_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, table: str
) -> None:
    """No cells: nothing to show, report or compare; a regression record without step times
    would pass the check unmeasured."""
    bad = copy_run(run_dir, tmp_path / "bad")
    path = bad / f"{table}.parquet"
    pd.read_parquet(path).iloc[:0].to_parquet(path)
    fails_in_one_line(COMMANDS[command](bad, run_dir, tmp_path), capsys, path)


@pytest.mark.parametrize("command", ["report", "regress"])
@pytest.mark.parametrize("text", [b"", b'{"device_kind": "cpu", "dev', b"[1, 2]", b"\xff\xfe{}"])
def test_a_garbage_env_json_is_one_line(
    run_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    text: bytes,
) -> None:
    bad = copy_run(run_dir, tmp_path / "bad")
    (bad / "env.json").write_bytes(text)
    fails_in_one_line(COMMANDS[command](bad, run_dir, tmp_path), capsys, bad / "env.json")


def test_repeated_cells_are_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A table concatenated twice: ``compare`` would otherwise look up two rows per cell."""
    bad = copy_run(run_dir, tmp_path / "bad")
    path = bad / "cells.parquet"
    cells = pd.read_parquet(path)
    pd.concat([cells, cells], ignore_index=True).to_parquet(path)
    line = fails_in_one_line(["compare", str(run_dir), str(bad)], capsys, path)
    assert "repeated rows for cell_id=" in line


def test_damaged_parts_alone_do_not_break_show(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``show`` reads the consolidated tables; a damaged part may be read too (to reconcile the
    tables with it), but then it is one line too, never a traceback."""
    copy = copy_run(run_dir, tmp_path / "copy", parts=True)
    part = next((copy / "parts").glob("*.cells.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    capsys.readouterr()
    code = cli.main(["show", str(copy)])
    err = capsys.readouterr().err
    assert code == 0 or (code == 2 and len(err.splitlines()) == 1), err
    assert "Traceback" not in err


def test_a_missing_run_directory_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails_in_one_line(["show", str(tmp_path / "nothing")], capsys, tmp_path / "nothing")


def test_a_table_without_columns_is_an_empty_table(run_dir: Path, tmp_path: Path) -> None:
    """What the store writes for ``curves`` and ``phases`` before any finished cell has rows."""
    copy = copy_run(run_dir, tmp_path / "copy")
    atomic_write_parquet(copy / "phases.parquet", pd.DataFrame())
    phases = read_table(copy / "phases.parquet", ["cell_id", "median_ms"])
    assert phases.empty and list(phases.columns) == ["cell_id", "median_ms"]
    assert cli.main(["compare", str(run_dir), str(copy)]) == 0  # no noise estimate, no error
    assert set(load_tables(copy)) == {"cells", "curves", "phases"}
    assert read_env(copy)["device_kind"] == "cpu"
    with pytest.raises(RunDirError, match="no such run directory"):
        load_tables(tmp_path / "nothing")


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "A", "B", "--fail-above", "nan"],
        ["compare", "A", "B", "--fail-above", "inf"],
        ["compare", "A", "B", "--fail-above", "-5"],
        ["regress", "--run", "A", "--fail-above", "nan"],
        ["regress", "--run", "A", "--min-share", "nan"],
        ["show", "A", "--kernels", "--top", "0"],
    ],
)
def test_thresholds_that_could_never_fail_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and argv[-2] in err, err


def test_report_into_an_existing_file_is_one_line(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "report.html"
    target.write_text("keep me")
    fails_in_one_line(["report", str(run_dir), "-o", str(target)], capsys, target)
    assert target.read_text() == "keep me"
    fails_in_one_line(["report", str(run_dir), "-o", str(target / "sub")], capsys, target / "sub")
