"""ASDL's K-FAC and swift K-FAC (the peers extra) train a few steps through the core and reduce
the loss, take kfacbench's steps where the algorithms agree; a missing ASDL is a one-line error
naming the extra."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from shared_peers import losses
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import Method, MethodContext, get_method
from kfacbench.optim.peers import asdl

CPU = torch.device("cpu")
HAS_ASDL = importlib.util.find_spec("asdl") is not None
needs_asdl = pytest.mark.skipif(
    not HAS_ASDL, reason="needs the peers extra (pip install 'kfacbench[peers]')"
)


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


def built(name: str, model: nn.Module, **hp: object) -> Method:
    spec = get_method(name)
    params = {k: v.default for k, v in spec.hparams.items()} | hp | {"inv_interval": 1}
    return spec.build(Problem(model, "categorical"), params, MethodContext(10, 0, CPU))


def largest_gap(ours: str, peer: str, model: nn.Module, m: int, **hp: object) -> float:
    """Trains float64 copies of ``model`` with kfacbench's method and the peer on the same five
    batches; the largest parameter difference relative to the largest parameter change."""
    start = model.double()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    shared = {"lr": 0.1, "damping": 0.1, "fisher": "empirical"}
    mine = built(ours, a, **shared, **hp)
    theirs = built(
        peer,
        b,
        **shared,
        **({"ema_decay": 0.05, "ema_start": "one-over-k"} if ours != "skfac" else {}),
    )
    gen = torch.Generator().manual_seed(1)
    timer = PhaseTimer(CPU)
    for _ in range(5):
        x = torch.randn(m, 2, 6, 6, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (m,), generator=gen)
        mine.step(x, y, timer)
        theirs.step(x, y, timer)
    return largest_change(a, b) / largest_change(a, start)


def largest_change(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).detach().abs().max()) for p, q in pairs)


def bias_free(conv: bool, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    first = nn.Conv2d(2, 4, 3, padding=1, bias=bias) if conv else nn.Linear(72, 4 * 36, bias=bias)
    return nn.Sequential(
        *([first] if conv else [nn.Flatten(), first]),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 36, 16, bias=bias),
        nn.Tanh(),
        nn.Linear(16, 3, bias=bias),
    )


@needs_asdl
def test_asdl_kfac_takes_kfacbench_kfac_steps_where_their_algorithms_agree() -> None:
    """Conv and Linear layers without biases, the empirical Fisher, π-split damping, Cholesky
    inverses, the EMA with the 1/k start: ASDL's K-FAC and kfac-fast are one algorithm, and five
    steps of each land on the same parameters. With biases they part (ASDL preconditions a bias
    with G⁻¹ alone), which the same measure sees."""
    hp = {"ema_max": 0.95, "inverse_method": "cholesky"}
    assert largest_gap("kfac-fast", "asdl-kfac", bias_free(conv=True), 32, **hp) < 1e-6
    assert largest_gap("kfac-fast", "asdl-kfac", bias_free(conv=True, bias=True), 32, **hp) > 0.1


@needs_asdl
def test_asdl_swift_kfac_takes_skfac_steps_on_linear_layers() -> None:
    """Per-batch factors inverted by Woodbury (rank 8 < widths): the same steps on bias-free
    Linear layers. On a conv layer they part: ASDL's swift reduces a conv factor over positions
    only when the batch is smaller than its dimension and keeps K-FAC's factor otherwise, where
    SKFAC always reduces (Tang et al. §3.2)."""
    hp = {"damping_split": "pi"}
    assert largest_gap("skfac", "asdl-skfac", bias_free(conv=False), 8, **hp) < 1e-6
    assert largest_gap("skfac", "asdl-skfac", bias_free(conv=True), 8, **hp) > 0.1


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
        asdl._asdl()


@needs_asdl
def test_a_sampled_fisher_on_bernoulli_outputs_is_refused() -> None:
    problem = Problem(nn.Linear(4, 4), "bernoulli")
    spec = get_method("asdl-kfac")
    hp = {k: v.default for k, v in spec.hparams.items()} | {"fisher": "sampled", "inv_interval": 1}
    with pytest.raises(KfacbenchError, match="fisher = 'empirical'"):
        spec.build(problem, hp, MethodContext(10, 0, CPU))


@needs_asdl
@pytest.mark.parametrize(("name", "factors"), [("asdl-kfac", 95), ("asdl-skfac", 0)])
def test_asdl_state_is_counted_by_kind(name: str, factors: int) -> None:
    """ASDL's Kronecker factors of a 6-5-3 MLP leave the bias out: A 6², 5² and B 5², 3² (95
    elements), and as many in their inverses; swift keeps only the inverses. SGD's momentum is
    one buffer per parameter (53)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    method = built(name, model, fisher="empirical")
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        method.step(
            torch.randn(8, 6, generator=gen),
            torch.randint(0, 3, (8,), generator=gen),
            PhaseTimer(CPU),
        )
    assert method.state_bytes() == {
        "factors": 4 * factors,
        "inverses": 4 * 95,
        "first_order": 4 * 53,
        "other": 0,
    }
