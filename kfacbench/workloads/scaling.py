"""Cost-growth workloads: one shape parameter varied at a time, everything else held.

How a method's step grows with the work is the question a user asks before choosing K-FAC (its
refresh inverts d×d factors, ~d³; its factors and preconditioning cost ~d² per example and ~d³
per step) over SKFAC (rank-limited factors) or a first-order method (~d² per example). Two
families answer it on generated data:

- ``mlp_<W>``: a small input (:data:`MLP_FEATURES`) into a stack of :data:`MLP_DEPTH` square W×W
  ReLU layers and a 10-class head; the square layers hold all but a sliver of the FLOPs, so
  width is the only thing that grows (W in :data:`MLP_WIDTHS`).
- ``block_<W>_<T>``: one GPT-2 block (:class:`~kfacbench.workloads.transformer.Block`, width W,
  head width 64) between a byte embedding and a byte head, over T positions. Widths
  :data:`BLOCK_WIDTHS` at T = :data:`BLOCK_CONTEXT`, and sequence lengths :data:`BLOCK_SEQS` at W
  = :data:`BLOCK_SEQ_WIDTH`: each axis is swept with the other fixed, not the full product.

Batch size is a sweep axis of every suite. :func:`shape_of` reads the axes back from a name, so
a report fits the cost against them (:mod:`kfacbench.report.scaling`). Both families are for
timing only: they have no real data, and a suite must set ``data = "synthetic"``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kfacbench.data import Splits
from kfacbench.data.text import VOCAB
from kfacbench.errors import KfacbenchError
from kfacbench.workloads import Workload
from kfacbench.workloads.transformer import byte_gpt

MLP_WIDTHS = (256, 512, 1024, 2048, 4096, 8192)
MLP_DEPTH = 4
"""Square W×W layers of ``mlp_<W>``."""
MLP_FEATURES = 64
MLP_CLASSES = 10

BLOCK_WIDTHS = (128, 256, 512, 1024, 2048)
"""Widths of ``block_<W>_<BLOCK_CONTEXT>``; at 2048 its MLP's factors are 8192 wide (4W)."""
BLOCK_CONTEXT = 128
BLOCK_SEQS = (32, 64, 128, 256, 512, 1024)
"""Sequence lengths of ``block_<BLOCK_SEQ_WIDTH>_<T>``."""
BLOCK_SEQ_WIDTH = 256
HEAD_WIDTH = 64
"""Features per attention head (GPT-2's)."""

TIMING_NOTE = "none: generated data for cost-growth sweeps (timing only)"


@dataclass(frozen=True)
class Shape:
    """The cost-growth axes of a workload name."""

    family: str
    """``mlp`` or ``block``."""
    width: int
    seq: int
    """Positions per example (1 for ``mlp``)."""


_NAME = re.compile(r"^(?:mlp_(?P<mw>\d+)|block_(?P<bw>\d+)_(?P<bt>\d+))$")


def shape_of(name: str) -> Shape | None:
    """The family, width and sequence length of ``mlp_<W>`` or ``block_<W>_<T>`` (None for any
    other name)."""
    m = _NAME.match(name)
    if m is None:
        return None
    if m["mw"] is not None:
        return Shape("mlp", int(m["mw"]), 1)
    return Shape("block", int(m["bw"]), int(m["bt"]))


def square_mlp(
    width: int,
    *,
    depth: int = MLP_DEPTH,
    features: int = MLP_FEATURES,
    classes: int = MLP_CLASSES,
    generator: torch.Generator | None = None,
) -> nn.Sequential:
    """``features`` → W, ``depth`` × (W → W), → ``classes``, ReLU between: He-normal weights
    (std √(2/fan_in), keeping activations at scale through the depth), zero biases, all drawn
    from ``generator`` only."""
    sizes = [features, *([width] * (depth + 1)), classes]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        linear = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)
        with torch.no_grad():
            linear.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
            linear.bias.zero_()
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _generated_only(name: str) -> Callable[[Path | None, Path | None], Splits]:
    def load(data_dir: Path | None, cache_dir: Path | None) -> Splits:
        raise KfacbenchError(f'workload {name}: generated data only; set data = "synthetic"')

    return load


def mlp_workload(width: int) -> Workload:
    """``mlp_<width>``: the square MLP of :func:`square_mlp`."""
    name = f"mlp_{width}"
    return Workload(
        name=name,
        summary=f"MLP {MLP_FEATURES}-{MLP_DEPTH + 1}×{width}-{MLP_CLASSES}, ReLU (cost vs width)",
        input_shape=(MLP_FEATURES,),
        distribution="categorical",
        metric="accuracy",
        target=1.0,
        target_note=TIMING_NOTE,
        build_model=lambda gen: square_mlp(width, generator=gen),
        load_real=_generated_only(name),
        synthetic_sizes=(50_000, 5_000),
        num_classes=MLP_CLASSES,
    )


def block_workload(width: int, seq: int) -> Workload:
    """``block_<width>_<seq>``: one GPT-2 block over ``seq`` bytes (a one-block byte GPT)."""
    name = f"block_{width}_{seq}"
    heads = max(1, width // HEAD_WIDTH)
    return Workload(
        name=name,
        summary=f"one GPT-2 block, width {width}, {heads} heads, {seq} positions (cost vs width,"
        " sequence)",
        input_shape=(seq,),
        distribution="categorical",
        metric="bits_per_byte",
        target=0.0,
        target_note=TIMING_NOTE,
        build_model=lambda gen: byte_gpt(
            context=seq, width=width, depth=1, heads=heads, vocab=VOCAB, generator=gen
        ),
        load_real=_generated_only(name),
        synthetic_sizes=(8_192, 512),
        num_classes=VOCAB,
    )


def scaling_workloads() -> list[Workload]:
    """Every member of both families, each (width, length) once."""
    blocks = dict.fromkeys(
        [(w, BLOCK_CONTEXT) for w in BLOCK_WIDTHS] + [(BLOCK_SEQ_WIDTH, t) for t in BLOCK_SEQS]
    )
    return [*(mlp_workload(w) for w in MLP_WIDTHS), *(block_workload(w, t) for w, t in blocks)]
