"""KAISA's K-FAC (gpauloski/kfac-pytorch) as the ``kaisa-kfac`` peer: it trains through the core
and the runner with its phases named, its factors are kfacbench's on KAISA's scale, its step is
the damped Kronecker solve computed here by brute force, and without KAISA the build fails with
one line saying how to install it.

KAISA is not on PyPI. These tests import it where it is installed, or else from the unmodified
source kept next to the repository (``../shared/peers/kfac-pytorch``), and skip visibly where
neither exists (the ``kaisa`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

from kfacbench import cli
from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import MethodContext, get_method
from kfacbench.report.data import load_runs
from kfacbench.report.tables import peer_table
from kfacbench.runs.rundir import load_tables
from kfacbench.workloads import WORKLOADS
from kfacbench.workloads.transformer import byte_gpt

CPU = torch.device("cpu")


def build(problem: Problem, inv_interval: int = 1, **hp: Any) -> Any:
    spec = get_method("kaisa-kfac")
    params = {k: v.default for k, v in spec.hparams.items()} | hp | {"inv_interval": inv_interval}
    return spec.build(problem, params, MethodContext(None, 0, CPU))


def classifier(first: nn.Module) -> nn.Module:
    """``first`` (a conv on 2×6×6 inputs with 4 output channels), BatchNorm, and two Linear
    layers: the classifier tests/optim/peers/test_asdl.py trains the ASDL peers on."""
    torch.manual_seed(0)
    return nn.Sequential(
        first,
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


def classes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.randn(n, 2, 6, 6, generator=gen) + y[:, None, None, None].float(), y


def test_kaisa_trains_curves_ae_through_the_core_with_its_phases(kaisa: ModuleType) -> None:
    """The CURVES autoencoder (synthetic data) trains; KAISA's step is ``inverse`` on its refresh
    steps and ``precondition`` on the others; its curvature lands in forward and backward."""
    workload = WORKLOADS["curves_ae"]
    problem = Problem(workload.build_model(torch.Generator().manual_seed(0)), "bernoulli")
    method = build(problem, inv_interval=10, lr=0.01)
    data = workload.load_data("synthetic")
    config = LoopConfig(100, 0, 30, None, 30, 10, 500, 500)
    result = train(problem, method, data, config, metric="recon_error", reached=lambda v: False)
    assert result.status == "ok"
    first, last = result.curves[1]["train_loss"], result.curves[-1]["train_loss"]
    assert last < 0.9 * first
    calls = {p.phase: p.calls for p in result.phases}
    assert calls == {
        "forward": 30,
        "backward": 30,
        "inverse": 3,  # steps 0, 10, 20
        "precondition": 27,
        "update": 30,
        "step": 30,
    }
    info = method.info()
    assert info["peer"] == "kfac.preconditioner.KFACPreconditioner"
    assert info["version"] == importlib.metadata.version("kfac-pytorch")
    assert info["compute_method"] == "eigen" and info["fisher"].startswith("empirical")
    linear = [n for n, m in problem.model.named_modules() if isinstance(m, nn.Linear)]
    assert info["preconditioned"] == linear and info["identity_preconditioner"] == []


def test_kaisa_leaves_batchnorm_and_convs_it_cannot_unfold_to_sgd(kaisa: ModuleType) -> None:
    """BatchNorm is not KAISA's, and a dilated conv would get wrong patches from its im2col:
    both keep their gradient (plain SGD), move, and are named; the rest is preconditioned."""
    for first, skipped in [
        (nn.Conv2d(2, 4, 3, padding=1), ["1"]),
        (nn.Conv2d(2, 4, 3, padding=2, dilation=2), ["0", "1"]),
    ]:
        model = classifier(first)
        method = build(Problem(model, "categorical"), inv_interval=3, lr=0.05, damping=0.01)
        bn = model[1].weight.detach().clone()
        x, y = classes(256)
        timer = PhaseTimer(CPU)
        losses = [float(method.step(x[k % 8 :: 8], y[k % 8 :: 8], timer)) for k in range(24)]
        assert losses[-1] < 0.8 * losses[0], losses
        info = method.info()
        assert info["identity_preconditioner"] == skipped
        assert info["preconditioned"] == [n for n in ("0", "4", "6") if n not in skipped]
        assert not torch.equal(model[1].weight, bn)


def test_kaisa_trains_a_sequence_model(kaisa: ModuleType) -> None:
    """A tiny GPT: Linear layers over (batch, positions, features) inputs, positions taken as
    extra examples; embeddings and layer norms move by SGD."""
    model = byte_gpt(context=8, width=16, depth=1, heads=2, generator=torch.Generator())
    x = torch.randint(256, (8, 8), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    method = build(Problem(model, "categorical"), inv_interval=3, lr=0.05)
    timer = PhaseTimer(CPU)
    losses = [float(method.step(x, y, timer)) for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0], losses
    assert {"tokens", "positions", "ln_f"} <= set(method.info()["identity_preconditioner"])


@pytest.mark.parametrize(("early", "refreshes"), [(False, [0, 5, 10]), (True, [0, 1, 2, 5, 10])])
def test_kaisa_refreshes_as_shipped_or_as_kfacbench(
    kaisa: ModuleType, early: bool, refreshes: list[int]
) -> None:
    """Every T steps from step 0 (KAISA), or also at steps 1 and 2 (kfacbench's K-FAC)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    method = build(Problem(model, "categorical"), inv_interval=5, early_refreshes=early)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    seen = []
    for k in range(12):
        timer = PhaseTimer(CPU)
        method.step(x, y, timer)
        if "inverse" in timer.phases():
            seen.append(k)
    assert seen == refreshes


def test_kaisa_factors_are_kfacbench_factors_on_the_mean_loss_scale(kaisa: ModuleType) -> None:
    """The empirical factors of a conv and a Linear layer, averaged over three batches with the
    1/k start and compared with kfac-fast's (float64, lr 0 so that both see the same weights):
    Linear A = Ā, G = G_kfacbench/m²; conv (T positions) A = Ā/T², G = G_kfacbench/(m²T³)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 3)
    ).double()
    m, positions = 16, 36
    spec = get_method("kfac-fast")
    hp = {k: v.default for k, v in spec.hparams.items()}
    hp |= {"lr": 0.0, "fisher": "empirical", "inv_interval": 1}
    ours: Any = spec.build(
        Problem(copy.deepcopy(model), "categorical"), hp, MethodContext(None, 0, CPU)
    )
    theirs = build(Problem(model, "categorical"), lr=0.0, ema_start="one-over-k")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(m, 2, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (m,), generator=gen)
        ours.step(x, y, PhaseTimer(CPU))
        theirs.step(x, y, PhaseTimer(CPU))
    factors = theirs.preconditioner.state_dict()["layers"]
    scales = {"0": (positions**2, m**2 * positions**3), "3": (1, m**2)}
    assert sorted(factors) == sorted(scales) == sorted(c.layer.name for c in ours.curv)
    for c in ours.curv:
        a_scale, g_scale = scales[c.layer.name]
        kaisa_a, kaisa_g = factors[c.layer.name]["A"], factors[c.layer.name]["G"]
        torch.testing.assert_close(kaisa_a * a_scale, c.a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(kaisa_g * g_scale, c.g, rtol=1e-9, atol=1e-12)


def layer_statistics(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per Linear layer of ``model``, by hand: A = āᵀā/m (ā with a trailing 1), G = gᵀg/m with g
    the *mean* loss's output gradients (KAISA's scale), and the gradient matrix V = [∇W | ∇b]."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        inputs.append(args[0].detach())
        out.retain_grad()
        outputs.append(out)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hooks = [layer.register_forward_hook(keep) for layer in linears]
    model.zero_grad()
    Problem(model, "categorical").loss(model(x), y).backward()
    for hook in hooks:
        hook.remove()
    stats = []
    for layer, a, out in zip(linears, inputs, outputs, strict=True):
        m = a.shape[0]
        a1 = torch.cat([a, torch.ones(m, 1, dtype=a.dtype)], dim=1)
        g = out.grad
        assert g is not None and layer.weight.grad is not None and layer.bias.grad is not None
        v = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
        stats.append((a1.T @ a1 / m, g.T @ g / m, v))
    return stats


def moves(before: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    """Per Linear layer of a chain of them, how far the step moved [W | b]: before − after."""
    moved = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    return [
        torch.cat([w, b[:, None]], dim=1) for w, b in zip(moved[0::2], moved[1::2], strict=True)
    ]


@pytest.mark.parametrize("inverse_method", ["eigh", "inv"])
def test_kaisa_step_is_the_damped_kronecker_solve(kaisa: ModuleType, inverse_method: str) -> None:
    """One step (lr 1, no momentum, the first factors = the batch's) moves each Linear layer by
    x with (G ⊗ A + λI) vec(x) = vec(V) (eigh: λ on the Kronecker product, solved densely here),
    or x = (G + λI)⁻¹ V (A + λI)⁻¹ (inv: λ on each factor). λ is set where it and the curvature
    both matter, so that neither a damping-only nor a curvature-only formula would pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    stats = layer_statistics(model, x, y)
    # A tenth of the smallest layer's largest Kronecker eigenvalue.
    lam = 0.1 * min(float(torch.linalg.eigvalsh(torch.kron(g, a))[-1]) for a, g, _ in stats)
    expected = []
    for a, g, v in stats:
        if inverse_method == "eigh":
            eye = torch.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
            step = torch.linalg.solve(torch.kron(g, a) + lam * eye, v.flatten()).view_as(v)
        else:
            step = torch.linalg.solve(
                g + lam * torch.eye(g.shape[0], dtype=g.dtype),
                v @ torch.linalg.inv(a + lam * torch.eye(a.shape[0], dtype=a.dtype)),
            )
        assert (step - v / lam).norm() > 0.2 * (v / lam).norm()  # the curvature matters
        expected.append(step)
    before = [p.detach().clone() for p in model.parameters()]
    method = build(
        Problem(model, "categorical"),
        lr=1.0,
        momentum=0.0,
        damping=lam,
        ema_start="one-over-k",
        inverse_method=inverse_method,
    )
    method.step(x, y, PhaseTimer(CPU))
    for step, got in zip(expected, moves(before, model), strict=True):
        # KAISA decomposes and inverts in float32 (inv_dtype), whatever the model's dtype.
        torch.testing.assert_close(got, step, rtol=0, atol=1e-4 * float(step.abs().max()))


def test_kaisa_kl_clip_scales_the_step_and_zero_turns_it_off(kaisa: ModuleType) -> None:
    """With kl_clip c every preconditioned layer's step is scaled by min(1, √(c / |lr² Σ ĝ·g|)),
    from the preconditioned ĝ and the raw g; 0 leaves the step as it is."""
    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    lr = 0.5
    raw = [v for _, _, v in layer_statistics(copy.deepcopy(start), x, y)]
    steps = []
    for clip in (0.0, 1e-6):
        model = copy.deepcopy(start)
        method = build(Problem(model, "categorical"), lr=lr, momentum=0.0, kl_clip=clip)
        method.step(x, y, PhaseTimer(CPU))
        steps.append(moves([p.detach() for p in start.parameters()], model))
    free, clipped = steps
    # The free step is lr·ĝ (first SGD step, no momentum): lr² Σ ĝ·g = lr Σ step·g.
    vg = lr * sum(float((s * g).sum()) for s, g in zip(free, raw, strict=True))
    scale = min(1.0, (1e-6 / abs(vg)) ** 0.5)
    assert scale < 0.5  # the clip is active
    for f, c in zip(free, clipped, strict=True):
        torch.testing.assert_close(c, scale * f, rtol=1e-4, atol=0)


RUN_SUITE = """
name = "kaisa"
[defaults]
device = "cpu"
data = "synthetic"
max_steps = 6
eval_every = 6
log_every = 3
train_eval_size = 200
eval_size = 200
[sweep]
workload = ["curves_ae"]
batch_size = [50]
inv_interval = [3]
[optimizers.kfac-fast]
lr = 0.01
fisher = ["empirical", "sampled"]
inverse_method = "eigh"
[optimizers.kaisa-kfac]
lr = 0.01
damping = 1.0
ema_start = "one-over-k"
early_refreshes = true
"""


def test_kaisa_runs_through_the_runner_and_pairs_with_kfac_fast(
    kaisa: ModuleType, tmp_path: Path
) -> None:
    """A suite with kaisa-kfac runs end to end; the report's peer table pairs it with the
    kfac-fast cell at the same settings (empirical Fisher), never with the sampled one."""
    suite = tmp_path / "kaisa.toml"
    suite.write_text(RUN_SUITE)
    out = tmp_path / "out"
    assert cli.main(["run", str(suite), "--out", str(out)]) == 0
    (run_dir,) = (out / "kaisa").iterdir()
    tables = load_tables(run_dir)
    cells = tables["cells"]
    assert set(cells["status"]) == {"ok"} and len(cells) == 3
    kaisa_cell = cells[cells["optimizer"] == "kaisa-kfac"].iloc[0]
    info = json.loads(kaisa_cell["method_info"])
    assert info["peer"] == "kfac.preconditioner.KFACPreconditioner"
    phases = tables["phases"]
    mine = phases[phases["cell_id"] == kaisa_cell["cell_id"]].set_index("phase")["calls"]
    assert mine["inverse"] == 4 and mine["precondition"] == 2  # steps 0, 1, 2, 3 refresh
    table = peer_table(load_runs([run_dir]))
    assert len(table) == 1, table
    row = table.iloc[0]
    assert "kaisa-kfac" in row["peer"] and "kfac-fast" in row["kfacbench"]
    assert "fisher=empirical" in row["kfacbench"]


@pytest.mark.parametrize(
    ("inverse_method", "inverses"), [("eigh", 119 + 5 * 7 + 3 * 6), ("inv", 119)]
)
def test_kaisa_state_is_counted_by_kind(
    kaisa: ModuleType, inverse_method: str, inverses: int
) -> None:
    """A 6-5-3 MLP: KAISA's factors fold the bias into A (7², 6²; G 5², 3²: 119 elements);
    eigen keeps Q_A, Q_G and the outer product of their eigenvalues (5·7 + 3·6 more than the
    factors), inverse the two inverses. SGD's momentum: 53 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    method = build(Problem(model, "categorical"), inverse_method=inverse_method)
    for _ in range(2):
        method.step(*classes_of(8, 6), PhaseTimer(CPU))
    state = method.state_bytes()
    assert (state["factors"], state["inverses"], state["first_order"]) == (
        4 * 119,
        4 * inverses,
        4 * 53,
    )


def classes_of(m: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(m, width, generator=gen), torch.randint(0, 3, (m,), generator=gen)


def test_a_missing_kaisa_is_one_line_naming_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Needs no KAISA: a ``None`` in sys.modules makes its import fail as if it were absent."""
    monkeypatch.setitem(sys.modules, "kfac", None)
    monkeypatch.setitem(sys.modules, "kfac.preconditioner", None)
    with pytest.raises(KfacbenchError) as err:
        build(Problem(nn.Linear(4, 3), "categorical"))
    message = str(err.value)
    assert "git+https://github.com/gpauloski/kfac-pytorch" in message and "\n" not in message


def test_kaisa_refuses_data_parallel_runs() -> None:
    spec = get_method("kaisa-kfac")
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 3}
    problem = Problem(nn.Linear(4, 3), "categorical")
    with pytest.raises(KfacbenchError, match="one process"):
        spec.build(problem, hp, MethodContext(None, 0, CPU, dist=object()))  # type: ignore[arg-type]
