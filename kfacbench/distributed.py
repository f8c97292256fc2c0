"""Data-parallel runs on torch.distributed: the process group, minibatch shards and the
collectives K-FAC and SKFAC need.

``kfacbench run SUITE --nproc N`` starts N worker processes through torchrun (one per device).
Every worker builds the same model from the same seed and draws the same *global* minibatch
indices; each keeps its own contiguous shard (the suite's batch size is the global batch). The
model is wrapped in DistributedDataParallel, so after the backward pass every rank holds the
gradient of the global-batch mean loss.

K-FAC's curvature needs the same treatment as the gradient. Its factors are means over examples,
so the mean over ranks of the per-shard factors is the global-batch factor (equal shards); SKFAC's
factors are RᵀR of per-example rows, so the global roots are the shards' rows stacked. Which rank
inverts which layer is K-FAC's own decision (:mod:`kfacbench.optim.owners`); this module only
moves the tensors (:func:`broadcast_from_owners`).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as td
from torch import Tensor

from kfacbench.errors import KfacbenchError

BUCKET_BYTES = 25 * 2**20
"""Size of one all-reduce bucket (DDP's default): large enough to amortise the launch, small
enough that the first buckets' transfer overlaps the packing of the later ones."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group.

    Attributes:
        rank: global rank.
        world: number of processes.
        local_rank: rank on this node (its CUDA device index).
        backend: ``gloo`` or ``nccl``.
    """

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes results and shows progress."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker (its environment names a rank)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def init(device_kind: str, timeout_s: float) -> Dist:
    """Join the process group torchrun set up (``gloo`` on CPU, ``nccl`` on CUDA).

    ``timeout_s`` bounds every collective: a rank that stops answering makes the others fail
    with an error instead of hanging.
    """
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend=backend, timeout=dt.timedelta(seconds=timeout_s))
    return Dist(td.get_rank(), td.get_world_size(), local_rank, backend)


def shard(indices: Tensor, dist: Dist) -> Tensor:
    """This rank's contiguous share of the global minibatch ``indices``.

    Raises:
        KfacbenchError: the global batch does not split evenly (factors averaged over ranks are
            the global factors only for equal shards).
    """
    n = indices.shape[0]
    if n % dist.world:
        raise KfacbenchError(
            f"batch size {n} does not split evenly over {dist.world} processes; use a multiple"
            f" of {dist.world}"
        )
    m = n // dist.world
    return indices[dist.rank * m : (dist.rank + 1) * m]


# torch 2.13 renamed all_gather_into_tensor (deprecated since) to all_gather_single; older
# torch builds on users' GPU machines have only the former.
_all_gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor


def _buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped into buckets of about :data:`BUCKET_BYTES` (same dtype)."""
    buckets: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        same = buckets and tensors[buckets[-1][0]].dtype == t.dtype
        if not buckets or not same or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


class PendingMean:
    """An asynchronous bucketed all-reduce of tensors to their mean over ranks (in place).

    The collectives are launched at construction; :meth:`wait` blocks until they are done and
    writes the means back into the original tensors. Until then the tensors must not be read or
    written.
    """

    def __init__(self, tensors: Sequence[Tensor], world: int) -> None:
        self.world = world
        self.parts: list[tuple[list[Tensor], Tensor, Any]] = []
        for bucket in _buckets(tensors):
            members = [tensors[i] for i in bucket]
            flat = torch.cat([t.reshape(-1) for t in members])
            work = td.all_reduce(flat, op=td.ReduceOp.SUM, async_op=True)
            self.parts.append((members, flat, work))

    def wait(self) -> None:
        """Finish the all-reduces and store the means."""
        for members, flat, work in self.parts:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for t in members:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
        self.parts.clear()


def mean_over_ranks(tensors: Sequence[Tensor], dist: Dist) -> None:
    """All-reduce ``tensors`` to their mean over ranks, in place (bucketed, blocking)."""
    PendingMean(tensors, dist.world).wait()


def gather_rows(tensors: Sequence[Tensor], dist: Dist) -> list[Tensor]:
    """Every rank's ``(r_i, d_i)`` row blocks stacked along the rows, in rank order.

    One all-gather of one flat buffer for all tensors (every rank's blocks have the same shapes,
    since shards are equal).
    """
    flat = torch.cat([t.reshape(-1) for t in tensors])
    out = torch.empty(dist.world * flat.numel(), dtype=flat.dtype, device=flat.device)
    _all_gather(out, flat)
    per_rank = out.view(dist.world, -1)
    gathered: list[Tensor] = []
    offset = 0
    for t in tensors:
        block = per_rank[:, offset : offset + t.numel()].reshape(dist.world * t.shape[0], -1)
        gathered.append(block)
        offset += t.numel()
    return gathered


Layout = list[tuple[tuple[int, ...], torch.dtype]]
"""The shapes and dtypes of one item's tensors."""


def broadcast_from_owners(
    items: list[list[Tensor]],
    owners: Sequence[int],
    dist: Dist,
    device: torch.device,
    layouts: Sequence[Layout] | None = None,
) -> list[list[Tensor]]:
    """Give every rank every item's tensors, each item computed by its owner.

    ``items[i]`` is filled on rank ``owners[i]`` and ignored elsewhere. Per owner, the shapes and
    dtypes go first (a small object broadcast, pickled, with a host sync), unless every rank
    knows them already (``layouts``: a per-step broadcast must not pay that), then one flat
    buffer per dtype.
    """
    out = [list(item) for item in items]
    for src in range(dist.world):
        mine = [i for i, o in enumerate(owners) if o == src]
        if not mine:
            continue
        meta: list[Any] = [None]
        if layouts is not None:
            meta[0] = [layouts[i] for i in mine]
        else:
            if dist.rank == src:
                meta[0] = [[(tuple(t.shape), t.dtype) for t in items[i]] for i in mine]
            td.broadcast_object_list(meta, src=src)
        layout = [
            (i, k, shape, dtype)
            for i, item in zip(mine, meta[0], strict=True)
            for k, (shape, dtype) in enumerate(item)
        ]
        for dtype in sorted({d for *_, d in layout}, key=str):
            slots = [(i, k, shape) for i, k, shape, d in layout if d == dtype]
            if dist.rank == src:
                flat = torch.cat([items[i][k].reshape(-1) for i, k, _ in slots])
            else:
                numel = sum(torch.Size(shape).numel() for *_, shape in slots)
                flat = torch.empty(numel, dtype=dtype, device=device)
            td.broadcast(flat, src=src)
            if dist.rank == src:
                continue
            offset = 0
            for i, k, shape in slots:
                n = torch.Size(shape).numel()
                while len(out[i]) <= k:
                    out[i].append(flat.new_empty(0))
                out[i][k] = flat[offset : offset + n].view(shape)
                offset += n
    return out


def broadcast_object(value: Any, dist: Dist) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object)."""
    box = [value]
    td.broadcast_object_list(box, src=0)
    return box[0]


def local_peer_pids(dist: Dist) -> tuple[int, ...]:
    """Process ids of the other ranks on this host: their CPU time is this run's own work, not
    a competing load (:mod:`kfacbench.machine_load`)."""
    me = (socket.gethostname(), os.getpid())
    everyone: list[tuple[str, int] | None] = [None] * dist.world
    td.all_gather_object(everyone, me)
    return tuple(pid for host, pid in filter(None, everyone) if host == me[0] and pid != me[1])


def mean_losses(losses: Tensor, dist: Dist) -> Tensor:
    """The global-batch losses from every rank's shard losses (equal shards: their mean)."""
    td.all_reduce(losses, op=td.ReduceOp.SUM)
    return losses / dist.world


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a collective: every rank must call it)."""
    t = torch.tensor(float(flag), device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t)


def slowest(values: dict[str, list[float]], dist: Dist) -> dict[str, list[float]]:
    """Per key and position, the largest value over ranks: a phase's time in a step is the time
    of its slowest rank, which the others wait for at the next collective."""
    gathered: list[Any] = [None] * dist.world
    td.all_gather_object(gathered, values)
    out: dict[str, list[float]] = {}
    for key in values:
        lists = [g.get(key, []) for g in gathered]
        n = min(len(v) for v in lists)
        out[key] = [max(v[i] for v in lists) for i in range(n)]
    return out
