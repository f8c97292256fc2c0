"""Whole-step CUDA graphs: which steps each method lets a graph replay, and the two properties a
replay relies on, checked on any device: a replayed step's host state equals an eager step's
(``graph_replayed``), and every tensor a method keeps across steps stays at its address, through
refreshes too (a graph replays into the memory it was captured with). The capture and replay
themselves need CUDA (skipped visibly elsewhere)."""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import fields, is_dataclass
from typing import Any

import pandas as pd
import pytest
import torch
from torch import nn

from kfacbench.core.graphs import GRAPH_WARMUP, StepGraphs, land
from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.method import Method, MethodContext
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.data import Splits
from kfacbench.optim import get_method
from kfacbench.optim.lowrank import DampedInverse
from kfacbench.report.tables import graph_table

CPU = torch.device("cpu")
CUDA = torch.cuda.is_available()
GRAPHED = ("sgd", "kfac-fast", "skfac")


def build(name: str, device: torch.device = CPU, **hp: Any) -> Any:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    spec = get_method(name)
    hparams = {k: v.default for k, v in spec.hparams.items()} | hp
    if spec.uses_inv_interval:
        hparams.setdefault("inv_interval", 5)
    ctx = MethodContext(200, 0, device, cuda_graph=True)
    return spec.build(Problem(model, "categorical"), hparams, ctx)


def batch(step: int, device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=gen).to(device), torch.randint(0, 3, (16,)).to(device)


def keys(method: Any, steps: int) -> list[Hashable | None]:
    """The key of each of the first ``steps`` steps, taking them eagerly."""
    out = []
    for k in range(steps):
        out.append(method.graph_key(k))
        method.step(*batch(k), PhaseTimer(CPU))
    return out


def walk(obj: object, path: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """(path, leaf) of a method's state: tensors and plain values, through lists, dicts, deques
    and objects; not into modules (the model), generators or tensors' own attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor | int | float | str | bool | type(None)):
        yield path, obj
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module | torch.Generator | torch.device) or callable(obj):
        return
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple | deque):
        items = enumerate(obj)
    elif is_dataclass(obj):
        items = ((f.name, getattr(obj, f.name)) for f in fields(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("kfacbench"):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        yield from walk(value, f"{path}.{key}", seen)


def host_state(method: object) -> dict[str, Any]:
    return {p: v for p, v in walk(method) if not isinstance(v, torch.Tensor)}


def addresses(method: object) -> dict[str, int]:
    return {p: v.data_ptr() for p, v in walk(method) if isinstance(v, torch.Tensor)}


def test_sgd_graphs_every_step_one_graph_per_learning_rate() -> None:
    assert set(keys(build("sgd"), 6)) == {("sgd", 0.01)}
    warm = build("sgd", schedule="cosine", warmup_steps=3)
    assert len(set(keys(warm, 6))) == 6  # every step a new rate: none repeats, none is captured
    assert build("sgd").graph_key(0) is not None


def test_kfac_fast_graphs_only_steps_after_the_moving_average_saturates() -> None:
    """Refreshes (steps 0-2 and every T_inv) run eagerly, and so do the steps while ε = min(1 −
    1/k, ε_max) still changes (its value is a kernel argument): with ε_max = 0.8, k = 5."""
    got = keys(build("kfac-fast", ema_max=0.8), 12)
    saturated = next(k for k in range(1, 20) if 1 - 1 / (k + 1) >= 0.8)  # 4 (or 5: rounding)
    expected = [
        None if k < 3 or k % 5 == 0 or k < saturated else ("kfac", True, 0) for k in range(12)
    ]
    assert got == expected
    assert expected.count(None) <= 7


def test_adaptive_kfac_and_compiled_steps_are_never_graphed() -> None:
    assert set(keys(build("kfac"), 8)) == {None}


def test_skfac_graphs_the_steps_that_neither_refresh_nor_measure() -> None:
    got = keys(build("skfac"), 7)
    assert [k is None for k in got] == [True, False, False, False, False, True, False]
    windowed = keys(build("skfac", factor_decay=0.5, factor_window=2), 7)
    assert [k is None for k in windowed] == [True, False, False, False, True, True, False]


@pytest.mark.parametrize("name", GRAPHED)
def test_a_replayed_steps_host_state_equals_an_eager_steps(name: str) -> None:
    """``graph_replayed`` must leave the host exactly as the step's Python would: counters,
    learning rates, flags. Compared at every graphed step of the first 16."""
    method = build(name, ema_max=0.8) if name == "kfac-fast" else build(name)
    graphed = 0
    for k in range(16):
        if method.graph_key(k) is not None:
            replayed = copy.deepcopy(method)
            replayed.graph_replayed()
            method.step(*batch(k), PhaseTimer(CPU))
            assert host_state(replayed) == host_state(method), f"step {k}"
            graphed += 1
        else:
            method.step(*batch(k), PhaseTimer(CPU))
    assert graphed >= 5


@pytest.mark.parametrize("name", GRAPHED)
def test_state_tensors_stay_at_their_addresses_through_steps_and_refreshes(name: str) -> None:
    """Once a method has taken its first steps, no step, refresh included, may move a tensor it
    keeps: a graph captured before would read the old memory. (A rebinding the method announces
    by a new key, a layout change, is allowed: none happens here.)"""
    method = build(name, ema_max=0.8) if name == "kfac-fast" else build(name)
    for k in range(6):  # past SKFAC's first refresh and the ranks settling
        method.step(*batch(k), PhaseTimer(CPU))
    before = addresses(method)
    for k in range(6, 16):  # two more refreshes
        method.step(*batch(k), PhaseTimer(CPU))
    after = addresses(method)
    # SKFAC's window of measured roots is new each measuring step: only refreshes read it.
    moved = [p for p in before if p in after and after[p] != before[p] and ".history." not in p]
    assert not moved
    assert len(before) >= 4


def test_without_the_setting_a_refresh_rebinds_as_before() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    spec = get_method("kfac-fast")
    hparams = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 5}
    method = spec.build(Problem(model, "categorical"), hparams, MethodContext(None, 0, CPU))
    for k in range(3):
        method.step(*batch(k), PhaseTimer(CPU))
    old = method.curv[0].a_inv
    for k in range(3, 6):
        method.step(*batch(k), PhaseTimer(CPU))
    assert method.curv[0].a_inv is not old


def test_land_copies_into_a_matching_layout_and_reports_a_rebinding() -> None:
    class Holder:
        t: torch.Tensor | None = None
        inv: DampedInverse | None = None

    h = Holder()
    assert not land(h, "t", torch.ones(3), in_place=True)  # nothing there yet
    first = h.t
    assert not land(h, "t", torch.full((3,), 2.0), in_place=True)
    assert h.t is first and torch.equal(first, torch.full((3,), 2.0))
    assert land(h, "t", torch.ones(4), in_place=True)  # a new shape: rebound, graphs stale
    assert h.t is not first
    assert land(h, "t", torch.zeros(4), in_place=False)  # off: always rebinds
    inv = DampedInverse(torch.tensor(1.0), dense=torch.eye(2))
    land(h, "inv", inv, in_place=True)
    assert not land(h, "inv", DampedInverse(torch.tensor(3.0), dense=2 * torch.eye(2)), True)
    assert h.inv is inv and float(inv.damping) == 3.0 and torch.equal(inv.dense, 2 * torch.eye(2))
    wider = DampedInverse(torch.tensor(3.0), dense=torch.eye(2, dtype=torch.float64), float64=True)
    assert land(h, "inv", wider, in_place=True) and h.inv is wider


class Keyed(Method):
    """A method stand-in for the warm-up rule: a fixed key from step 2 on."""

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        return x.sum()

    def graph_key(self, step: int) -> Hashable | None:
        return "k" if step >= 2 else None

    def graph_replayed(self) -> None:
        pass


def test_a_key_is_replayed_only_after_its_warm_up_steps() -> None:
    graphs = StepGraphs(Keyed(), CPU)
    plans = [graphs.plan(step, 16) for step in range(2 + GRAPH_WARMUP + 1)]
    assert plans == [None] * (2 + GRAPH_WARMUP) + [("k", 16)]
    assert graphs.plan(9, 32) is None  # another batch size is another graph, warming up anew
    with pytest.raises(TypeError, match="graph_key"):  # a method that cannot be graphed
        StepGraphs(Method(), CPU)


def blobs(device: torch.device) -> Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (512,), generator=gen)
    x = torch.randn(512, 6, generator=gen) + y[:, None].float()
    x, y = x.to(device), y.to(device)
    return Splits(x[:256], y[:256], x[256:], y[256:], "synthetic")


def run(name: str, device: torch.device, graphed: bool, steps: int = 40) -> Any:
    method = build(name, device, ema_max=0.8) if name == "kfac-fast" else build(name, device)
    config = LoopConfig(
        batch_size=32,
        seed=0,
        max_steps=steps,
        max_seconds=None,
        eval_every=steps,
        log_every=5,
        train_eval_size=0,
        eval_size=0,
        cuda_graph=graphed,
    )
    return train(method.problem, method, blobs(device), config, metric="accuracy", reached=bool)


def test_on_a_cpu_the_setting_runs_every_step_eagerly() -> None:
    eager, graphed = run("kfac-fast", CPU, False), run("kfac-fast", CPU, True)
    assert graphed.graphed_steps == graphed.graphs_captured == 0
    assert [r["train_loss"] for r in graphed.curves] == [r["train_loss"] for r in eager.curves]


@pytest.mark.skipif(not CUDA, reason="needs CUDA: capture and replay of whole-step graphs")
@pytest.mark.parametrize("name", GRAPHED)
def test_graphed_training_follows_the_eager_trajectory(name: str) -> None:
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    eager, graphed = run(name, device, False), run(name, device, True)
    assert graphed.graphed_steps >= 20 and graphed.graphs_captured >= 1
    a = [r["train_loss"] for r in eager.curves if math.isfinite(r["train_loss"])]
    b = [r["train_loss"] for r in graphed.curves if math.isfinite(r["train_loss"])]
    assert a == pytest.approx(b, rel=1e-4)
    assert {s.phase for s in graphed.phases} >= {"step"}


def test_the_report_divides_eager_by_graphed_per_setting() -> None:
    def cell(opt: str, graph: bool, seed: int, steps: int, time_s: float, med: float) -> dict:
        return {
            "suite": "s", "workload": "w", "batch_size": 8, "compile": "off", "optimizer": opt,
            "setting": f"w {opt} bs=8" + (" cuda_graph" if graph else ""), "seed": seed,
            "status": "ok", "cuda_graph": graph, "graphed_steps": steps - 10 if graph else 0,
            "steps": steps, "train_time_s": time_s, "median_step_ms": med,
        }  # fmt: skip

    cells = pd.DataFrame(
        [
            cell("sgd", False, 0, 100, 1.0, 10.0),
            cell("sgd", False, 1, 100, 1.2, 12.0),
            cell("sgd", True, 0, 100, 0.5, 4.0),
            cell("sgd", True, 1, 100, 0.6, 6.0),
            cell("skfac", False, 0, 100, 2.0, 20.0),  # no graphed twin: no row
        ]
    )

    class Data:
        pass

    data = Data()
    data.cells = cells  # type: ignore[attr-defined]
    table = graph_table(data)  # type: ignore[arg-type]
    assert len(table) == 1
    row = table.iloc[0]
    assert row["eager_ms"] == pytest.approx(11.0) and row["graphed_ms"] == pytest.approx(5.5)
    assert row["speedup"] == pytest.approx(2.0) and row["speedup_median"] == pytest.approx(2.2)
    assert row["graphed_share"] == pytest.approx(0.9) and row["seeds"] == 2
