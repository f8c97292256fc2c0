"""IterateAverage: Polyak averaging of parameters for evaluation."""

from __future__ import annotations

import torch

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
