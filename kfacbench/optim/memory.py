"""The optimizer state of K-FAC and SKFAC from the layer shapes: bytes before running them.

Beside the FLOP model (:mod:`.flops`), the question a user asks before choosing: K-FAC's state
grows with the square of each layer's widths, SKFAC's with the batch times the widths (until its
rank reaches the width). The model counts what the methods hold after training, by the kinds of
:data:`~kfacbench.core.memory.STATE_KINDS` (``other``, scalars and Polyak averages, is left
out), and tests/optim/test_memory.py holds it to their tensors' bytes. A layer has d_in inputs
(with the bias coordinate) and d_out outputs (:func:`~kfacbench.optim.flops.layer_shapes`); b is
the bytes of an element (4: float32, as K-FAC's arithmetic runs under bf16 autocast too; 8 for a
float64 model).

K-FAC (Martens & Grosse 2015), one process:

- factors: Ā (d_in²) and G (d_out²) per layer; the block-tridiagonal inverse (§4.3) adds the
  cross factors Ā_{i,i+1} (d_in,i·d_in,i+1) and G_{i,i+1} (d_out,i·d_out,i+1);
- inverses: with adaptive damping the eigendecompositions (Q and its eigenvalues, n² + n per
  factor of size n, §6.6 rescales them); with fixed damping the damped inverses, one stack per
  size bucket (:func:`~kfacbench.optim.inverses.plan_buckets`) whose members are padded to the
  bucket's size: Σ over buckets of members · size² (on a CPU only equal sizes share a bucket:
  Σ n²); block-tridiagonal: Ψ^Ā, Ψ^G, K_A, K_G and the scale of each pair of layers, Ā⁻¹ and
  G⁻¹ of the last;
- first-order: one tensor per parameter (SGD's momentum in kfac-fast, the previous update δ₀
  with the re-scaling, §7).

SKFAC (Tang et al. 2021), rank r per batch: m examples (a Linear layer; a conv under ``sum`` or
``mean``), m·R (a Linear layer at R positions under ``expand``) or m·min(s, |T|) (a conv under
``subsample``); w batches kept (the moving average's window, 1 without it):

- factors: the roots R_A (w·r × d_in) and R_G (w·r × d_out);
- inverses: per side of size d (the other side k): the dense d×d inverse when w·r ≥ d or when
  storing it dense pays over the refresh interval (:func:`~kfacbench.optim.lowrank.dense_pays`),
  else Woodbury's W (w·r × d), with, when w > 1, the weighted stack of the window's roots it
  applies (w·r × d; with w = 1 those are the factor roots themselves);
- first-order: SGD's momentum, one tensor per parameter.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from kfacbench.optim.flops import LayerShape
from kfacbench.optim.inverses import plan_buckets
from kfacbench.optim.lowrank import dense_pays

K_FAC_INVERSES = ("eigh", "damped")
"""What a block-diagonal K-FAC refresh keeps: eigendecompositions (adaptive damping) or damped
inverses (fixed damping, ``kfac-fast``)."""


def kfac_state_bytes(
    shapes: Sequence[LayerShape],
    params: int,
    *,
    inverses: str = "eigh",
    structure: str = "blockdiag",
    bucket_ratio: float = 1.0,
    dtype_bytes: int = 4,
) -> dict[str, int]:
    """K-FAC's factors, inverses and first-order state in bytes (the module docstring).

    Args:
        shapes: the preconditioned layers (:func:`~kfacbench.optim.flops.layer_shapes`).
        params: parameters of the model (every one gets a momentum or δ₀ entry).
        inverses: ``eigh`` (adaptive damping: the ``kfac`` preset) or ``damped`` (fixed
            damping: ``kfac-fast``); ignored for the tridiagonal structure.
        structure: ``blockdiag`` or ``tridiag``.
        bucket_ratio: the refresh's size-bucket ratio
            (:func:`~kfacbench.optim.inverses.bucket_ratio`: 1 on a CPU, √2 on CUDA).
        dtype_bytes: bytes per element.

    Raises:
        ValueError: an unknown ``inverses`` or ``structure``.
    """
    if inverses not in K_FAC_INVERSES:
        raise ValueError(f"unknown inverses {inverses!r}; known: {', '.join(K_FAC_INVERSES)}")
    sizes = [n for s in shapes for n in (s.d_in, s.d_out)]
    factors = sum(n * n for n in sizes)
    pairs = list(itertools.pairwise(shapes))
    if structure == "tridiag":
        cross = sum(a.d_in * b.d_in + a.d_out * b.d_out for a, b in pairs)
        pieces = sum(
            a.d_in * b.d_in + a.d_out * b.d_out + a.d_in**2 + a.d_out**2 + a.d_out * a.d_in
            for a, b in pairs
        )
        last = shapes[-1].d_in ** 2 + shapes[-1].d_out ** 2 if shapes else 0
        factors, inverse = factors + cross, pieces + last
    elif structure != "blockdiag":
        raise ValueError(f"unknown structure {structure!r}; known: blockdiag, tridiag")
    elif inverses == "eigh":
        inverse = sum(n * n + n for n in sizes)
    else:
        inverse = sum(len(members) * size**2 for size, members in plan_buckets(sizes, bucket_ratio))
    return {
        "factors": factors * dtype_bytes,
        "inverses": inverse * dtype_bytes,
        "first_order": params * dtype_bytes,
    }


def skfac_rank(
    shape: LayerShape,
    batch: int,
    *,
    reduction: str = "sum",
    samples: int = 4,
    weight_sharing: str = "reduce",
) -> int:
    """r, the rows of one layer's factor roots from a batch of ``batch`` examples (the module
    docstring; :func:`~kfacbench.optim.skfac.factor_rows`)."""
    if shape.kind == "conv2d":
        return batch * min(samples, shape.positions) if reduction == "subsample" else batch
    return batch * shape.positions if weight_sharing == "expand" else batch


def skfac_state_bytes(
    shapes: Sequence[LayerShape],
    params: int,
    batch: int,
    *,
    reduction: str = "sum",
    samples: int = 4,
    weight_sharing: str = "reduce",
    window: int = 1,
    inv_interval: int = 20,
    dtype_bytes: int = 4,
) -> dict[str, int]:
    """SKFAC's factor roots, inverses and momentum in bytes, once its window of batches is full
    (the module docstring).

    Args:
        shapes: the preconditioned layers (:func:`~kfacbench.optim.flops.layer_shapes`).
        params: parameters of the model.
        batch: m, examples per batch (per process).
        reduction, samples, weight_sharing: as SKFAC's hyperparameters.
        window: batches in the moving average (``factor_window`` when ``factor_decay`` > 0,
            else 1).
        inv_interval: steps between refreshes (whether a Woodbury inverse is stored dense).
        dtype_bytes: bytes per element.
    """
    factors = inverse = 0
    for s in shapes:
        rank = window * skfac_rank(
            s, batch, reduction=reduction, samples=samples, weight_sharing=weight_sharing
        )
        factors += rank * (s.d_in + s.d_out)
        for d, other in ((s.d_in, s.d_out), (s.d_out, s.d_in)):
            if rank >= d or dense_pays(d, rank, other, inv_interval):
                inverse += d * d
            else:
                inverse += rank * d * (2 if window > 1 else 1)
    return {
        "factors": factors * dtype_bytes,
        "inverses": inverse * dtype_bytes,
        "first_order": params * dtype_bytes,
    }
