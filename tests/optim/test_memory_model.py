"""Optimizer state in bytes: the shape model (kfacbench.optim.memory) by hand, and against the
bytes of the tensors K-FAC and SKFAC actually hold after training (``state_bytes``), on an MLP
and a conv net, in float32 and float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim import METHODS, Method, MethodContext
from kfacbench.optim.flops import LayerShape, layer_shapes
from kfacbench.optim.memory import kfac_state_bytes, skfac_rank, skfac_state_bytes

CPU = torch.device("cpu")
MODELLED = ("factors", "inverses", "first_order")


def test_a_784_100_10_mlp_by_hand() -> None:
    """Factors Ā 785², 101² and G 100², 10² (bias coordinate in Ā); 79,510 parameters."""
    shapes = [LayerShape(785, 100, 1), LayerShape(101, 10, 1)]
    params = 784 * 100 + 100 + 100 * 10 + 10
    factors = (785**2 + 100**2 + 101**2 + 10**2) * 4
    assert factors == 2_546_104
    eigh = kfac_state_bytes(shapes, params)
    assert eigh == {
        "factors": factors,
        "inverses": factors + (785 + 100 + 101 + 10) * 4,  # Q and its eigenvalues
        "first_order": 318_040,
    }
    assert kfac_state_bytes(shapes, params, inverses="damped")["inverses"] == factors
    # CUDA's √2 buckets: 785 alone, 101 with 100 (padded to 101), 10 alone.
    cuda = kfac_state_bytes(shapes, params, inverses="damped", bucket_ratio=math.sqrt(2))
    assert cuda["inverses"] == (785**2 + 2 * 101**2 + 10**2) * 4
    tri = kfac_state_bytes(shapes, params, structure="tridiag")
    assert tri["factors"] == factors + (785 * 101 + 100 * 10) * 4  # cross factors
    pieces = 785 * 101 + 100 * 10 + 785**2 + 100**2 + 100 * 785  # Ψ^Ā, Ψ^G, K_A, K_G, scale
    assert tri["inverses"] == (pieces + 101**2 + 10**2) * 4  # + Ā⁻¹, G⁻¹ of the last layer
    # SKFAC at batch 128: r = 128 rows. Ā of 785 is Woodbury (W: 128 × 785; dense would not
    # pay: 785·(128 + 20·100) > 2·20·100·128); G of 100, Ā of 101 and G of 10 are dense.
    skfac = skfac_state_bytes(shapes, params, 128)
    assert skfac == {
        "factors": 128 * (785 + 100 + 101 + 10) * 4,
        "inverses": (128 * 785 + 100**2 + 101**2 + 10**2) * 4,
        "first_order": 318_040,
    }
    assert sum(skfac.values()) < sum(eigh.values()) / 2


def test_skfac_ranks() -> None:
    conv = LayerShape(28, 8, 49, "conv2d")
    seq = LayerShape(65, 64, 32)
    assert skfac_rank(conv, 16) == 16 and skfac_rank(conv, 16, reduction="mean") == 16
    assert skfac_rank(conv, 16, reduction="subsample", samples=4) == 64
    assert skfac_rank(LayerShape(28, 8, 2, "conv2d"), 16, reduction="subsample") == 32  # s ≤ |T|
    assert skfac_rank(seq, 16) == 16 and skfac_rank(seq, 16, weight_sharing="expand") == 512


def mlp() -> nn.Module:
    """Ā of 30 at batch 16 is stored dense after Woodbury (30·(16 + 20·40) < 2·20·40·16), G of
    40 and Ā of 41 stay Woodbury, G of 5 is dense: every SKFAC form."""
    return nn.Sequential(nn.Linear(29, 40), nn.Tanh(), nn.Linear(40, 5))


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # identity-preconditioned: its parameters have momentum only
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 3),
    )


NETS = {"mlp": (mlp, (29,), 5), "conv": (conv_net, (2, 6, 6), 3)}


def trained(
    net: str, optimizer: str, dtype: torch.dtype, steps: int, m: int = 16, **hp: Any
) -> tuple[Method, nn.Module]:
    build, shape, classes = NETS[net]
    torch.manual_seed(0)
    model = build().to(dtype)
    spec = METHODS[optimizer]
    params = {k: v.default for k, v in spec.hparams.items()} | hp
    method = spec.build(Problem(model, "categorical"), params, MethodContext(None, 0, CPU))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(m, *shape, generator=gen, dtype=dtype)
        y = torch.randint(0, classes, (m,), generator=gen)
        method.step(x, y, PhaseTimer(CPU))
    return method, model


def modelled(state: dict[str, int]) -> dict[str, int]:
    return {k: state[k] for k in MODELLED}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize(
    ("optimizer", "inverses"), [("kfac", "eigh"), ("kfac-fast", "damped")], ids=["kfac", "fast"]
)
def test_kfac_holds_what_the_shape_model_predicts(
    net: str, dtype: torch.dtype, optimizer: str, inverses: str
) -> None:
    method, model = trained(net, optimizer, dtype, steps=4, inv_interval=2)
    shapes = layer_shapes(model, NETS[net][1])
    params = sum(p.numel() for p in model.parameters())
    size = dtype.itemsize
    expected = kfac_state_bytes(shapes, params, inverses=inverses, dtype_bytes=size)
    assert modelled(method.state_bytes()) == expected


def test_kfac_tridiag_holds_what_the_shape_model_predicts() -> None:
    method, model = trained("mlp", "kfac-tridiag", torch.float32, steps=3, inv_interval=2)
    shapes = layer_shapes(model, (29,))
    params = sum(p.numel() for p in model.parameters())
    state = method.state_bytes()
    assert modelled(state) == kfac_state_bytes(shapes, params, structure="tridiag")
    assert state["other"] == 4 * (2 + 5)  # π per layer; λ, γ, α, μ, ρ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize(
    "hp",
    [{}, {"reduction": "subsample", "samples": 3}, {"factor_decay": 0.5, "factor_window": 2}],
    ids=["sum", "subsample", "window"],
)
def test_skfac_holds_what_the_shape_model_predicts(
    net: str, dtype: torch.dtype, hp: dict[str, Any]
) -> None:
    # Refreshes at steps 0 and 4; with the window, step 3 is measured too: full at step 4.
    method, model = trained(net, "skfac", dtype, steps=5, inv_interval=4, **hp)
    shapes = layer_shapes(model, NETS[net][1])
    params = sum(p.numel() for p in model.parameters())
    window = hp.get("factor_window", 1)
    expected = skfac_state_bytes(
        shapes,
        params,
        16,
        reduction=hp.get("reduction", "sum"),
        samples=hp.get("samples", 4),
        window=window,
        inv_interval=4,
        dtype_bytes=dtype.itemsize,
    )
    assert modelled(method.state_bytes()) == expected


def test_the_mlp_exercises_every_skfac_form() -> None:
    method, _ = trained("mlp", "skfac", torch.float32, steps=1, inv_interval=20)
    forms = method.info()["inverse_forms"]
    assert forms == {
        "0": {"rank": 16, "A": "woodbury-dense", "G": "woodbury"},
        "2": {"rank": 16, "A": "woodbury", "G": "dense"},
    }


def test_first_order_methods_count_their_buffers() -> None:
    params = 29 * 40 + 40 + 40 * 5 + 5
    sgd, _ = trained("mlp", "sgd", torch.float32, steps=2)
    assert sgd.state_bytes() == {"factors": 0, "inverses": 0, "first_order": 4 * params, "other": 0}
    adamw, _ = trained("mlp", "adamw", torch.float32, steps=2)
    # exp_avg and exp_avg_sq per parameter; a float32 step count per parameter tensor.
    assert adamw.state_bytes() == {
        "factors": 0,
        "inverses": 0,
        "first_order": 8 * params,
        "other": 4 * 4,
    }
    assert Method().state_bytes() == {}  # the contract's default: unknown
