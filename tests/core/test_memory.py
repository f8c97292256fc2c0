"""Counting a method's state: each storage once under its first kind, the walk of a foreign
optimizer's state, the cells' memory columns (the out-of-memory request among them)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfacbench.core.memory import (
    STATE_KINDS,
    count_bytes,
    memory_columns,
    optimizer_state,
    state_mb,
    walk_tensors,
)


def test_count_bytes_counts_a_storage_once_under_its_first_kind() -> None:
    stack = torch.zeros(3, 4, 4)
    views = [stack[0], stack[1, :2, :2]]
    lone = torch.zeros(5, dtype=torch.float64)
    got = count_bytes([("factors", lone), ("inverses", views[0]), ("inverses", views[1])])
    assert got == {"factors": 40, "inverses": 3 * 16 * 4, "first_order": 0, "other": 0}
    assert count_bytes([("factors", lone), ("other", lone), ("other", None)])["other"] == 0
    with pytest.raises(ValueError, match="unknown state kind 'moments'"):
        count_bytes([("moments", lone)])
    assert set(count_bytes([])) == set(STATE_KINDS)
    sparse = torch.eye(3).to_sparse()  # no storage of its own: counted as the dense 3×3, once
    assert count_bytes([("other", sparse), ("other", sparse)])["other"] == 36


def test_state_mb_and_the_walk_of_a_foreign_state() -> None:
    assert state_mb({"factors": 2**20, "inverses": 2**19, "first_order": 2**21, "other": 0}) == (
        3.5,
        1.5,
    )
    assert all(math.isnan(v) for v in state_mb({}))

    class Holder:
        def __init__(self) -> None:
            self.statistics = [torch.zeros(2), torch.zeros(3)]
            self.model = nn.Linear(2, 2)  # a module is the model, not state

    found = list(walk_tensors({"pre": Holder(), "step": torch.tensor(1.0), 3: torch.zeros(1)}))
    assert [(path, t.numel()) for path, t in found] == [
        (("pre", "statistics"), 2),
        (("pre", "statistics"), 3),
        (("step",), 1),
        ((), 1),
    ]
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2, 2)
    opt.step()
    opt.state[p]["stats"] = {"L": torch.zeros(3, 3)}
    kinds = [(k, t.shape) for k, t in optimizer_state(opt, {("stats",): "factors"})]
    assert kinds == [("first_order", (2, 2)), ("factors", (3, 3))]


def test_memory_columns_of_a_failed_cell() -> None:
    error = "OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has ..."
    row = memory_columns(None, {}, "oom", error)
    assert row["oom_request_mb"] == 1536.0
    assert all(math.isnan(v) for k, v in row.items() if k != "oom_request_mb")
    assert math.isnan(memory_columns(None, {}, "error", error)["oom_request_mb"])
