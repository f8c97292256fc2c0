"""The traces kfacbench writes, served by a real TensorBoard with the torch-tb-profiler plugin.

Starts ``tensorboard`` on a free loopback port against a run's ``traces`` directory, waits for
the plugin to load every cell's trace, checks through its HTTP API that the runs are listed and
that the Overview, Operator and Trace views load, and stops the server. Needs the ``profile``
extra (``pip install -e ".[profile]"``; CI installs it).
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from shared_suites import PROFILED

from kfacbench import cli

pytest.importorskip("tensorboard", reason="tensorboard is not installed (the 'profile' extra)")
pytest.importorskip(
    "torch_tb_profiler", reason="torch-tb-profiler is not installed (the 'profile' extra)"
)

SUITE = PROFILED.format(name="tb")
PLUGIN = "/data/plugin/pytorch_profiler"
TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(base: str, path: str, **params: str) -> tuple[int, bytes]:
    url = f"{base}{PLUGIN}/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(base: str, path: str, **params: str) -> Any:
    status, body = get(base, path, **params)
    assert status == 200, f"{path} {params}: HTTP {status} {body[:200]!r}"
    if body[:2] == b"\x1f\x8b":  # the trace view is served gzipped
        body = gzip.decompress(body)
    return json.loads(body)


def test_tensorboard_lists_the_runs_and_loads_the_views(tmp_path: Path) -> None:
    suite = tmp_path / "tb.toml"
    suite.write_text(SUITE)
    assert cli.main(["profile", str(suite), "--out", str(tmp_path / "out"), "--steps", "2"]) == 0
    (run_dir,) = (tmp_path / "out" / "tb").iterdir()
    cell_ids = sorted(p.name for p in (run_dir / "traces").iterdir())
    assert len(cell_ids) == 2
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(run_dir / "traces"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S
        runs: dict[str, Any] = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            try:
                runs = get_json(base, "runs")
                if sorted(runs["runs"]) == cell_ids and not runs["loading"]:
                    break
            except (urllib.error.URLError, ConnectionError, AssertionError):
                pass
            time.sleep(0.5)
        assert sorted(runs.get("runs", [])) == cell_ids, f"runs listed: {runs}"
        for run in cell_ids:
            views = get_json(base, "views", run=run)
            assert {"Overview", "Operator", "Trace"} <= set(views)
            (worker,) = get_json(base, "workers", run=run, view="Overview")
            assert worker == run  # one worker per cell, named by its id
            (span,) = get_json(base, "spans", run=run, worker=worker)
            at = {"run": run, "worker": worker, "span": span}
            overview = get_json(base, "overview", **at)
            assert overview["steps"]["rows"] and overview["performance"]
            ops = get_json(base, "operation/table", group_by="Operation", **at)
            names = {row["name"] for row in ops["data"]}
            assert "aten::addmm" in names
            trace = get_json(base, "trace", **at)
            spans = {e.get("name") for e in trace["traceEvents"]}
            assert "kfacbench/forward" in spans and "kfacbench/update" in spans
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
