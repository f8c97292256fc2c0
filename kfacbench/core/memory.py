"""What a method holds in memory: its optimizer state in bytes, by kind, counted from its tensors.

A second-order method's memory is its curvature: K-FAC keeps two d×d factors per layer and their
inverses (or eigendecompositions), d² where the weights are d_in·d_out, while SGD keeps one
momentum buffer the size of the weights. The device's peak (CUDA only: :mod:`.loop`) shows the
total; the state itself is counted here on any device, from the tensors a method holds after
training (state is allocated at the first steps), through its
:meth:`~kfacbench.core.method.Method.state_bytes`.

Bytes are those of the tensors' *storages*, each storage once: K-FAC's damped inverses are views
into one batched, padded stack per size bucket (the stack is what occupies memory), and SKFAC's
Woodbury form keeps the factor roots it was formed from (counted once, as factors).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kfacbench.core.device import oom_request_mb

if TYPE_CHECKING:
    from kfacbench.core.loop import TrainResult

STATE_KINDS = ("factors", "inverses", "first_order", "other")
"""The kinds of state a method reports (:meth:`~kfacbench.core.method.Method.state_bytes`):

- ``factors``: curvature statistics kept between refreshes: K-FAC's Kronecker factors Ā and G
  (and the tridiagonal cross factors), SKFAC's low-rank roots R_A and R_G, a peer's statistics;
- ``inverses``: what preconditioning applies: damped inverses, eigendecompositions, Woodbury's
  W = K⁻¹R, the tridiagonal pieces, inverse roots;
- ``first_order``: the state a first-order method keeps too: momentum buffers, Adam's moments,
  K-FAC's previous update (its momentum, §7);
- ``other``: everything else a method holds: scalars (λ, γ, π, step counts), Polyak averages,
  bucket masks.
"""

CURVATURE_KINDS = ("factors", "inverses")
"""The kinds that make up the curvature's state (the cells' ``curvature_state_mb``)."""

MIB = 2**20


def count_bytes(tensors: Iterable[tuple[str, torch.Tensor | None]]) -> dict[str, int]:
    """Bytes per kind of ``(kind, tensor)`` pairs (``None`` skipped), each storage counted once,
    under the first kind it comes with: list the kinds in :data:`STATE_KINDS` order so that a
    tensor shared by factors and inverses counts as a factor. Every kind is in the result.

    Raises:
        ValueError: a kind not in :data:`STATE_KINDS`.
    """
    out = dict.fromkeys(STATE_KINDS, 0)
    seen: set[tuple[str, int]] = set()
    for kind, tensor in tensors:
        if kind not in out:
            raise ValueError(f"unknown state kind {kind!r}; known: {', '.join(STATE_KINDS)}")
        if tensor is None:
            continue
        try:
            storage = tensor.untyped_storage()
            key, size = (str(tensor.device), storage.data_ptr()), storage.nbytes()
        except RuntimeError:  # no storage of its own (sparse): counted as if dense, once
            key, size = ("id", id(tensor)), tensor.numel() * tensor.element_size()
        if size == 0 or key in seen:
            continue
        seen.add(key)
        out[kind] += size
    return out


Found = Iterator[tuple[tuple[str, ...], torch.Tensor]]
"""Tensors with the names on the way to them (:func:`walk_tensors`)."""


def walk_tensors(obj: Any, path: tuple[str, ...] = ()) -> Found:
    """Every tensor reachable from ``obj`` through dicts, lists, tuples and plain objects'
    attributes, with the names (keys and attributes, not list positions) on the way to it.

    Modules and parameters are not walked: they are the model, not a method's state. Used to
    count the state of optimizers whose internals are not kfacbench's (torch.optim, the peers).
    """
    seen: set[int] = set()

    def visit(item: Any, where: tuple[str, ...]) -> Found:
        if isinstance(item, nn.Parameter | nn.Module | type):
            return
        if isinstance(item, torch.Tensor):
            yield where, item
            return
        if id(item) in seen:
            return
        seen.add(id(item))
        if isinstance(item, Mapping):
            for key, value in item.items():
                yield from visit(value, (*where, str(key)) if isinstance(key, str) else where)
        elif isinstance(item, list | tuple | set | frozenset):
            for value in item:
                yield from visit(value, where)
        elif hasattr(item, "__dict__") and not callable(item):
            for key, value in vars(item).items():
                yield from visit(value, (*where, key))

    yield from visit(obj, path)


def optimizer_state(
    optimizer: torch.optim.Optimizer, named: Mapping[tuple[str, ...], str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(kind, tensor)`` of every tensor in a torch.optim optimizer's per-parameter ``state``.

    A tensor whose path (:func:`walk_tensors`) starts with a key of ``named`` is of that kind (a
    peer's statistics and preconditioners); any other is ``first_order`` when it has its
    parameter's shape (momentum, Adam's moments) and ``other`` when not (step counts).
    """
    named = named or {}
    for param, state in optimizer.state.items():
        for path, tensor in walk_tensors(state):
            kind = next((k for prefix, k in named.items() if path[: len(prefix)] == prefix), None)
            if kind is None:
                shaped = isinstance(param, torch.Tensor) and tensor.shape == param.shape
                kind = "first_order" if shaped else "other"
            yield kind, tensor


def state_mb(state: Mapping[str, int]) -> tuple[float, float]:
    """The state's total and its curvature part (:data:`CURVATURE_KINDS`) in MiB: the cells'
    ``state_mb`` and ``curvature_state_mb``; NaN for an empty (unknown) state."""
    if not state:
        return math.nan, math.nan
    total = sum(state.values()) / MIB
    return total, sum(state.get(k, 0) for k in CURVATURE_KINDS) / MIB


def memory_columns(
    result: TrainResult | None, state: Mapping[str, int], status: str, error: str
) -> dict[str, float]:
    """The cells' memory columns: the peak device memory and its baseline (CUDA only, from the
    loop), the state (:func:`state_mb`), and for a cell that ran out of memory the allocation
    that did not fit (:func:`~kfacbench.core.device.oom_request_mb` of its error)."""
    peak = result.peak_mem_mb if result else math.nan
    baseline = result.mem_baseline_mb if result else math.nan
    total, curvature = state_mb(state)
    return {
        "peak_mem_mb": peak,
        "mem_baseline_mb": baseline,
        "peak_mem_over_baseline_mb": peak - baseline,
        "state_mb": total,
        "curvature_state_mb": curvature,
        "oom_request_mb": oom_request_mb(error) if status == "oom" else math.nan,
    }
