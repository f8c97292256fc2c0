"""SINGD, Shampoo and SOAP adapters: each trains, reports its version, and without its package
fails with one line naming the extra (skipped, visibly, where the package is missing)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import MethodContext, get_method
from kfacbench.optim.peers import modern
from kfacbench.workloads.transformer import byte_gpt

CPU = torch.device("cpu")
PACKAGES = {"singd": "singd", "shampoo": "pytorch_optimizer", "soap": "pytorch_optimizer"}
HPARAMS: dict[str, dict[str, Any]] = {
    "singd": {"lr": 0.05},
    "shampoo": {"lr": 0.05},
    "soap": {"lr": 0.01},
}


def needs(name: str) -> pytest.MarkDecorator:
    module = PACKAGES[name]
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(
        missing, reason=f"{module} not installed: pip install 'kfacbench[peers]'"
    )


def build(name: str, problem: Problem, inv_interval: int = 3, **hparams: Any) -> Any:
    spec = get_method(name)
    hp = {k: v.default for k, v in spec.hparams.items()} | HPARAMS[name] | hparams
    return spec.build(problem, hp | {"inv_interval": inv_interval}, MethodContext(None, 0, CPU))


def mlp_problem() -> tuple[Problem, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 4))
    x = torch.randn(64, 10)
    y = (x[:, :4].argmax(1) + x[:, 4:8].argmax(1)) % 4
    return Problem(model, "categorical"), x, y


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in PACKAGES])
def test_peer_trains_a_classifier_and_records_its_version(name: str) -> None:
    problem, x, y = mlp_problem()
    method = build(name, problem)
    timer = PhaseTimer(CPU)
    losses = [float(method.step(x, y, timer)) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0]
    timer.flush()
    assert {"forward", "backward", "update"} <= set(timer.phases())
    info = method.info()
    assert info["version"] not in ("", "unknown")


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in PACKAGES])
def test_peer_trains_a_sequence_model(name: str) -> None:
    model = byte_gpt(context=8, width=16, depth=1, heads=2, generator=torch.Generator())
    x = torch.randint(256, (8, 8), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    method = build(name, Problem(model, "categorical"))
    timer = PhaseTimer(CPU)
    losses = [float(method.step(x, y, timer)) for _ in range(12)]
    assert losses[-1] < 0.9 * losses[0]


@needs("singd")
@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_singd_leaves_other_modules_to_sgd_and_averages_per_token(weight_sharing: str) -> None:
    """SINGD covers the Linear layers; embeddings and layer norms move by SGD (passed to SINGD
    they would never move) and are named; a per-token loss sets loss_average per token."""
    model = byte_gpt(context=8, width=16, depth=1, heads=2, generator=torch.Generator())
    before = model.tokens.weight.detach().clone()
    method = build("singd", Problem(model, "categorical"), weight_sharing=weight_sharing)
    x = torch.randint(256, (4, 8), generator=torch.Generator().manual_seed(0))
    method.step(x, torch.roll(x, -1, dims=1), PhaseTimer(CPU))
    info = method.info()
    assert {"tokens", "positions", "blocks.0.ln1", "ln_f"} <= set(info["identity_preconditioner"])
    assert "head" not in info["identity_preconditioner"]
    assert info["loss_average"] == "batch+sequence"
    assert not torch.equal(model.tokens.weight, before)


@needs("singd")
def test_singd_averages_per_example_for_vector_outputs() -> None:
    problem, x, y = mlp_problem()
    method = build("singd", problem)
    method.step(x, y, PhaseTimer(CPU))
    assert method.info()["loss_average"] == "batch"


@pytest.mark.parametrize("name", list(PACKAGES))
def test_missing_package_is_one_line_naming_the_extra(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.import_module

    def without(module: str, *args: Any) -> Any:
        if module.split(".")[0] in ("singd", "pytorch_optimizer"):
            raise ImportError(module)
        return real(module, *args)

    monkeypatch.setattr(modern.importlib, "import_module", without)
    problem, _, _ = mlp_problem()
    with pytest.raises(KfacbenchError, match=r"pip install 'kfacbench\[peers\]'") as err:
        build(name, problem)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", list(PACKAGES))
def test_peers_refuse_data_parallel_runs(name: str) -> None:
    problem, _, _ = mlp_problem()
    spec = get_method(name)
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 3}
    with pytest.raises(KfacbenchError, match="one process"):
        spec.build(problem, hp, MethodContext(None, 0, CPU, dist=object()))  # type: ignore[arg-type]


MLP_PARAMS = 10 * 32 + 32 + 2 * 32 + 32 * 4 + 4
"""The classifier's parameters: two Linear layers and a LayerNorm."""

STATE = {
    # K (11², 33²) and C (32², 4²) per Linear layer, and their Riemannian momenta; the momentum
    # of SINGD's update and of the LayerNorm's SGD.
    "singd": (2250, 2250, MLP_PARAMS),
    # L and R of each weight (32², 10²; 4², 32²) and their inverse roots; Shampoo's momentum,
    # the AdaGrad graft's statistics and momentum, for every parameter.
    "shampoo": (2164, 2164, 3 * MLP_PARAMS),
    # GG and its eigenbasis Q per weight (1-D parameters get AdamW); Adam's two moments.
    "soap": (2164, 2164, 2 * MLP_PARAMS),
}
"""Elements of each peer's factors, inverses and first-order state, counted by hand."""


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in PACKAGES])
def test_peer_state_is_counted_by_kind(name: str) -> None:
    problem, x, y = mlp_problem()
    method = build(name, problem)
    for _ in range(4):
        method.step(x, y, PhaseTimer(CPU))
    factors, inverses, first = STATE[name]
    state = method.state_bytes()
    assert (state["factors"], state["inverses"], state["first_order"]) == (
        4 * factors,
        4 * inverses,
        4 * first,
    )
