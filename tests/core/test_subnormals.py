"""Subnormal floats are flushed in every process that trains or times, and the tables say so.

Each entry point is run as a user runs it (a fresh process) and its record is read back: the
probe behind the record is shown to fail where the flush does not reach a thread, so a record of
``True`` means the setting held on every thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from shared_suites import PROFILED

from kfacbench import cli
from kfacbench.core import subnormals
from kfacbench.errors import KfacbenchError

SUITE = PROFILED.format(name="flush")
"""SGD and SKFAC on curves_ae, synthetic data: two cells of a few seconds."""


def python(code: str, flush: str | None) -> str:
    """Run ``code`` in a fresh interpreter with ``$KFACBENCH_FLUSH_DENORMAL`` set to ``flush``
    (unset for ``None``); return its stdout."""
    env = {k: v for k, v in os.environ.items() if k != subnormals.ENV}
    if flush is not None:
        env[subnormals.ENV] = flush
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def kfacbench(args: list[str], cwd: Path, flush: str | None) -> None:
    code = f"import sys; from kfacbench.cli import main; sys.exit(main({args!r}))"
    python(f"import os; os.chdir({str(cwd)!r}); {code}", flush)


def test_the_setting_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(subnormals.ENV, raising=False)
    assert subnormals.wanted()
    for value, want in [("0", False), ("off", False), ("1", True), (" True ", True)]:
        monkeypatch.setenv(subnormals.ENV, value)
        assert subnormals.wanted() is want
    monkeypatch.setenv(subnormals.ENV, "sometimes")
    with pytest.raises(KfacbenchError, match=f"{subnormals.ENV}='sometimes'"):
        subnormals.wanted()


def test_a_bad_setting_is_a_one_line_error_of_the_command(tmp_path: Path) -> None:
    env = {**os.environ, subnormals.ENV: "maybe"}
    done = subprocess.run(
        [sys.executable, "-m", "kfacbench", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"kfacbench: error: {subnormals.ENV}='maybe': expected 1 (flush subnormal floats) or 0"
        " (keep them)"
    ]


def test_this_test_process_flushes_on_every_thread() -> None:
    """tests/conftest.py applies the setting as the commands do: pytest-benchmark's rounds run
    here."""
    assert subnormals.flushing() is subnormals.wanted()


PROBE = "from kfacbench.core import subnormals as s; s.apply(); print(s.flushing())"


def test_the_probe_follows_the_setting_in_a_fresh_process() -> None:
    assert python(PROBE, None) == "True"
    assert python(PROBE, "1") == "True"
    assert python(PROBE, "0") == "False"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads")
def test_the_probe_sees_a_thread_that_started_before_the_setting() -> None:
    """The intra-op threads copy the flag when they start: set afterwards, it reaches the
    calling thread only, and the probe (a kernel split over every thread) says so."""
    late = "import torch; torch.full((1 << 20,), 1.0).mul(2.0); " + PROBE
    assert python(late, "1") == "False"


def test_a_run_records_the_flush_in_its_cells_and_env(tmp_path: Path) -> None:
    (tmp_path / "flush.toml").write_text(SUITE)
    for flush, out in [(None, "on"), ("0", "off")]:
        kfacbench(["run", "flush.toml", "--out", out], tmp_path, flush)
        (run_dir,) = (tmp_path / out / "flush").iterdir()
        cells = pd.read_parquet(run_dir / "cells.parquet")
        assert set(cells["status"]) == {"ok"}
        assert cells["flush_denormal"].tolist() == [flush is None] * 2
        assert json.loads((run_dir / "env.json").read_text())["flush_denormal"] is (flush is None)


def test_profile_and_diagnose_record_the_flush(tmp_path: Path) -> None:
    (tmp_path / "flush.toml").write_text(SUITE)
    kfacbench(
        ["profile", "flush.toml", "--only", "*sgd*", "--steps", "1", "--out", "p"], tmp_path, None
    )
    common = ["diagnose", "flush.toml", "--only", "*skfac*", "--at", "0", "--no-dense", "--no-rank"]
    kfacbench([*common, "--out", "d"], tmp_path, "0")
    for out, flushed in [("p", True), ("d", False)]:
        (run_dir,) = (tmp_path / out / "flush").iterdir()
        assert json.loads((run_dir / "env.json").read_text())["flush_denormal"] is flushed


def test_a_process_that_does_not_flush_warns_and_records_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process (a user's script that ran torch before kfacbench): the cells say what was
    measured, and the run says why."""
    monkeypatch.setattr(subnormals, "flushing", lambda: False)
    (tmp_path / "flush.toml").write_text(SUITE)
    argv = ["run", str(tmp_path / "flush.toml"), "--only", "*sgd*", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "subnormal floats are not flushed on every CPU thread" in printed.out + printed.err
    (run_dir,) = (tmp_path / "flush").iterdir()
    assert pd.read_parquet(run_dir / "cells.parquet")["flush_denormal"].tolist() == [False]
