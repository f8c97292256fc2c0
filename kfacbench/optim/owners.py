"""Which rank inverts which layer in a data-parallel K-FAC or SKFAC run (KAISA's strategies).

The inversions are split between the ranks, each layer to one owner, balanced by cost (KAISA,
Pauloski et al. 2021): with ``comm-opt`` the owners broadcast the inverses and every rank
preconditions its own copy of every layer; with ``mem-opt`` only the owner keeps a layer's
inverses and it broadcasts the preconditioned gradient every step. The broadcasts themselves are
:mod:`kfacbench.distributed`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kfacbench.distributed import Dist, Layout, broadcast_from_owners
from kfacbench.optim.capture import Layer

STRATEGIES = ("comm-opt", "mem-opt")
"""Where preconditioning happens (KAISA's names): every rank, or each layer's owner."""


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each item, balancing the summed cost per rank.

    Longest-processing-time first: items by decreasing cost, each to the least-loaded rank (ties
    to the lower rank), within 4/3 of the optimal makespan.
    """
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += costs[i]
    return owners


class LayerOwners:
    """Which rank inverts each layer, and the broadcasts that follow (KAISA's strategies).

    Args:
        costs: per layer, the cost of its inversions (owners balance their sum).
        dist: the process group, or ``None`` (one process: this rank owns every layer).
        strategy: ``comm-opt`` or ``mem-opt`` (:data:`STRATEGIES`).
        split: whether to split at all (``False``: every rank inverts every layer).
    """

    def __init__(
        self, costs: Sequence[float], dist: Dist | None, strategy: str, split: bool = True
    ) -> None:
        self.dist = dist
        self.strategy = strategy
        self.split = split and dist is not None and dist.world > 1
        self.owners = assign_owners(costs, dist.world) if self.split and dist else [0] * len(costs)
        self.shares_inverses = self.split and strategy == "comm-opt"
        self.shares_directions = self.split and strategy == "mem-opt"

    def mine(self, i: int) -> bool:
        """Whether this rank inverts layer ``i``."""
        return not self.split or self.dist is None or self.owners[i] == self.dist.rank

    def preconditions(self, i: int) -> bool:
        """Whether this rank preconditions layer ``i`` (every layer, unless mem-opt)."""
        return not self.shares_directions or self.mine(i)

    def broadcast(
        self,
        items: list[list[Tensor]],
        device: torch.device,
        layouts: Sequence[Layout] | None = None,
    ) -> list[list[Tensor]]:
        """Every layer's tensors from its owner (``items[i]`` is read on the owner only)."""
        assert self.dist is not None
        return broadcast_from_owners(items, self.owners, self.dist, device, layouts)

    def share_directions(
        self, nat: list[Tensor | None], device: torch.device, layers: Sequence[Layer]
    ) -> list[Tensor | None]:
        """mem-opt: every owner broadcasts its layers' preconditioned gradients, each an
        ``(out, in)`` matrix of its weight's dtype: known on every rank, so no per-step object
        broadcast (a pickle and a host sync)."""
        items = [[v] if v is not None else [] for v in nat]
        layouts: list[Layout] = [
            [((la.out_dim, la.in_dim), la.module.weight.dtype)] for la in layers
        ]
        return [t[0] for t in self.broadcast(items, device, layouts)]

    def info(self, names: Sequence[str]) -> dict[str, Any]:
        """The owners per layer name, for ``method_info`` (empty when not split)."""
        if not self.split:
            return {}
        owners = dict(zip(names, self.owners, strict=True))
        return {"owners": owners, "dist_strategy": self.strategy}
