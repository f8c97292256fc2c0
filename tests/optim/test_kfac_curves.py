"""K-FAC against a small SGD grid on CURVES: lower training loss in the same number of steps and
in the same wall-clock budget (issue 3's end-to-end check; about two minutes on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kfacbench.core.loop import LoopConfig, TrainResult, train
from kfacbench.core.method import Method
from kfacbench.core.problem import Problem
from kfacbench.optim.kfac import KFAC
from kfacbench.optim.sgd import SGD
from kfacbench.workloads import WORKLOADS

STEPS = 250
BATCH = 500


def run(
    make: type[SGD] | type[KFAC],
    cache: Path,
    steps: int | None,
    seconds: float | None,
    **hp: object,
) -> TrainResult:
    workload = WORKLOADS["curves_ae"]
    data = workload.load_data("real", cache_dir=cache)
    torch.manual_seed(0)
    problem = Problem(workload.build_model(torch.Generator().manual_seed(0)), "bernoulli")
    method: Method = make(problem, **hp)  # type: ignore[arg-type]
    config = LoopConfig(
        BATCH, 0, steps, seconds, eval_every=10_000, log_every=50, train_eval_size=5000
    )
    return train(problem, method, data, config, metric=workload.metric, reached=workload.reached)


@pytest.mark.slow
def test_kfac_beats_the_best_sgd_of_a_grid_per_step_and_per_second(tmp_path: Path) -> None:
    kfac = run(KFAC, tmp_path, STEPS, None, adapt_gamma=False)
    kfac_loss = kfac.final["final_train_loss"]
    grid = {"lr": [0.003, 0.01, 0.03]}
    same_steps = [
        run(SGD, tmp_path, STEPS, None, lr=lr, momentum=0.9, weight_decay=1e-5) for lr in grid["lr"]
    ]
    same_time = [
        run(SGD, tmp_path, None, kfac.train_time_s, lr=lr, momentum=0.9, weight_decay=1e-5)
        for lr in grid["lr"]
    ]
    best_steps = min(r.final["final_train_loss"] for r in same_steps)
    best_time = min(r.final["final_train_loss"] for r in same_time)
    assert all(r.steps > STEPS for r in same_time)  # SGD got more steps in the same time
    assert kfac_loss < best_steps and kfac_loss < best_time, (kfac_loss, best_steps, best_time)
