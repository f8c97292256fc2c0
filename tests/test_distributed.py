"""Data-parallel K-FAC and SKFAC on torch.distributed (gloo, 2 CPU processes).

The reference is the single-process run on the same global batch: with the empirical Fisher (no
sampling) and float64, the distributed factors and updates must equal it to rounding.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.distributed import Dist, broadcast_from_owners, shard
from kfacbench.errors import KfacbenchError
from kfacbench.launch import LaunchOptions, torchrun_args
from kfacbench.optim import MethodContext, get_method
from kfacbench.optim.owners import assign_owners

CPU = torch.device("cpu")
BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def conv_net() -> nn.Module:
    """Conv and Linear layers (no BatchNorm: its batch statistics are per shard under DDP)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return (
        torch.randn(BATCH, 2, 4, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (BATCH,), generator=gen),
    )


CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac-fast comm-opt": ("kfac-fast", {"dist_strategy": "comm-opt"}),
    "kfac-fast mem-opt": ("kfac-fast", {"dist_strategy": "mem-opt"}),
    "kfac (rescale, LM, γ search)": (
        "kfac",
        {"lm_interval": 1, "gamma_interval": 1, "damping": 1.0},
    ),
    "skfac comm-opt": ("skfac", {"dist_strategy": "comm-opt", "damping": 0.5}),
    "skfac mem-opt": ("skfac", {"dist_strategy": "mem-opt", "damping": 0.5}),
}
STEPS = 3
EXACT = {"rtol": 1e-9, "atol": 1e-11}
TOLERANCE = {"kfac (rescale, LM, γ search)": {"rtol": 1e-4, "atol": 1e-7}}
"""The exact-Fisher quadratic model is evaluated in float32 (fisher_quadratic), so the shard
means and the global mean round differently; a missing all-reduce would differ by far more."""


def train_steps(name: str, dist: Dist | None) -> dict[str, Any]:
    """``STEPS`` steps of a case on the global batch (its shard when distributed); returns the
    parameters and the curvature state every rank must agree on."""
    preset, extra = CASES[name]
    spec = get_method(preset)
    hp = {k: v.default for k, v in spec.hparams.items()}
    hp.update(fisher="empirical", inv_interval=1, **extra)
    model = conv_net()
    wrapped = nn.parallel.DistributedDataParallel(model) if dist is not None else None
    problem = Problem(model, "categorical", wrapped=wrapped)
    method: Any = spec.build(problem, hp, MethodContext(None, 0, CPU, dist))
    x, y = global_batch()
    if dist is not None:
        idx = shard(torch.arange(BATCH), dist)
        x, y = x[idx], y[idx]
    timer = PhaseTimer(CPU)
    for _ in range(STEPS):
        method.step(x, y, timer)
    state: dict[str, Any] = {"params": [p.detach().clone() for p in model.parameters()]}
    if preset.startswith("kfac"):
        method._land_factors(timer)
        state["factors"] = [t.clone() for c in method.curv for t in (c.a, c.g)]
        state["lam"] = method.lam.clone()
    else:
        state["factors"] = [r.T @ r for c in method.roots for r in c.history[-1]]
    state["phases"] = timer.phases()
    return state


def _worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        state = train_steps(name, Dist(rank, world, rank, "gloo"))
        torch.save(state, Path(out) / f"rank{rank}.pt")
        # Both ranks done with every collective before either tears its group down: a rank
        # that destroys its gloo pairs while the other's last message is in flight aborts the
        # other process ("terminate called without an active exception", seen once in CI).
        td.barrier()
    finally:
        td.destroy_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_distributed_matches_one_process_on_the_global_batch(name: str, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, free_port(), name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train_steps(name, None)
    for state in ranks:
        assert "comm" in state["phases"]
        for key in ("params", "factors"):
            assert len(state[key]) == len(single[key])
            for got, want in zip(state[key], single[key], strict=True):
                torch.testing.assert_close(got, want, **TOLERANCE.get(name, EXACT))
        if "lam" in single:  # Levenberg–Marquardt decided alike on the global batch
            torch.testing.assert_close(state["lam"], single["lam"])
    assert "comm" not in single["phases"]


def test_owners_balance_the_cost() -> None:
    # LPT by hand: 8 -> rank 0; 5 -> rank 1; the three 1s -> rank 1 (loads 8 and 8).
    assert assign_owners([8.0, 1.0, 1.0, 1.0, 5.0], 2) == [0, 1, 1, 1, 1]
    owners = assign_owners([float(d**3) for d in (784, 1000, 500, 250, 30, 250, 500, 1000)], 3)
    load = [
        sum(
            d**3
            for d, o in zip((784, 1000, 500, 250, 30, 250, 500, 1000), owners, strict=True)
            if o == r
        )
        for r in range(3)
    ]
    assert max(load) <= 4 / 3 * (sum(load) / 3) + 1000**3 / 3
    assert assign_owners([1.0, 2.0], 1) == [0, 0]


def test_shards_are_contiguous_and_equal() -> None:
    idx = torch.arange(12)
    parts = [shard(idx, Dist(r, 3, r, "gloo")) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx)
    with pytest.raises(KfacbenchError, match="does not split evenly over 5 processes"):
        shard(idx, Dist(0, 5, 0, "gloo"))


SUITE = """
name = "dd"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 6
eval_every = 6
log_every = 3
train_eval_size = 64
eval_size = 64
[sweep]
workload = ["mnist_ae"]
batch_size = [64]
inv_interval = [3]
[optimizers.sgd]
lr = 0.01
[optimizers.kfac-fast]
lr = 0.01
damping = 1.0
[optimizers.skfac]
lr = 0.01
damping = 1.0
"""


def kfacbench(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kfacbench", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_two_process_run_writes_one_set_of_tables(tmp_path: Path) -> None:
    (tmp_path / "dd.toml").write_text(SUITE)
    done = kfacbench("run", "dd.toml", "--nproc", "2", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "dd").iterdir()
    cells = pd.read_parquet(run_dir / "cells.parquet")
    assert len(cells) == 3 and set(cells["status"]) == {"ok"}
    assert set(cells["world_size"]) == {2} and set(cells["backend"]) == {"gloo"}
    assert cells["flush_denormal"].all()  # on every thread of both workers (agreed by all ranks)
    phases = pd.read_parquet(run_dir / "phases.parquet").merge(cells[["cell_id", "optimizer"]])
    with_comm = set(phases.loc[phases["phase"] == "comm", "optimizer"])
    assert with_comm == {"kfac-fast", "skfac"}
    assert len(list((run_dir / "parts").glob("*.cells.parquet"))) == 3
    env = json.loads((run_dir / "env.json").read_text())
    assert (env["world_size"], env["backend"]) == (2, "gloo")


KILL_SUITE = """
name = "kill"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 100000
max_seconds = 120
eval_every = 100000
log_every = 10
train_eval_size = 64
eval_size = 64
[workloads.curves_ae]
max_steps = 4
eval_every = 4
[sweep]
workload = ["mnist_ae", "curves_ae"]
batch_size = [64]
[optimizers.sgd]
lr = 0.01
"""


def test_a_killed_rank_ends_the_cell_with_an_error_and_the_suite_goes_on(
    tmp_path: Path,
) -> None:
    """SIGKILL one worker in the middle of a cell: torchrun stops the other within seconds (not
    the 120 s budget, nor the 100 s collective timeout), the cell is recorded as an error naming
    the rank, and the launcher runs the remaining cell."""
    (tmp_path / "kill.toml").write_text(KILL_SUITE)
    log = (tmp_path / "log.txt").open("w")
    command = ["run", "kill.toml", "--nproc", "2", "--out", "runs", "--dist-timeout", "100"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kfacbench", *command],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        rank1: Path | None = None
        while rank1 is None and time.monotonic() < deadline:
            found = list((tmp_path / "runs" / "kill").glob("*/dist/rank1.json"))
            if found and (found[0].parent / "current.json").exists():
                rank1 = found[0]
            time.sleep(0.2)
        assert rank1 is not None, "the workers did not start"
        time.sleep(3)  # inside the first cell's training loop
        killed_at = time.monotonic()
        os.kill(json.loads(rank1.read_text())["pid"], signal.SIGKILL)
        parts = rank1.parent.parent / "parts"
        while not list(parts.glob("*.cells.parquet")) and time.monotonic() < killed_at + 60:
            time.sleep(0.1)
        recorded_after = time.monotonic() - killed_at
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 1, output[-3000:]  # finished, with an error cell
    run_dir = rank1.parent.parent
    cells = pd.read_parquet(run_dir / "cells.parquet").set_index("workload")
    assert cells.loc["mnist_ae", "status"] == "error"
    assert "rank 1 was killed by SIGKILL" in cells.loc["mnist_ae", "error"]
    print(f"cell recorded {recorded_after:.1f} s after the kill")
    assert recorded_after < 30  # torchrun's teardown, far below the timeouts
    assert cells.loc["mnist_ae", "started_at"] < cells.loc["mnist_ae", "finished_at"]
    assert cells.loc["curves_ae", "status"] == "ok"  # the suite went on


def test_torchrun_arguments_for_one_node_and_several() -> None:
    one = torchrun_args("s.toml", Path("runs/s/x"), ["--only", "sgd"], LaunchOptions(2))
    assert one[:4] == ["--nproc-per-node=2", "--nnodes=1", "--max-restarts=0", "--standalone"]
    assert one[4:] == ["-m", "kfacbench", "run", "s.toml", "--resume", "runs/s/x", "--only", "sgd"]
    many = torchrun_args("s.toml", Path("/shared/x"), [], LaunchOptions(8, 4, "head:29400"))
    assert "--rdzv-backend=c10d" in many and "--rdzv-endpoint=head:29400" in many
    assert "--rdzv-id=kfacbench-x" in many and "--standalone" not in many
    with pytest.raises(KfacbenchError, match="--rdzv-endpoint"):
        torchrun_args("s.toml", Path("x"), [], LaunchOptions(2, 2))
    with pytest.raises(KfacbenchError, match="at least 1"):
        torchrun_args("s.toml", Path("x"), [], LaunchOptions(0))


def test_kfacbench_run_nproc_errors_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "dd.toml").write_text(SUITE)
    done = kfacbench("run", "dd.toml", "--nproc", "2", "--nnodes", "2", "--out", "r", cwd=tmp_path)
    assert done.returncode == 2
    assert "--rdzv-endpoint" in done.stderr


PROFILED = """
name = "prof"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 4
eval_every = 4
log_every = 2
train_eval_size = 64
eval_size = 64
[profile]
wait = 1
warmup = 1
active = 2
[sweep]
workload = ["curves_ae"]
batch_size = [64]
inv_interval = [2]
[optimizers.skfac]
lr = 0.01
damping = 1.0
"""


def test_each_rank_writes_its_own_trace(tmp_path: Path) -> None:
    (tmp_path / "prof.toml").write_text(PROFILED)
    done = kfacbench("run", "prof.toml", "--nproc", "2", "--out", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "prof").iterdir()
    cell_id = pd.read_parquet(run_dir / "cells.parquet")["cell_id"].iloc[0]
    for rank in (0, 1):
        (trace,) = (run_dir / "traces" / cell_id).glob(f"{cell_id}.rank{rank}.*.pt.trace.json")
        meta = json.loads(trace.read_text())
        assert meta["distributedInfo"]["rank"] == rank
        names = {e.get("name") for e in meta["traceEvents"]}
        assert {"kfacbench/comm", "kfacbench/inverse"} <= names
    kernels = pd.read_parquet(run_dir / "kernels.parquet")
    assert "comm" in set(kernels["phase"])


def test_an_exception_on_the_ranks_is_the_cells_error_and_the_suite_goes_on(
    tmp_path: Path,
) -> None:
    """A global batch of 63 cannot be split over 2 ranks: the ranks raise, the cell is recorded
    with the message of the first failing rank, and the next cell (batch 64) runs."""
    suite = SUITE.replace("batch_size = [64]", "batch_size = [63, 64]").replace(
        'name = "dd"', 'name = "odd"'
    )
    (tmp_path / "odd.toml").write_text(suite)
    done = kfacbench("run", "odd.toml", "--nproc", "2", "--only", "sgd", "--out", "r", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]  # finished, with an error cell
    (run_dir,) = (tmp_path / "r" / "odd").iterdir()
    cells = pd.read_parquet(run_dir / "cells.parquet").set_index("batch_size")
    assert cells.loc[63, "status"] == "error"
    assert cells.loc[63, "error"].startswith("rank ")
    assert "batch size 63 does not split evenly over 2 processes" in cells.loc[63, "error"]
    assert cells.loc[64, "status"] == "ok"


def test_known_layouts_skip_the_object_broadcast(monkeypatch: pytest.MonkeyPatch) -> None:
    """mem-opt's per-step broadcast of directions: shapes known on every rank, no pickle/sync."""
    calls: list[str] = []

    def object_broadcast(meta: list[Any], src: int) -> None:
        calls.append("object")
        meta[0] = [[((2, 3), torch.float32)]]

    def broadcast(t: torch.Tensor, src: int) -> None:
        calls.append(f"tensor from {src}")
        t.fill_(float(src + 1))

    monkeypatch.setattr(td, "broadcast_object_list", object_broadcast)
    monkeypatch.setattr(td, "broadcast", broadcast)
    receiver = Dist(rank=1, world=2, local_rank=1, backend="gloo")
    items: list[list[torch.Tensor]] = [[], [torch.zeros(4)]]  # layer 0 owned by rank 0
    layouts = [[((2, 3), torch.float32)], [((4,), torch.float32)]]
    out = broadcast_from_owners(items, [0, 1], receiver, torch.device("cpu"), layouts)
    assert calls == ["tensor from 0", "tensor from 1"]  # no object broadcast
    assert out[0][0].shape == (2, 3) and bool((out[0][0] == 1.0).all())
    calls.clear()
    broadcast_from_owners([[], [torch.zeros(4)]], [0, 1], receiver, torch.device("cpu"))
    assert calls.count("object") == 2  # without layouts: one per owner
