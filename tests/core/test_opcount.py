"""Ops per step and phase (the launch-cost proxy): what counts, and K-FAC-fast's budget."""

from __future__ import annotations

import math

import pytest
import torch

from kfacbench.core.opcount import PROBE_STEPS, OpCountingTimer, PhaseOps, launches, phase_ops
from kfacbench.optim import METHODS
from kfacbench.optim.capture import find_layers
from kfacbench.runner import DataCache, RunOptions, probe_ops
from kfacbench.suite import parse_suite
from kfacbench.workloads import WORKLOADS, get_workload

CPU = torch.device("cpu")
aten = torch.ops.aten


def test_views_and_allocations_launch_nothing() -> None:
    for op in (
        aten.view.default,
        aten.t.default,
        aten.transpose.int,
        aten.expand.default,
        aten.as_strided.default,
        aten.detach.default,
        aten._unsafe_view.default,
        aten.alias.default,
        aten.slice.Tensor,
        aten.select.int,
        aten.unsqueeze.default,
        aten.squeeze.dim,
        aten.permute.default,
        aten.split.Tensor,
        aten.empty.memory_format,
        aten.empty_like.default,
        aten.new_empty.default,
    ):
        assert not launches(op), op
    for op in (aten.mm.default, aten.mm.out, aten.add.Tensor, aten.add_.Tensor, aten.copy_.default):
        assert launches(op), op


def test_a_matmul_plus_bias_is_two_ops_and_views_are_none() -> None:
    """x @ w + b is ``mm`` and ``add`` (``matmul`` decomposes into ``mm`` before the counter
    sees it). The views after it (view, slice, unsqueeze, expand, t, detach) launch nothing, an
    in-place add is one op, an allocation and an op on no elements none, and ops outside every
    phase are no step's."""
    x, w, b = torch.ones(4, 2), torch.ones(2, 3), torch.ones(3)
    timer = OpCountingTimer(CPU)
    with timer.counting():
        torch.zeros(3)  # outside the step: not counted
        with timer.step():
            with timer.phase("forward"):
                y = x @ w + b
            y.view(-1)[:3].unsqueeze(0).expand(2, 3).t().detach()  # in the step, between phases
            with timer.phase("update"):
                y.add_(1.0)
                torch.empty(3)
                y[4:].zero_()  # no rows: no kernel
        with timer.step(), timer.phase("update"):
            y.view(-1)  # ran, launched nothing
    assert timer.steps == [{"step": 3, "forward": 2, "update": 1}, {"step": 0, "update": 0}]
    assert float(y[0, 0]) == 4.0  # the ops ran as usual


def test_an_op_counts_in_every_phase_open_around_it() -> None:
    timer = OpCountingTimer(CPU)
    with timer.counting(), timer.step(), timer.phase("rescale"):
        torch.ones(2).neg()  # ones and neg
        with timer.phase("rescale"), timer.phase("inner"):  # a phase nested in itself: once
            torch.ones(2)
    assert timer.steps == [{"step": 3, "rescale": 3, "inner": 1}]


def test_refresh_steps_are_counted_apart_from_plain_steps() -> None:
    """Three refresh steps (``inverse`` ran) and three plain ones, one of which runs an extra
    phase: medians per kind, 0 in a step the phase skipped, NaN where a kind never ran it."""
    steps = [
        {"step": 50, "forward": 10, "inverse": 30},
        {"step": 52, "forward": 10, "inverse": 32},
        {"step": 51, "forward": 10, "inverse": 31},
        {"step": 20, "forward": 10},
        {"step": 27, "forward": 10, "rescale": 7},
        {"step": 21, "forward": 11},
    ]
    ops = phase_ops(steps)
    assert list(ops) == ["step", "forward", "inverse", "rescale"]
    assert ops["step"] == PhaseOps(ops_per_step=21.0, refresh_ops=51.0)
    assert ops["forward"] == PhaseOps(10.0, 10.0)
    assert math.isnan(ops["inverse"].ops_per_step) and ops["inverse"].refresh_ops == 31.0
    assert ops["rescale"].ops_per_step == 0.0 and math.isnan(ops["rescale"].refresh_ops)
    assert phase_ops([]) == {}


OPS_PER_LAYER = 19
"""C: the ops a plain K-FAC-fast step may add to SGD's per preconditioned layer (derivation in
:func:`test_kfac_fast_adds_at_most_c_ops_per_layer_to_sgd`)."""


@pytest.mark.slow
def test_kfac_fast_adds_at_most_c_ops_per_layer_to_sgd() -> None:
    """K-FAC-fast's plain step (no refresh) launches at most SGD's ops + C per preconditioned
    layer: the GPU launch budget of its autoencoder steps, pinned on the CPU.

    Forward and backward are SGD's own: the capture hooks keep references and launch nothing.
    What a plain step adds, per layer (mnist_ae: 8 Linear layers, 784-1000-500-250-30 mirrored):

    - 6 fixed ops: ā's ones column (``pad``); Ā and G divided by their row counts (2);
      the gradient matrix [W | b] (``cat``) and G⁻¹ V Ā⁻¹ (2 GEMMs); the preconditioned
      gradient goes to the SGD update as it is (views of it, no negation);
    - at most 2 for the sampled-Fisher backward pass down to the layer's output (the input
      gradient of the layer above, and the sigmoid's backward between): 13 for 8 layers;
    - the two factor products: one GEMM for a side narrower than 256, four block GEMMs of the
      upper triangle and three mirror copies for a wider one (the fourth copy is empty):
      mnist_ae has 10 wide sides of 16, so (10·7 + 6·1)/8 = 9.5 per layer;
    - per step, shared by the layers: sampling the targets (3), their per-example loss and sum
      (3), its backward (4) and the factors' moving average (one fused lerp): 11, 1.375 per
      layer.

    So C = ⌈6 + 2 + 9.5 + 1.375⌉ = 19. Measured (CPU, 2026-12-07): SGD 56 ops (forward 17,
    backward 34, update 3, the minibatch gather 2), K-FAC-fast 204, 148 more on 8 layers (18.5
    each). The 4 ops of slack are fewer than the 8 layers: one more op per layer breaks the pin
    (the double negation this pin found cost 4 per layer: 236 ops).
    The factor products are the CPU's path; a device where K-FAC forms its factors otherwise
    counts its own.
    """
    spec = {
        "defaults": {"device": "cpu", "data": "synthetic", "max_steps": PROBE_STEPS},
        "sweep": {"workload": ["mnist_ae"], "batch_size": [64], "inv_interval": [20]},
        "optimizers": {"sgd": {}, "kfac-fast": {}},
    }
    suite = parse_suite(
        spec, source="<test>", workloads=WORKLOADS, methods=METHODS, name_default="t"
    )
    data = DataCache(RunOptions())
    ops = {cell.optimizer: probe_ops(cell, CPU, data, PROBE_STEPS) for cell in suite.cells}
    sgd, kfac = ops["sgd"], ops["kfac-fast"]
    layers, _ = find_layers(get_workload("mnist_ae").build_model(torch.Generator().manual_seed(0)))
    assert len(layers) == 8
    for phase in ("forward", "backward"):
        assert kfac[phase].ops_per_step == sgd[phase].ops_per_step, phase
    budget = sgd["step"].ops_per_step + OPS_PER_LAYER * len(layers)
    assert kfac["step"].ops_per_step <= budget, {p: o.ops_per_step for p, o in kfac.items()}
    assert not math.isnan(kfac["step"].refresh_ops)  # the probe saw both kinds of step
