"""optim.base: Polyak averaging of parameters for evaluation, and the full-float32 guard."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.optim import METHODS, MethodContext
from kfacbench.optim.base import IterateAverage


def test_polyak_average_and_swap() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = IterateAverage([p], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
    avg.update()  # 0.5·[1, 2] + 0.5·[3, 6]
    with avg.swapped():
        torch.testing.assert_close(p.detach(), torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 6.0]))


@pytest.mark.parametrize(
    ("name", "curvature"), [("kfac", "_update_factors"), ("skfac", "_measure")]
)
def test_tf32_covers_forward_and_backward_only(
    name: str, curvature: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cell with ``tf32 = true`` enables TF32 matmuls; K-FAC's and SKFAC's own arithmetic
    (from the curvature phase on) still runs in full float32, and the flag is restored after."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True  # cuBLASModule's flags are not plain attributes for monkeypatch
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    problem = Problem(model, "categorical")
    spec = METHODS[name]
    hp = {k: v.default for k, v in spec.hparams.items()} | {"inv_interval": 1}
    method: Any = spec.build(problem, hp, MethodContext(None, 0, torch.device("cpu"), None))
    seen: dict[str, bool] = {}
    real_forward, real_curvature = problem.forward, getattr(method, curvature)

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.setdefault("forward", matmul.allow_tf32)
        return real_forward(x)

    def measured(*args: Any) -> Any:
        seen["curvature"] = matmul.allow_tf32
        return real_curvature(*args)

    monkeypatch.setattr(problem, "forward", forward)
    monkeypatch.setattr(method, curvature, measured)
    try:
        x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        method.step(x, y, PhaseTimer(torch.device("cpu")))
        assert seen == {"forward": True, "curvature": False}
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = previous
