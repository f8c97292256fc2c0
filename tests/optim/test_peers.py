"""Peer adapters: ASDL's K-FAC and swift K-FAC (the peers extra) and torch's AdamW train a few
steps through the core and reduce the loss; a missing peer is a one-line error naming the extra."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from kfacbench.core.loop import LoopConfig, train
from kfacbench.core.problem import Problem
from kfacbench.data import Splits
from kfacbench.errors import KfacbenchError
from kfacbench.optim import MethodContext, get_method, peers

CPU = torch.device("cpu")
HAS_ASDL = importlib.util.find_spec("asdl") is not None
needs_asdl = pytest.mark.skipif(
    not HAS_ASDL, reason="needs the peers extra (pip install 'kfacbench[peers]')"
)


def data(n: int = 512) -> Splits:
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=gen)
    x = torch.randn(n, 2, 6, 6, generator=gen) + y[:, None, None, None].float()
    return Splits(x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :], "synthetic")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


def losses(name: str, **hp: object) -> tuple[float, float, dict]:  # type: ignore[type-arg]
    spec = get_method(name)
    params = {k: v.default for k, v in spec.hparams.items()} | hp
    if spec.uses_inv_interval:
        params["inv_interval"] = 3
    problem = Problem(net(), "categorical")
    method = spec.build(problem, params, MethodContext(40, 0, CPU))
    config = LoopConfig(32, 0, 40, None, 40, 10, 256)
    result = train(problem, method, data(), config, metric="accuracy", reached=lambda v: False)
    first, last = result.curves[1]["train_loss"], result.curves[-1]["train_loss"]
    phases = {p.phase: p.calls for p in result.phases}
    return first, last, phases | {"info": method.info()}  # type: ignore[attr-defined]


@needs_asdl
@pytest.mark.parametrize("name", ["asdl-kfac", "asdl-skfac"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_asdl_peers_reduce_the_loss_with_named_phases(name: str, fisher: str) -> None:
    extra = {"cov_interval": 2} if name == "asdl-kfac" else {}
    first, last, phases = losses(name, lr=0.05, damping=1.0, fisher=fisher, **extra)
    assert last < 0.8 * first
    # curvature (ASDL's fused pass) on refresh steps, forward/backward on the others
    assert {"curvature", "inverse", "precondition", "update", "forward", "backward"} <= set(phases)
    assert phases["inverse"] == len(range(0, 40, 3))
    info = phases["info"]
    assert info["peer"] == "asdl.KfacGradientMaker" and info["version"].startswith("0.1")
    assert info["swift"] == (name == "asdl-skfac")


def test_adamw_reduces_the_loss() -> None:
    first, last, phases = losses("adamw", lr=0.01)
    assert last < 0.8 * first
    assert set(phases) == {"forward", "backward", "update", "step", "info"}
    assert phases["info"]["version"] == torch.__version__


def test_a_missing_peer_is_a_one_line_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_asdl(name: str, *args: object, **kwargs: object) -> object:
        if name == "asdl" or name.startswith("asdl."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_asdl)
    with pytest.raises(KfacbenchError, match=r"pip install 'kfacbench\[peers\]'"):
        peers._asdl()


@needs_asdl
def test_a_sampled_fisher_on_bernoulli_outputs_is_refused() -> None:
    problem = Problem(nn.Linear(4, 4), "bernoulli")
    spec = get_method("asdl-kfac")
    hp = {k: v.default for k, v in spec.hparams.items()} | {"fisher": "sampled", "inv_interval": 1}
    with pytest.raises(KfacbenchError, match="fisher = 'empirical'"):
        spec.build(problem, hp, MethodContext(10, 0, CPU))
