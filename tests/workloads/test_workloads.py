"""The workload registry: every workload builds, runs a step, and SGD learns CURVES."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim.sgd import SGD
from kfacbench.workloads import GPU_SCALE, LANGUAGE_METRICS, WORKLOADS, get_workload

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", sorted(set(WORKLOADS) - set(GPU_SCALE)))
def test_every_workload_builds_and_steps_on_synthetic_data(name: str) -> None:
    # Small synthetic sets keep this fast; the shapes are what is checked. The GPU-scale
    # workloads step through their mini twins (tests/workloads/test_gpu_scale.py).
    workload = dataclasses.replace(WORKLOADS[name], synthetic_sizes=(64, 32))
    data = workload.load_data("synthetic")
    assert data.source == "synthetic"
    assert tuple(data.train_x.shape[1:]) == workload.input_shape
    model = workload.build_model(torch.Generator().manual_seed(0))
    problem = Problem(model, workload.distribution)
    out = problem.forward(data.train_x[:8])
    if workload.metric in LANGUAGE_METRICS:  # a language model: logits at every position
        assert out.shape == (8, *workload.input_shape, workload.num_classes)
    elif workload.num_classes:
        assert out.shape == (8, workload.num_classes)
    else:
        assert out.shape == data.train_y[:8].shape
    loss = SGD(problem, lr=0.01).step(data.train_x[:8], data.train_y[:8], PhaseTimer(CPU))
    assert math.isfinite(float(loss))


def test_models_are_seeded() -> None:
    for name in ("curves_ae", "cifar10_resnet20", *GPU_SCALE.values()):
        build = WORKLOADS[name].build_model
        a, b, c = (build(torch.Generator().manual_seed(s)) for s in (0, 0, 1))
        pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_unknown_workload_names_the_known_ones() -> None:
    with pytest.raises(KfacbenchError, match="unknown workload 'nope'; known: curves_ae"):
        get_workload("nope")


def test_missing_real_data_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KFACBENCH_DATA", raising=False)
    with pytest.raises(KfacbenchError) as info:
        WORKLOADS["cifar10_resnet20"].load_data("real", tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and "cifar" in message.lower()


def test_sgd_loss_falls_on_curves(tmp_path: Path) -> None:
    workload = WORKLOADS["curves_ae"]
    data = workload.load_data("real", cache_dir=tmp_path)
    assert data.source.startswith("generated:curves")
    model = workload.build_model(torch.Generator().manual_seed(0))
    problem = Problem(model, workload.distribution)
    config = LoopConfig(
        batch_size=100,
        seed=0,
        max_steps=300,
        max_seconds=None,
        eval_every=300,
        log_every=50,
        train_eval_size=2000,
    )
    result = train(
        problem,
        SGD(problem, lr=0.01, momentum=0.9, weight_decay=1e-5),
        data,
        config,
        metric=workload.metric,
        reached=workload.reached,
    )
    first, last = result.curves[0], result.curves[-1]
    assert result.status == "ok"
    assert last["train_eval_loss"] < 0.9 * first["train_eval_loss"]
    assert last["eval_metric"] < 0.9 * first["eval_metric"]
