"""The arithmetic of an SGD step and a K-FAC step: a FLOP model to hold measured times against.

"K-FAC as fast as its arithmetic" is checked by comparing the measured amortized step-time ratio
K-FAC / SGD with the ratio of their floating-point operations. The model counts the matrix
products and factorisations a step runs (elementwise work, the loss and the sampling are left
out: they are linear in the activations, not in the weights):

- forward: 2·r·d_in·d_out per layer, r = rows (examples × positions);
- backward: the weight gradient (2·r·d_in·d_out) and the input gradient (the same; the first
  layer's input needs none);
- curvature (K-FAC, Martens & Grosse 2015 §5): the sampled backward pass to every layer's output
  (input gradients only: the first layer's again needs none) and the factor products Āᵀā,
  gᵀg (2·r·d² each; ``reduce`` uses one row per example; a CPU's blocked symmetric product does
  5/8 of it from 256 columns on, as :func:`~kfacbench.optim.factors.gram` runs it);
- precondition: G⁻¹VĀ⁻¹, 2·d_out²·d_in + 2·d_out·d_in² per layer;
- inverse (every T_inv steps and at each of the first three): per factor of size n, counted as
  LAPACK's and cuSOLVER's routines run: Cholesky n³/3, then the inverse from it 2n³/3 on a CPU
  (potri) or 2n³ on CUDA (a solve against the identity); LU inverse 2n³; eigh ≈ 9n³ (reduction,
  divide-and-conquer eigenvectors, back-transformation) + 2n³ to form the damped inverse;
  Newton-Schulz 4n³ per iteration + 2n³ for its residual;
- update: a few operations per parameter.

The model is an arithmetic floor, not a prediction: factorisations run far below GEMM speed, so
a measured ratio above the model's points at them (the phases table says which).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kfacbench.optim.capture import find_layers
from kfacbench.optim.factors import SYMMETRIC_BLOCKS, SYMMETRIC_MIN_DIM
from kfacbench.optim.inverses import NEWTON_STEPS, bucket_ratio, plan_buckets

UPDATE_FLOPS_PER_PARAM = 4
"""SGD with momentum and weight decay: a multiply-add for the decay, one for the momentum buffer,
one for the parameter (counted as 4)."""


@dataclass(frozen=True)
class LayerShape:
    """A preconditioned layer as the model counts it: widths (``d_in`` with the bias
    coordinate), rows per example and kind (``linear`` or ``conv2d``: SKFAC reduces a conv's
    positions, :mod:`~kfacbench.optim.memory`)."""

    d_in: int
    d_out: int
    positions: int
    kind: str = "linear"


def layer_shapes(model: nn.Module, input_shape: Sequence[int]) -> list[LayerShape]:
    """The K-FAC layers of ``model`` with their rows per example (spatial positions of a conv
    layer's output, sequence positions of a linear layer applied per token), from one forward
    pass of a single example."""
    layers, _ = find_layers(model)
    positions: dict[str, int] = {}
    hooks = []
    for layer in layers:

        def hook(
            module: nn.Module, args: object, out: torch.Tensor, name: str = layer.name
        ) -> None:
            positions[name] = (
                out[0].numel() // out.shape[-1 if isinstance(module, nn.Linear) else 1]
            )

        hooks.append(layer.module.register_forward_hook(hook))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            param = next(model.parameters())
            x = torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype)
            if not torch.is_floating_point(x) or _takes_tokens(model):
                x = x.long()
            model(x)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return [
        LayerShape(layer.in_dim, layer.out_dim, positions[layer.name], layer.kind)
        for layer in layers
    ]


def _takes_tokens(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Embedding) for m in model.modules())


def gram_flops(rows: int, d: int, device: str) -> float:
    """FLOPs of rowsᵀrows as :func:`~kfacbench.optim.factors.gram` runs it on ``device``."""
    full = 2.0 * rows * d * d
    if device == "cpu" and d >= SYMMETRIC_MIN_DIM and SYMMETRIC_BLOCKS > 1:
        b = SYMMETRIC_BLOCKS
        return full * (b + 1) / (2 * b)
    return full


def inverse_flops(n: int, method: str, device: str) -> float:
    """FLOPs of one damped inverse of size ``n`` by ``method`` on ``device``."""
    cube = float(n) ** 3
    if method == "cholesky":
        return cube / 3 + (2 * cube if device == "cuda" else 2 * cube / 3)
    if method == "inv":
        return 2 * cube
    if method == "eigh":
        return 9 * cube + 2 * cube
    if method == "newton":
        return NEWTON_STEPS * 4 * cube + 2 * cube
    raise ValueError(f"no FLOP count for inverse method {method!r}")


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step by phase (``inverse``: one refresh)."""

    forward: float
    backward: float
    curvature: float
    precondition: float
    inverse: float
    update: float

    def amortized(self, refreshes: int, steps: int) -> float:
        """Mean FLOPs per step over ``steps`` steps with ``refreshes`` inverse refreshes."""
        regular = self.forward + self.backward + self.curvature + self.precondition + self.update
        return regular + self.inverse * refreshes / steps


def sgd_flops(shapes: Sequence[LayerShape], batch: int, params: int) -> StepFlops:
    """One SGD step: forward, backward and the update."""
    fwd = sum(2.0 * batch * s.positions * s.d_in * s.d_out for s in shapes)
    first = shapes[0]
    bwd = 2 * fwd - 2.0 * batch * first.positions * first.d_in * first.d_out
    return StepFlops(fwd, bwd, 0.0, 0.0, 0.0, UPDATE_FLOPS_PER_PARAM * params)


def kfac_flops(
    shapes: Sequence[LayerShape],
    batch: int,
    params: int,
    *,
    inverse_methods: Sequence[str],
    device: str,
    weight_sharing: str = "expand",
    cov_fraction: float = 1.0,
) -> StepFlops:
    """One kfac-fast step (factors every step) and one refresh.

    Args:
        shapes: the preconditioned layers (:func:`layer_shapes`).
        batch: examples per step.
        params: parameters of the model.
        inverse_methods: the method of each size bucket of the factors (A and G of each layer,
            in layer order, bucketed as the refresh does on ``device``).
        device: ``cpu`` or ``cuda`` (the symmetric product, Cholesky's inverse, the buckets).
        weight_sharing: ``expand`` or ``reduce`` (rows of the factor products).
        cov_fraction: fraction of the batch the statistics use.
    """
    sgd = sgd_flops(shapes, batch, params)
    stats = max(1, round(cov_fraction * batch))
    # The sampled backward: input gradients of every layer but the first.
    sampled = sum(2.0 * batch * s.positions * s.d_in * s.d_out for s in shapes[1:])
    products = 0.0
    for s in shapes:
        rows = stats if weight_sharing == "reduce" else stats * s.positions
        products += gram_flops(rows, s.d_in, device) + gram_flops(rows, s.d_out, device)
    precondition = sum(2.0 * s.d_in * s.d_out * (s.d_in + s.d_out) for s in shapes)
    sizes = [d for s in shapes for d in (s.d_in, s.d_out)]
    buckets = plan_buckets(sizes, bucket_ratio(torch.device(device)))
    if len(buckets) != len(inverse_methods):
        raise ValueError(f"{len(buckets)} buckets but {len(inverse_methods)} inverse methods")
    inverse = sum(
        len(members) * inverse_flops(size, method, device)
        for (size, members), method in zip(buckets, inverse_methods, strict=True)
    )
    return StepFlops(
        sgd.forward, sgd.backward, sampled + products, precondition, inverse, sgd.update
    )


def refreshes(steps: int, inv_interval: int) -> int:
    """Inverse refreshes in ``steps`` steps: at each of the first three and every T_inv-th."""
    return sum(1 for k in range(steps) if k < 3 or k % inv_interval == 0)
