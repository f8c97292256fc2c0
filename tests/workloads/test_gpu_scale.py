"""The GPU-scale workloads through the training loop with every registered method, at their mini
sizes: a few steps end with finite losses, or the method refuses the workload in one line; bf16
autocast trains with one method per workload; the full sizes refuse real data in one line; the
``gpu_scale`` suite expands as documented and each of its methods runs its settings on a mini."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from kfacbench.core.loop import LoopConfig, TrainResult, train
from kfacbench.core.problem import Problem
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS, Method, MethodContext
from kfacbench.runner import DataCache, RunOptions, prepare_cell
from kfacbench.suite import load_suite
from kfacbench.workloads import GPU_SCALE, WORKLOADS

CPU = torch.device("cpu")
MINIS = tuple(GPU_SCALE.values())
STEPS = 3

REFUSED = {"kfac-tridiag": "structure = 'tridiag' needs a chain of Linear layers"}
"""Methods that cannot run these workloads, and the start of their one-line error."""


def run(workload: str, method: str, amp: str = "off") -> tuple[TrainResult, Method]:
    """``STEPS`` steps of batch 4 with the method's defaults (T_inv 2: refreshes at every step
    for K-FAC, whose first three steps refresh, and at two of three for the rest) and an eval
    of 8 test examples at the end. Divergence is off: this checks that the method runs the
    workload, not its tuning."""
    spec = METHODS[method]
    work = dataclasses.replace(WORKLOADS[workload], synthetic_sizes=(32, 8))
    problem = Problem(work.build_model(torch.Generator().manual_seed(0)), work.distribution, amp)  # type: ignore[arg-type]
    hp = {k: v.default for k, v in spec.hparams.items()}
    if spec.uses_inv_interval:
        hp["inv_interval"] = 2
    built = spec.build(problem, hp, MethodContext(STEPS, 0, CPU))
    config = LoopConfig(
        batch_size=4,
        seed=0,
        max_steps=STEPS,
        max_seconds=None,
        eval_every=STEPS,
        log_every=1,
        train_eval_size=0,
        eval_size=8,
        diverge_factor=math.inf,
    )
    data = work.load_data("synthetic")
    return train(problem, built, data, config, metric=work.metric, reached=work.reached), built


def curvature_tensors(state: Any) -> list[torch.Tensor]:
    """Every tensor held in a method's per-layer curvature state (dataclasses, deques, tuples)."""
    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        values = [getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "layer"]
        return [t for v in values for t in curvature_tensors(v)]
    if isinstance(state, list | tuple) or type(state).__name__ == "deque":
        return [t for v in state for t in curvature_tensors(v)]
    return []


@pytest.fixture
def peer(request: pytest.FixtureRequest) -> ModuleType | None:
    """Makes a peer importable, or skips where its package is missing: ASDL (the ``peers``
    extra) must be installed; KAISA comes from the ``kaisa`` fixture (installed or its source)."""
    name = request.node.callspec.params["method"]
    if name.startswith("asdl-") and importlib.util.find_spec("asdl") is None:
        pytest.skip("the ASDL peers need the asdfghjkl package (the peers extra)")
    if name == "kaisa-kfac":
        return request.getfixturevalue("kaisa")  # type: ignore[no-any-return]
    return None


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("workload", MINIS)
def test_every_method_trains_every_mini_or_refuses_it_in_one_line(
    workload: str, method: str, peer: ModuleType | None
) -> None:
    package = {"singd": "singd", "shampoo": "pytorch_optimizer", "soap": "pytorch_optimizer"}
    if method in package and importlib.util.find_spec(package[method]) is None:
        pytest.skip(f"{method} needs the peers extra")
    if method in REFUSED:
        with pytest.raises(KfacbenchError) as info:
            run(workload, method)
        assert str(info.value).startswith(REFUSED[method]) and "\n" not in str(info.value)
        return
    result, _ = run(workload, method)
    assert result.status == "ok" and result.steps == STEPS
    losses = [row["train_loss"] for row in result.curves[1:]]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(result.final["final_eval_loss"])
    assert math.isfinite(result.final["final_eval_metric"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workload", "method"),
    [
        ("imagenet_resnet50_mini", "kfac-fast"),
        ("imagenet_vit_mini", "skfac"),
        ("gpt2_mini", "kfac-fast"),
    ],
)
def test_bf16_autocast_trains_with_curvature_in_float32(workload: str, method: str) -> None:
    """The forward runs in bf16 (the loss differs from float32's) while K-FAC's and SKFAC's
    factors, roots and inverses stay float32 and the losses finite."""
    (off, _), (bf16, built) = run(workload, method), run(workload, method, amp="bf16")
    assert bf16.status == "ok"
    state = built.curv if method == "kfac-fast" else built.roots  # type: ignore[attr-defined]
    tensors = curvature_tensors(state)
    assert tensors and {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}
    losses = [row["train_loss"] for row in bf16.curves[1:]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] != off.curves[1]["train_loss"]  # the first step's forward was bf16
    assert losses[0] == pytest.approx(off.curves[1]["train_loss"], rel=0.02)


@pytest.mark.parametrize(
    "method", ["kfac-fast", "skfac", "singd", "kaisa-kfac", "asdl-kfac", "asdl-skfac"]
)
def test_every_curvature_method_leaves_the_tied_output_layer_to_the_identity(
    method: str, peer: ModuleType | None
) -> None:
    """GPT-2's output layer shares the token embedding's matrix: no method gives it a
    vocab × vocab factor (see kfacbench.optim.capture.find_layers); each names it."""
    if method == "singd" and importlib.util.find_spec("singd") is None:
        pytest.skip("singd needs the peers extra")
    spec = METHODS[method]
    model = WORKLOADS["gpt2_mini"].build_model(torch.Generator())
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 2}
    info = spec.build(Problem(model, "categorical"), hp, MethodContext(None, 0, CPU)).info()
    assert {"tokens", "head"} <= set(info["identity_preconditioner"])
    assert "head" not in info.get("preconditioned", [])


def test_the_asdl_peers_refuse_bf16_in_one_line() -> None:
    if importlib.util.find_spec("asdl") is None:
        pytest.skip("the ASDL peers need the asdfghjkl package (the peers extra)")
    with pytest.raises(KfacbenchError, match=r"^ASDL keeps its factors .* amp = 'off'"):
        run("gpt2_mini", "asdl-kfac", amp="bf16")


@pytest.mark.parametrize("name", GPU_SCALE)
def test_gpu_scale_workloads_have_minis_and_refuse_real_data(name: str) -> None:
    workload, mini = WORKLOADS[name], WORKLOADS[GPU_SCALE[name]]
    assert (mini.metric, mini.distribution) == (workload.metric, workload.distribution)
    assert "provisional" in workload.target_note
    with pytest.raises(KfacbenchError) as info:
        workload.load_data("real")
    message = str(info.value)
    assert name in message and 'data = "synthetic"' in message and "\n" not in message


@pytest.mark.slow
def test_the_gpu_scale_suite_expands_and_runs_its_settings_on_a_mini() -> None:
    """39 cells: every method on ResNet-50 at batch 32, 128 and 256, ViT-S/16 at 128 and GPT-2
    small at 8 (SKFAC's subsample cell only where there are convs), all bf16 on synthetic data.
    Each optimizer's settings then take two steps through the runner on the ViT mini (the
    cheapest twin with a conv and shared Linear layers)."""
    path = Path(__file__).resolve().parents[2] / "suites" / "gpu_scale.toml"
    cells = load_suite(path, workloads=WORKLOADS, methods=METHODS).cells
    assert len(cells) == 39
    assert {(c.settings.amp, c.settings.data) for c in cells} == {("bf16", "synthetic")}
    methods = {"sgd", "adamw", "kfac-fast", "skfac", "singd", "shampoo", "soap"}
    for workload, batches in [
        ("imagenet_resnet50", {32, 128, 256}),
        ("imagenet_vit_s16", {128}),
        ("gpt2_small", {8}),
    ]:
        mine = [c for c in cells if c.workload == workload]
        assert {c.optimizer for c in mine} == methods
        assert {c.batch_size for c in mine} == batches
        reductions = {c.hparams["reduction"] for c in mine if c.optimizer == "skfac"}
        assert reductions == ({"sum"} if workload == "gpt2_small" else {"sum", "subsample"})
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        key = (cell.optimizer, json.dumps(dict(cell.hparams), sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        settings = dataclasses.replace(cell.settings, device="cpu", max_steps=2, log_every=1)
        twin = dataclasses.replace(
            cell, workload="imagenet_vit_mini", batch_size=4, settings=settings
        )
        p = prepare_cell(twin, CPU, DataCache(RunOptions()))
        result = train(
            p.problem, p.method, p.splits, p.config, metric="accuracy", reached=lambda v: False
        )
        assert result.status == "ok", (cell.label, result.reason)
    assert len(seen) == 8
