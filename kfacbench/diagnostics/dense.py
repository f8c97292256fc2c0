"""Dense curvature diagnostics on a parameter budget, and SKFAC's factor error against rank.

The matrix-free diagnostics (:mod:`kfacbench.diagnostics.quality`) score each approximation by the
direction it takes. This module looks at the matrices themselves, as Martens & Grosse (2015) do in
Figs. 2 and 3, for a run of consecutive layers small enough to form densely (:func:`choose_layers`;
the CURVES autoencoder's middle layers 50-25-6-25-50 hold 2,906 parameters):

- **the exact Fisher** F restricted to those layers' parameters (the type-2 Fisher / GGN of the
  mean loss, or the empirical Fisher), formed from per-example Jacobians (:func:`dense_curvature`);
- **K-FAC's Kronecker approximation** F̃ with *all* its blocks, F̃_ij = Ā_ij ⊗ G_ij (§3, Fig. 2):
  F with the expectation of a product, E[ā_i ā_jᵀ ⊗ g_i g_jᵀ], replaced by the product of the
  expectations, both from the same batch;
- **the damped inverses**: exact (F + λI)⁻¹, K-FAC's block-diagonal F̃⁻¹ with factored damping
  (§4.2, §6.3) and with exact damping, and the block-tridiagonal F̂⁻¹ (§4.3);

and records their relative Frobenius errors within the diagonal blocks and off them
(:func:`dense_rows`), with pooled heatmaps of |F|, |F̃|, |(F+λI)⁻¹|, |F̃⁻¹| and |F̂⁻¹| for the
report.

**Which inverse.** (F + λI)⁻¹ is the inverse of the *restricted* damped Fisher: the natural
gradient of these layers with the other parameters held fixed, the quantity F̃⁻¹ and F̂⁻¹
approximate when restricted to the same layers (Fig. 3 does the same).

**vec order.** Every dense matrix here is in the paper's column-stacking order (§2): layer i's
parameters are vec(W̄_i) for its ``(out, in)`` matrix W̄_i = [W_i | b_i], so its K-FAC block is
``torch.kron(A, G)``, as in :mod:`kfacbench.optim.tridiag`.

**Cost.** F comes from the layers' pre-activations s = (s_1, …, s_ℓ) (S values per example): per
example, M_n = J_nᵀ H_n J_n with J_n = ∂z_n/∂s_n (S forward-mode JVPs through the network, batched),
and F_ij = (1/m) Σ_n ā_{n,i} ā_{n,j}ᵀ ⊗ M_n^{ij}: O(m·P²) for P parameters, against O(P) JVP+VJP
pairs through the whole network for :func:`~kfacbench.diagnostics.quality.dense_matrix`. On the
CURVES autoencoder (S = 106, P = 2,906) that is seconds on one CPU core. It uses the first
:data:`DENSE_BATCH` examples of the diagnostic batch, which keeps the per-example Jacobians small,
and it holds about five P×P float64 matrices (68 MB each at P = 3,000): the budget bounds both. It
assumes what K-FAC assumes, that examples do not interact after the first chosen layer (no BatchNorm
in training mode there): the examples' tangents are pushed through together.

**SKFAC against rank** (:func:`rank_rows`). SKFAC (Tang et al. 2021) inverts factors of rank r
(the examples of one batch, per-example conv rows reduced by ``sum`` or ``subsample``). For each
layer and r on a ladder (8, 16, 32, …, the whole diagnostic batch), its factors from the first r
examples are compared with K-FAC's from the whole batch: relative Frobenius errors of Ā, of G
and of Ā ⊗ G, and of the damped inverse applied to the layer's gradient,
(Ā_δ ⊗ G_δ)⁻¹ vec(∇W̄). Both sides are damped SKFAC's way (√λ on each factor), so the error is
the rank's and the reduction's, not the damping split's; on a Linear layer with ``sum`` at r = the
whole batch the two are the same matrices (error 0, up to rounding).

Size: its first four sections (which layers, F and F̃, the damped inverses, errors and heatmaps) are
one computation on the same chosen layers; the last, SKFAC against rank (about 130 lines), is the
seam for a later split.
"""

from __future__ import annotations

import io
import itertools
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from kfacbench.core.problem import Problem
from kfacbench.diagnostics.quality import (
    Checkpoint,
    CheckpointPart,
    ReferenceFisher,
    output_hessian_product,
    output_loss_grad,
)
from kfacbench.errors import KfacbenchError, RunDirError
from kfacbench.optim.capture import Capture, Layer, as_float, find_layers, grad_matrix, output_grads
from kfacbench.optim.factors import factors
from kfacbench.optim.kfac import factored_damping_pi
from kfacbench.optim.lowrank import damped_inverses, kronecker_apply
from kfacbench.optim.skfac import factor_rows
from kfacbench.optim.tridiag import tridiag_inverse
from kfacbench.runs.store import atomic_write_bytes
from kfacbench.workloads import get_workload

DENSE_BUDGET = 3000
"""Default parameter budget of the dense diagnostics (``--dense-budget``)."""

DENSE_BATCH = 256
"""Examples of the diagnostic batch the dense matrices are formed from, at most (the first)."""

HEATMAP_SIZE = 512
"""Heatmaps are |matrix| max-pooled to at most this many rows and columns (float32)."""

RANK_START = 8
"""The smallest rank of SKFAC's ladder; it doubles up to the diagnostic batch."""

MAX_RANK_LAYERS = 12
"""Layers of SKFAC's rank ladder, at most (evenly spaced over the network, first and last kept)."""

SUBSAMPLE_POSITIONS = 4
"""s, positions per example kept by SKFAC's ``subsample`` reduction (as the ``skfac`` direction)."""

HEATMAPS = (
    "fisher", "kronecker", "kronecker_difference", "inverse_exact", "inverse_kfac",
    "inverse_tridiag",
)  # fmt: skip
"""Heatmap arrays of a dense file: |F|, |F̃|, |F̃ − F|, |(F + λI)⁻¹|, |F̃⁻¹| (factored damping)
and |F̂⁻¹|."""


# ---------------------------------------------------------------- which layers
def layer_size(layer: Layer) -> int:
    """The parameters of a layer: in_dim · out_dim (the bias is W̄'s last column)."""
    return layer.in_dim * layer.out_dim


@dataclass(frozen=True)
class DenseSelection:
    """The consecutive Linear layers the dense diagnostics form matrices over."""

    layers: tuple[Layer, ...]

    @property
    def params(self) -> int:
        """P, the parameters of the layers together (the dense matrices are P×P)."""
        return sum(layer_size(layer) for layer in self.layers)

    @property
    def name(self) -> str:
        """``dense:<first>..<last>`` (``dense:<name>`` for one layer): the rows' ``layer``."""
        first, last = self.layers[0].name, self.layers[-1].name
        return f"dense:{first}" if first == last else f"dense:{first}..{last}"

    def describe(self) -> str:
        """The layers with their sizes, for a reader: ``layers 8 (1,275), 10 (156): 1,431 …``."""
        sizes = ", ".join(f"{layer.name} ({layer_size(layer):,})" for layer in self.layers)
        return f"layers {sizes}: {self.params:,} parameters"


def choose_layers(
    model: nn.Module, budget: int, names: Sequence[str] | None = None
) -> DenseSelection | str:
    """The layers of the dense diagnostics, or why there are none for this model.

    By default, the longest run of consecutive covered Linear layers (in K-FAC's order) whose
    parameters fit ``budget``, ties going to the run nearest the middle of the network (the
    layers Martens & Grosse show, §4 Figs. 2–3), then to the larger one. ``names`` picks them
    instead; they must be consecutive covered Linear layers within the budget.

    Returns:
        The selection, or a one-line reason why no layer fits (the model is then "not
        applicable", which is not an error).

    Raises:
        KfacbenchError: ``names`` names an unknown, conv or non-consecutive layer, or layers
            whose parameters exceed ``budget`` (the message lists each layer's size).
    """
    layers, _ = find_layers(model)
    index = {layer.name: i for i, layer in enumerate(layers)}
    if names:
        unknown = [n for n in names if n not in index]
        if unknown:
            known = ", ".join(c.name for c in layers if c.kind == "linear")
            raise KfacbenchError(
                f"--dense-layers: no covered layer {', '.join(map(repr, unknown))} in this model"
                f" (its Linear layers: {known or 'none'})"
            )
        picked = [layers[index[n]] for n in names]
        at = sorted(index[n] for n in names)
        if at != list(range(at[0], at[0] + len(at))):
            raise KfacbenchError(
                f"--dense-layers {','.join(names)}: the layers must be consecutive in K-FAC's"
                f" order ({', '.join(c.name for c in layers)})"
            )
        conv = [c.name for c in picked if c.kind != "linear"]
        if conv:
            raise KfacbenchError(
                f"--dense-layers: {', '.join(conv)} is a conv layer; the dense diagnostics cover"
                " Linear layers (one input row per example)"
            )
        selection = DenseSelection(tuple(layers[i] for i in at))
        if selection.params > budget:
            raise KfacbenchError(
                f"--dense-layers {','.join(names)}: {selection.describe()} exceed the budget of"
                f" {budget:,} (--dense-budget)"
            )
        return selection
    best: tuple[int, float, int] | None = None
    chosen: tuple[int, int] = (0, 0)
    middle = (len(layers) - 1) / 2
    for start in range(len(layers)):
        total = 0
        for stop in range(start, len(layers)):
            if layers[stop].kind != "linear":
                break
            total += layer_size(layers[stop])
            if total > budget:
                break
            key = (stop - start + 1, -abs((start + stop) / 2 - middle), total)
            if best is None or key > best:
                best, chosen = key, (start, stop + 1)
    if best is None:
        linear = [c for c in layers if c.kind == "linear"]
        if not linear:
            return "no covered Linear layer (the dense diagnostics cover Linear layers)"
        smallest = min(linear, key=layer_size)
        return (
            f"no Linear layer fits the budget of {budget:,} parameters (the smallest, "
            f"{smallest.name}, has {layer_size(smallest):,}; raise --dense-budget)"
        )
    return DenseSelection(tuple(layers[chosen[0] : chosen[1]]))


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _coupling_module(model: nn.Module, first: Layer) -> str | None:
    """The name of a training-mode BatchNorm that runs after ``first`` (in module order), which
    would couple the examples whose tangents :func:`dense_curvature` pushes through together."""
    after = False
    for name, module in model.named_modules():
        after = after or module is first.module
        if after and isinstance(module, _BATCH_NORMS) and module.training:
            return name
    return None


# ---------------------------------------------------------------- F and F̃
@dataclass(frozen=True)
class DenseCurvature:
    """The exact Fisher of a few layers and the statistics of its Kronecker approximation.

    Attributes:
        fisher: F, ``(P, P)`` float64, in column-stacking vec order (module docstring).
        a: Ā_ij = E[ā_i ā_jᵀ], ``a[i][j]`` of shape ``(in_i, in_j)``, float64.
        g: G_ij = E[g_i g_jᵀ] (exact: E[J_{s_i}ᵀ H J_{s_j}], no sampling), ``(out_i, out_j)``.
        offsets: where each layer's block starts in F, and P at the end (ℓ + 1 values).
        examples: m, the examples F is the mean over.
    """

    fisher: Tensor
    a: list[list[Tensor]]
    g: list[list[Tensor]]
    offsets: list[int]
    examples: int

    def kronecker(self) -> Tensor:
        """F̃ with every block Ā_ij ⊗ G_ij, diagonal and off-diagonal (§3, Fig. 2)."""
        n = len(self.a)
        return torch.cat(
            [torch.cat([torch.kron(self.a[i][j], self.g[i][j]) for j in range(n)], 1)
             for i in range(n)],
        )  # fmt: skip


def dense_curvature(
    problem: Problem,
    layers: Sequence[Layer],
    x: Tensor,
    y: Tensor,
    fisher: ReferenceFisher = "exact",
) -> DenseCurvature:
    """F restricted to the parameters of ``layers`` and K-FAC's factors, on the batch ``(x, y)``.

    With s_i layer i's output (its pre-activation) and ā_i its input with the bias 1, example
    n's Jacobian w.r.t. vec(W̄_i) is ā_{n,i}ᵀ ⊗ J_{s_i,n}, so

        F_ij = (1/m) Σ_n (ā_{n,i} ā_{n,j}ᵀ) ⊗ M_n^{ij},  M_n = J_{s,n}ᵀ B_n J_{s,n},

    with B_n the output-loss Hessian (``exact``, the type-2 Fisher) or r_n r_nᵀ (``empirical``),
    and K-FAC's factors are the two expectations taken apart: Ā_ij = (1/m) Σ_n ā_{n,i} ā_{n,j}ᵀ,
    G_ij = (1/m) Σ_n M_n^{ij}. J_{s,n} comes from one forward-mode JVP per output unit of the
    layers, all examples at once (examples must not interact after the first layer). The model
    runs in its current mode on copies of its buffers.

    Raises:
        KfacbenchError: a layer is applied at several positions per example (its input is not
            ``(m, features)``), or a training-mode BatchNorm after the layers couples examples.
    """
    model = problem.model
    coupled = _coupling_module(model, layers[0])
    if coupled is not None:
        raise KfacbenchError(
            f"dense diagnostics: BatchNorm {coupled!r} runs in training mode after layer"
            f" {layers[0].name!r} and couples the examples; choose earlier layers (--dense-layers)"
        )
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def forward(*shifts: Tensor) -> Tensor:
        # s_i ← s_i + shift_i: the JVP w.r.t. the shifts at 0 is J_s times the tangent
        hooks = [
            c.module.register_forward_hook(lambda _m, _a, out, d=d: out + d)
            for c, d in zip(layers, shifts, strict=True)
        ]
        try:
            state = (params, {n: b.clone() for n, b in buffers.items()})
            return functional_call(model, state, (x,))
        finally:
            for hook in hooks:
                hook.remove()

    capture = Capture(layers)
    try:
        with torch.no_grad(), capture.recording():
            output = forward(*(torch.zeros((), dtype=x.dtype, device=x.device) for _ in layers))
        inputs = [capture.inputs(c) for c in layers]
    finally:
        capture.clear()
    m = x.shape[0]
    for c, rows in zip(layers, inputs, strict=True):
        if rows.shape[0] != m:
            raise KfacbenchError(
                f"dense diagnostics: layer {c.name!r} sees {rows.shape[0] // m} positions per"
                " example; they cover Linear layers with one input row per example"
            )
    outs = [c.out_dim for c in layers]
    total = sum(outs)
    zeros = tuple(torch.zeros(m, o, dtype=output.dtype, device=x.device) for o in outs)
    basis = torch.eye(total, dtype=output.dtype, device=x.device)
    tangents = [t[:, None, :].expand(total, m, t.shape[-1]) for t in basis.split(outs, dim=1)]

    def push(*tangent: Tensor) -> Tensor:
        return jvp(forward, zeros, tangent)[1]

    jac = vmap(push, chunk_size=64)(*tangents).flatten(2)  # (S, m, K): J_s per example
    out = output.detach().flatten(1)
    if fisher == "exact":
        weighted = output_hessian_product(problem.distribution, out, jac)
    else:
        r = output_loss_grad(problem.distribution, out, y).flatten(1)
        weighted = r * (r * jac).sum(-1, keepdim=True)
    # M_n, (m, S, S), in the model's dtype (K-term sums); all that follows in float64
    ggn = torch.einsum("snk,tnk->nst", jac, weighted).double()
    del jac, weighted
    a_rows = [rows.double() for rows in inputs]
    cuts = [0, *np.cumsum(outs).tolist()]
    blocks = [slice(cuts[i], cuts[i + 1]) for i in range(len(layers))]
    a = [[ai.T @ aj / m for aj in a_rows] for ai in a_rows]
    g_mean = ggn.mean(0)
    g = [[g_mean[bi, bj] for bj in blocks] for bi in blocks]
    rows_f = []
    for i, ai in enumerate(a_rows):
        row = []
        for j, aj in enumerate(a_rows):
            block = torch.einsum("na,nb,npq->apbq", ai, aj, ggn[:, blocks[i], blocks[j]]) / m
            row.append(block.reshape(ai.shape[1] * outs[i], aj.shape[1] * outs[j]))
        rows_f.append(torch.cat(row, 1))
    sizes = [layer_size(c) for c in layers]
    offsets = [0, *np.cumsum(sizes).tolist()]
    return DenseCurvature(torch.cat(rows_f), a, g, [int(o) for o in offsets], m)


# ---------------------------------------------------------------- the damped inverses
def _spd_inverse(mat: Tensor) -> Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(0.5 * (mat + mat.mT)))


def exact_inverse(curv: DenseCurvature, damping: float) -> Tensor:
    """(F + λI)⁻¹ of the restricted Fisher."""
    eye = torch.eye(curv.fisher.shape[0], dtype=curv.fisher.dtype, device=curv.fisher.device)
    return _spd_inverse(curv.fisher + damping * eye)


def _damped_factors(curv: DenseCurvature, damping: float) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's Ā + π√λ I and G + √λ/π I: K-FAC's factored Tikhonov damping (§6.3)."""
    root = math.sqrt(damping)
    diag_a, diag_g = [], []
    for i in range(len(curv.a)):
        a, g = curv.a[i][i], curv.g[i][i]
        pi = float(factored_damping_pi(a, g))
        diag_a.append(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
        diag_g.append(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    return diag_a, diag_g


def kfac_inverse(
    curv: DenseCurvature, damping: float, how: Literal["factored", "exact"] = "factored"
) -> Tensor:
    """K-FAC's block-diagonal inverse F̆⁻¹ (§4.2): per layer (Ā + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹
    (``factored``, §6.3, as the optimizer damps) or (Ā ⊗ G + λI)⁻¹ (``exact``)."""
    if how == "factored":
        diag_a, diag_g = _damped_factors(curv, damping)
        blocks = [
            torch.kron(_spd_inverse(a), _spd_inverse(g))
            for a, g in zip(diag_a, diag_g, strict=True)
        ]
    else:
        blocks = []
        for i in range(len(curv.a)):
            block = torch.kron(curv.a[i][i], curv.g[i][i])
            eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
            blocks.append(_spd_inverse(block + damping * eye))
    return torch.block_diag(*blocks)


def tridiag_dense_inverse(curv: DenseCurvature, damping: float) -> Tensor:
    """K-FAC's block-tridiagonal inverse F̂⁻¹ = Ξᵀ Λ Ξ (§4.3) formed densely from
    :func:`~kfacbench.optim.tridiag.tridiag_inverse`'s pieces (diagonal factors damped the
    factored way, cross factors as estimated).

    Ξ has I on the diagonal and B_i = −Ψ^Ā_i ⊗ Ψ^G_i above it; Λ has Σ_{i|i+1}⁻¹ =
    (K_A ⊗ K_G) diag(vec(scale)) (K_A ⊗ K_G)ᵀ and Σ_ℓ⁻¹ = Ā⁻¹ ⊗ G⁻¹. Block by block, F̂⁻¹ has
    Λ_i + B_{i-1}ᵀ Λ_{i-1} B_{i-1} on the diagonal and Λ_i B_i (and its transpose) beside it.
    """
    diag_a, diag_g = _damped_factors(curv, damping)
    n = len(diag_a)
    cross_a = [curv.a[i][i + 1] for i in range(n - 1)]
    cross_g = [curv.g[i][i + 1] for i in range(n - 1)]
    inv = tridiag_inverse(diag_a, diag_g, cross_a, cross_g)
    lam = []
    for i in range(n - 1):
        k = torch.kron(inv.k_a[i], inv.k_g[i])
        lam.append((k * inv.scale[i].mT.flatten()) @ k.T)
    lam.append(torch.kron(inv.a_inv, inv.g_inv))
    below = [-torch.kron(inv.psi_a[i], inv.psi_g[i]) for i in range(n - 1)]  # B_i
    out = torch.zeros_like(curv.fisher)
    o = curv.offsets
    for i in range(n):
        block = lam[i]
        if i > 0:
            block = block + below[i - 1].T @ lam[i - 1] @ below[i - 1]
        out[o[i] : o[i + 1], o[i] : o[i + 1]] = block
        if i < n - 1:
            side = lam[i] @ below[i]
            out[o[i] : o[i + 1], o[i + 1] : o[i + 2]] = side
            out[o[i + 1] : o[i + 2], o[i] : o[i + 1]] = side.T
    return out


# ---------------------------------------------------------------- errors and heatmaps
def _squares(mat: Tensor, offsets: Sequence[int]) -> tuple[float, float]:
    """The sum of squares of ``mat`` and of its diagonal blocks (at ``offsets``)."""
    inside = sum(float(mat[a:b, a:b].square().sum()) for a, b in itertools.pairwise(offsets))
    return float(mat.square().sum()), inside


def relative_errors(approx: Tensor, exact: Tensor, offsets: Sequence[int]) -> dict[str, float]:
    """‖approx − exact‖_F / ‖exact‖_F over the whole matrix, within its diagonal blocks
    (``_diag``) and off them (``_off``, only with two blocks or more)."""
    diff_all, diff_in = _squares(approx - exact, offsets)
    ref_all, ref_in = _squares(exact, offsets)

    def ratio(num: float, den: float) -> float:
        return math.sqrt(max(num, 0.0) / den) if den > 0 else math.nan

    out = {"": ratio(diff_all, ref_all), "_diag": ratio(diff_in, ref_in)}
    if len(offsets) > 2:
        out["_off"] = ratio(diff_all - diff_in, ref_all - ref_in)
    return out


def pool_abs(mat: Tensor, size: int = HEATMAP_SIZE) -> tuple[np.ndarray, int]:
    """|mat| max-pooled to at most ``size`` × ``size`` (a k×k window to its largest entry, so
    isolated large entries stay visible), float32, and the window k."""
    k = max(1, math.ceil(mat.shape[0] / size))
    pooled = F.max_pool2d(mat.abs().float()[None, None], k, ceil_mode=True)[0, 0]
    return pooled.cpu().numpy(), k


def dense_path(run_dir: Path, cell_id: str, step: int) -> Path:
    """Where the heatmaps of one cell's checkpoint are kept."""
    return run_dir / "dense" / f"{cell_id}.s{step}.npz"


def dense_rows(
    problem: Problem,
    selection: DenseSelection,
    x: Tensor,
    y: Tensor,
    *,
    fisher: ReferenceFisher,
    damping: float,
) -> tuple[list[dict[str, object]], dict[str, np.ndarray]]:
    """The dense diagnostics of one checkpoint: rows for ``diagnostics.parquet`` and the pooled
    heatmaps (:data:`HEATMAPS`, plus ``offsets``, ``pool``, ``layers`` and ``damping``).

    Rows (``layer`` = the selection's name): ``reference`` with ``dense_params``,
    ``dense_examples`` and ``damping``; ``kfac[<fisher>]`` with ``fisher_error`` (F̃ vs F) and
    ``inverse_error`` (F̃⁻¹ vs (F + λI)⁻¹, factored damping); ``kfac-exact-damping[<fisher>]``
    and ``kfac-tridiag[<fisher>]`` with ``inverse_error``. Each error comes whole and as
    ``_diag`` and ``_off`` (within the layers' diagonal blocks and off them).
    """
    layers = selection.layers
    curv = dense_curvature(problem, layers, x[:DENSE_BATCH], y[:DENSE_BATCH], fisher)
    tag = f"[{fisher}]"
    rows: list[dict[str, object]] = [
        {"approximation": "reference", "metric": "dense_params", "value": float(selection.params)},
        {"approximation": "reference", "metric": "dense_examples", "value": float(curv.examples)},
        {"approximation": "reference", "metric": "damping", "value": damping},
    ]
    maps: dict[str, np.ndarray] = {}

    def score(name: str, what: str, approx: Tensor, exact: Tensor) -> None:
        for suffix, value in relative_errors(approx, exact, curv.offsets).items():
            rows.append({"approximation": name, "metric": f"{what}{suffix}", "value": value})

    maps["fisher"], pool = pool_abs(curv.fisher)
    kron = curv.kronecker()
    score(f"kfac{tag}", "fisher_error", kron, curv.fisher)
    maps["kronecker"], _ = pool_abs(kron)
    maps["kronecker_difference"], _ = pool_abs(kron - curv.fisher)
    del kron
    exact = exact_inverse(curv, damping)
    maps["inverse_exact"], _ = pool_abs(exact)
    for name, key, approx in (
        (f"kfac{tag}", "inverse_kfac", kfac_inverse(curv, damping, "factored")),
        (f"kfac-exact-damping{tag}", None, kfac_inverse(curv, damping, "exact")),
        (f"kfac-tridiag{tag}", "inverse_tridiag", tridiag_dense_inverse(curv, damping)),
    ):
        score(name, "inverse_error", approx, exact)
        if key is not None:
            maps[key], _ = pool_abs(approx)
    maps["offsets"] = np.asarray(curv.offsets, dtype=np.int64)
    maps["pool"] = np.asarray(pool, dtype=np.int64)
    maps["layers"] = np.asarray([c.name for c in layers])
    maps["damping"] = np.asarray(damping, dtype=np.float64)
    return [{"layer": selection.name, **row} for row in rows], maps


def write_heatmaps(path: Path, maps: dict[str, np.ndarray]) -> None:
    """The heatmaps as one compressed ``.npz`` (a zip: CRC-checked members), atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **maps)  # type: ignore[arg-type]
    atomic_write_bytes(path, buffer.getvalue())


def read_heatmaps(path: Path) -> dict[str, np.ndarray]:
    """The arrays :func:`write_heatmaps` wrote (:func:`dense_rows`' maps).

    Raises:
        RunDirError: the file is unreadable (truncated, flipped bytes: the zip's CRCs) or lacks
            an array.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            maps = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunDirError(f"{path}: not a readable heatmap file ({reason})") from None
    missing = [k for k in ("offsets", "pool", "layers", *HEATMAPS) if k not in maps]
    if missing:
        raise RunDirError(f"{path}: missing array(s) {', '.join(missing)}")
    return maps


def dense_part(budget: int = DENSE_BUDGET, names: Sequence[str] | None = None) -> CheckpointPart:
    """The dense diagnostics as a checkpoint part (``parts/<cell>.s<step>.dense...``); a model
    no layer of which fits the budget gets an empty part (nothing to compute, and done)."""

    def compute(point: Checkpoint) -> list[dict[str, object]]:
        selection = choose_layers(point.problem.model, budget, names)
        if isinstance(selection, str):
            return []
        rows, maps = dense_rows(
            point.problem, selection, point.x, point.y, fisher=point.fisher, damping=point.damping
        )
        write_heatmaps(dense_path(point.run_dir, point.cell.id, point.step), maps)
        return rows

    return CheckpointPart("dense", compute)


# ---------------------------------------------------------------- SKFAC against rank
def rank_ladder(examples: int, start: int = RANK_START) -> list[int]:
    """r = start, 2·start, 4·start, … below ``examples``, then ``examples`` itself."""
    ladder, r = [], start
    while r < examples:
        ladder.append(r)
        r *= 2
    return [*ladder, examples]


def rank_layers(layers: Sequence[Layer], most: int = MAX_RANK_LAYERS) -> list[Layer]:
    """At most ``most`` layers, evenly spaced from the first to the last."""
    if len(layers) <= most:
        return list(layers)
    picks = sorted({round(i * (len(layers) - 1) / (most - 1)) for i in range(most)})
    return [layers[i] for i in picks]


def _grad_rows(layer: Layer, grad: Tensor) -> Tensor:
    """Output-gradient maps as K-FAC's rows, ordered like :meth:`Capture.inputs`'s."""
    if layer.kind == "conv2d":
        grad = grad.movedim(-3, -1)
    return grad.reshape(-1, layer.out_dim)


def _relative(approx: Tensor, exact: Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def _kronecker_error(a_r: Tensor, g_r: Tensor, a: Tensor, g: Tensor) -> float:
    """‖Ā_r ⊗ G_r − Ā ⊗ G‖_F / ‖Ā ⊗ G‖_F without forming either product: the difference is
    ΔĀ ⊗ G_r + Ā ⊗ ΔG, and ‖X ⊗ Y‖ = ‖X‖‖Y‖, ⟨X_1 ⊗ Y_1, X_2 ⊗ Y_2⟩ = ⟨X_1, X_2⟩⟨Y_1, Y_2⟩
    (written in the differences, so that a small error is not lost to cancellation)."""
    a_r, g_r, a, g = a_r.double(), g_r.double(), a.double(), g.double()
    da, dg = a_r - a, g_r - g
    square = (
        (da.norm() * g_r.norm()) ** 2
        + (a.norm() * dg.norm()) ** 2
        + 2 * (da * a).sum() * (g_r * dg).sum()
    )
    return math.sqrt(max(float(square), 0.0)) / float(a.norm() * g.norm())


def rank_rows(
    problem: Problem,
    x: Tensor,
    y: Tensor,
    *,
    damping: float,
    fisher: Literal["sampled", "empirical"],
    generator: torch.Generator,
) -> list[dict[str, object]]:
    """SKFAC's factors of rank r against K-FAC's from the whole batch, per layer and reduction
    (``sum``; and ``subsample`` on conv networks), for r on :func:`rank_ladder`.

    One forward pass and one output-gradient pass (``fisher``) on the batch give every example's
    statistics; SKFAC's rows (:func:`~kfacbench.optim.skfac.factor_rows`) take the first r
    examples, K-FAC's factors (:func:`~kfacbench.optim.factors.factors`) all of them. The
    gradient the inverses are applied to is the mean loss's on the whole batch.

    Rows: approximation ``skfac-<reduction>[<fisher>]``, ``layer`` the layer, ``rank`` r (examples;
    ``subsample`` keeps :data:`SUBSAMPLE_POSITIONS` rows of each), metrics ``factor_a_error``,
    ``factor_g_error``, ``kronecker_error`` and ``inverse_error``.
    """
    layers, _ = find_layers(problem.model)
    if not layers:
        return []
    capture = Capture(layers)
    try:
        with capture.recording():
            output = problem.forward(x)
        grads = output_grads(
            capture, layers, problem, output, y, fisher=fisher, generator=generator,
            as_rows=False,
        )  # fmt: skip
        params = [p for c in layers for p in c.params()]
        loss_grad = torch.autograd.grad(problem.loss(output, y), params)
        m = x.shape[0]
        reductions = ("sum", "subsample") if any(c.kind == "conv2d" for c in layers) else ("sum",)
        starts = np.cumsum([0, *(len(c.params()) for c in layers)])
        rows: list[dict[str, object]] = []
        for c in rank_layers(layers):
            k = layers.index(c)
            raw, g_map = capture.raw_input(c), grads[k]
            a, g = factors(c, capture.inputs(c), _grad_rows(c, g_map), m)
            v = grad_matrix(c, loss_grad[starts[k] : starts[k + 1]]).to(a.dtype)
            root = torch.tensor(math.sqrt(damping), dtype=a.dtype, device=a.device)
            eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            nat = torch.linalg.solve(g + root * eye_g, v)
            full = torch.linalg.solve(a + root * eye_a, nat.T).T  # (Ā_δ ⊗ G_δ)⁻¹ vec(V)
            for reduction in reductions:
                for r in rank_ladder(m):
                    r_a, r_g = factor_rows(
                        c, as_float(raw[:r]), g_map[:r], reduction=reduction,
                        samples=SUBSAMPLE_POSITIONS, generator=generator,
                    )  # fmt: skip
                    a_inv, g_inv = damped_inverses([r_a, r_g], [root, root])
                    a_r, g_r = r_a.T @ r_a, r_g.T @ r_g
                    values = {
                        "factor_a_error": _relative(a_r, a),
                        "factor_g_error": _relative(g_r, g),
                        "kronecker_error": _kronecker_error(a_r, g_r, a, g),
                        "inverse_error": _relative(kronecker_apply(g_inv, a_inv, v), full),
                    }
                    rows += [
                        {"approximation": f"skfac-{reduction}[{fisher}]", "layer": c.name,
                         "rank": r, "metric": metric, "value": value}
                        for metric, value in values.items()
                    ]  # fmt: skip
        return rows
    finally:
        capture.clear()


def rank_part() -> CheckpointPart:
    """SKFAC's error against rank as a checkpoint part (``parts/<cell>.s<step>.rank...``), with
    the sampled Fisher (or the empirical one, when the reference is)."""

    def compute(point: Checkpoint) -> list[dict[str, object]]:
        kind: Literal["sampled", "empirical"] = (
            "empirical" if point.fisher == "empirical" else "sampled"
        )
        seed = zlib.crc32(f"{point.cell.seed}:{point.step}:rank".encode())
        generator = torch.Generator(device=point.x.device).manual_seed(seed)
        return rank_rows(
            point.problem, point.x, point.y, damping=point.damping, fisher=kind,
            generator=generator,
        )  # fmt: skip

    return CheckpointPart("rank", compute)


def dense_plan(
    workloads: Sequence[str], budget: int, names: Sequence[str] | None = None
) -> dict[str, DenseSelection | str]:
    """The dense selection of each workload's model (built unseeded: only its shapes matter),
    checked before anything runs; a workload without one gets the reason.

    Raises:
        KfacbenchError: as :func:`choose_layers`, with the workload named.
    """
    plan: dict[str, DenseSelection | str] = {}
    for workload in dict.fromkeys(workloads):
        model = get_workload(workload).build_model(torch.Generator())
        try:
            plan[workload] = choose_layers(model, budget, names)
        except KfacbenchError as exc:
            raise KfacbenchError(f"{workload}: {exc}") from None
    return plan
