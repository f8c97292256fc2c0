"""Curvature quality: how close each approximation's step comes to the exact natural-gradient step.

kfacbench times what every phase of K-FAC and SKFAC costs; this module measures what that cost
buys. On a fixed batch it forms, matrix-free, the exact damped natural-gradient direction

    δ* = −(F + λI)⁻¹ ∇h

by conjugate gradient on exact Fisher-vector products (:class:`FisherProducts`: the type-2
Fisher / generalised Gauss-Newton Jᵀ H J through one JVP and one VJP, or the empirical Fisher), and
scores an approximation's direction Δ by

- its **cosine** with δ*, and
- its **model-reduction ratio**: the reduction of the exact quadratic model
  M(δ) = ∇hᵀδ + ½ δᵀ(F + λI)δ at Δ's best step length α*, as a fraction of δ*'s reduction. With
  C = F + λI, M(α*Δ) = −½ (∇hᵀΔ)² / (ΔᵀCΔ) and M(δ*) = −½ ∇hᵀC⁻¹∇h, so the ratio is the squared
  cosine of Δ and δ* in the C inner product: 1 for the exact direction, in [0, 1] always. It is
  what a step's progress depends on (Martens & Grosse 2015, §6.4 choose α by the same model).

The approximations are those of the two papers, formed from Kronecker factors measured on the
same batch (:func:`kfac_direction`), so the comparison isolates the structure of the
approximation; a run's own (stale) inverses are scored through the optimizer itself.

Along training (:func:`diagnose_cells`), further diagnostics join these scores at every
checkpoint as parts (:class:`CheckpointPart`), each resumed on its own: the dense matrices F, F̃ and
their damped inverses on a few layers, and SKFAC's factor error against rank
(:mod:`kfacbench.diagnostics.dense`).

Size: it holds the matrix-free scores (Fisher-vector products, conjugate gradient, each
approximation's direction) and the checkpoint loop that trains a cell and applies them; the section
"along training" is the seam for a later split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pandas as pd
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp

from kfacbench.core.device import resolve_device
from kfacbench.core.loop import train
from kfacbench.core.problem import Problem
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import (
    Capture,
    Layer,
    find_layers,
    grad_matrix,
    other_params,
    output_grads,
    split_matrix,
)
from kfacbench.optim.factors import cross_factors, factors, kronecker_factors
from kfacbench.optim.kfac import factored_damping_pi
from kfacbench.optim.lowrank import damped_inverses, kronecker_apply
from kfacbench.optim.skfac import factor_rows, pi_split
from kfacbench.optim.tridiag import tridiag_apply, tridiag_inverse
from kfacbench.runner import DataCache, RunOptions, prepare_cell
from kfacbench.runs.schema import DIAGNOSTIC_COLUMNS
from kfacbench.runs.store import atomic_write_parquet
from kfacbench.suite import Cell

ReferenceFisher = Literal["exact", "empirical"]
"""The Fisher the reference direction inverts: ``exact`` (type-2, the GGN Jᵀ H J of the mean loss)
or ``empirical`` (the mean of the per-example gradients' outer products)."""

Damping = Literal["factored", "exact"]
"""How a Kronecker block is damped: ``factored`` is K-FAC's (Ā + π√λ I) ⊗ (G + √λ/π I)
(§6.3), which adds cross terms to λI; ``exact`` is (Ā ⊗ G + λI), separating the Kronecker
approximation's error from the damping's."""


def parameters_of(model: nn.Module) -> tuple[list[Layer], list[Tensor]]:
    """The layers K-FAC covers and every trainable parameter in K-FAC's order (each covered
    layer's weight and bias, then the others), the order every direction here uses."""
    layers, _ = find_layers(model)
    params: list[Tensor] = [p for layer in layers for p in layer.params()]
    return layers, params + list(other_params(model, layers))


def output_hessian_product(distribution: str, out: Tensor, u: Tensor) -> Tensor:
    """H u per example, H the Hessian of the per-example loss w.r.t. the network output:
    Bernoulli logits diag(p(1−p)), Gaussian mean I, softmax logits diag(p) − ppᵀ. ``u`` is
    shaped like ``out``, or has leading dimensions (several vectors per example)."""
    if distribution == "bernoulli":
        p = torch.sigmoid(out)
        return p * (1 - p) * u
    if distribution == "gaussian":
        return u
    p = torch.softmax(out, dim=-1)
    return p * u - p * (p * u).sum(-1, keepdim=True)


def output_loss_grad(distribution: str, out: Tensor, y: Tensor) -> Tensor:
    """∂ℓ_i/∂z_i, the per-example loss gradient w.r.t. the network output (empirical Fisher)."""
    if distribution == "bernoulli":
        return torch.sigmoid(out) - y
    if distribution == "gaussian":
        return out - y
    return torch.softmax(out, dim=-1) - nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)


class FisherProducts:
    """Fisher-vector products of the mean loss on one batch, without forming the Fisher.

    ``exact``: F v = (1/m) Σ_i J_iᵀ H_i J_i v (one JVP for J v, one VJP for Jᵀ(·)); ``empirical``:
    F v = (1/m) Σ_i J_iᵀ r_i r_iᵀ J_i v with r_i = ∂ℓ_i/∂z_i, i.e. the mean of the per-example
    gradients' outer products. The forward pass runs in the model's current mode on copies of its
    buffers (a training-mode BatchNorm's running statistics stay as they are), at the parameters'
    current values.

    Args:
        problem: the model and its output distribution.
        params: the parameters the products are over (:func:`parameters_of`).
        x: the batch's inputs.
        y: its targets (used by the empirical Fisher and the gradient).
        fisher: ``exact`` or ``empirical``.
    """

    def __init__(
        self,
        problem: Problem,
        params: Sequence[Tensor],
        x: Tensor,
        y: Tensor,
        fisher: ReferenceFisher = "exact",
    ) -> None:
        self.problem = problem
        self.fisher = fisher
        self.params = list(params)
        model = problem.model
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.names = [by_id[id(p)] for p in self.params]
        self.x, self.y = x, y
        self.values = tuple(p.detach() for p in self.params)
        covered = set(self.names)
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in covered}
        buffers = dict(model.named_buffers())

        def forward(*values: Tensor) -> Tensor:
            state = {**fixed, **dict(zip(self.names, values, strict=True))}
            return functional_call(model, (state, {n: b.clone() for n, b in buffers.items()}), (x,))

        self._forward = forward
        pulled = vjp(forward, *self.values)
        self.output: Tensor = pulled[0].detach()
        self._vjp = pulled[1]
        self.m = x.shape[0]

    def gradient(self) -> list[Tensor]:
        """∇ of the mean loss over the batch w.r.t. the parameters: Jᵀ r / m."""
        r = output_loss_grad(self.problem.distribution, self.output, self.y)
        return list(self._vjp(r / self.m))

    def __call__(self, v: Sequence[Tensor]) -> list[Tensor]:
        """F v for a direction ``v`` given per parameter."""
        jv = jvp(self._forward, self.values, tuple(v))[1]
        dist = self.problem.distribution
        if self.fisher == "exact":
            u = output_hessian_product(dist, self.output, jv)
        else:
            r = output_loss_grad(dist, self.output, self.y)
            u = r * (r * jv).flatten(1).sum(1).view(-1, *([1] * (r.dim() - 1)))
        return list(self._vjp(u / self.m))


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return torch.stack([(u * v).sum() for u, v in zip(a, b, strict=True)]).sum()


def _axpy(alpha: Tensor | float, x: Sequence[Tensor], y: Sequence[Tensor]) -> list[Tensor]:
    """α x + y, per parameter."""
    return [alpha * u + w for u, w in zip(x, y, strict=True)]


@dataclass(frozen=True)
class Solve:
    """The result of :func:`conjugate_gradient`.

    Attributes:
        x: the solution, per parameter.
        residual: ‖b − C x‖ / ‖b‖ at the end (the reference's trustworthiness).
        iterations: CG iterations taken.
    """

    x: list[Tensor]
    residual: float
    iterations: int


def conjugate_gradient(
    matvec: Callable[[Sequence[Tensor]], list[Tensor]],
    b: Sequence[Tensor],
    damping: float,
    *,
    tol: float = 1e-6,
    max_iter: int = 500,
) -> Solve:
    """Solve (F + λI) x = b by conjugate gradient, with F v given by ``matvec``.

    F + λI is symmetric positive definite for λ > 0 (F is PSD), so CG converges; its residual is
    reported rather than assumed, since a reference that did not converge would make every
    approximation look worse (or better) than it is.
    """

    def c(v: Sequence[Tensor]) -> list[Tensor]:
        return _axpy(damping, v, matvec(v))

    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in r]
    rr = _dot(r, r)
    b_norm = math.sqrt(float(rr))
    if b_norm == 0.0:
        return Solve(x, 0.0, 0)
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        cp = c(p)
        alpha = rr / _dot(p, cp)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, cp, r)
        rr_new = _dot(r, r)
        if math.sqrt(float(rr_new)) <= tol * b_norm:
            rr = rr_new
            break
        p = _axpy(rr_new / rr, p, r)
        rr = rr_new
    true_residual = _axpy(-1.0, c(x), b)
    return Solve(x, math.sqrt(float(_dot(true_residual, true_residual))) / b_norm, iterations)


@dataclass(frozen=True)
class Quality:
    """How an approximation's direction Δ compares with the exact one δ*.

    Attributes:
        cosine: cos(Δ, δ*) in the Euclidean inner product.
        model_ratio: M(α*Δ) / M(δ*), the fraction of the exact quadratic model's reduction that Δ
            achieves at its best step length (the squared cosine in the (F + λI) inner product).
        alpha: that best step length α* = −∇hᵀΔ / ΔᵀCΔ (1 for an exact natural-gradient
            direction; a scale error of the approximation shows here).
    """

    cosine: float
    model_ratio: float
    alpha: float


def quality(
    products: Callable[[Sequence[Tensor]], list[Tensor]],
    damping: float,
    grad: Sequence[Tensor],
    exact: Sequence[Tensor],
    direction: Sequence[Tensor],
) -> Quality:
    """Score ``direction`` against the exact direction ``exact`` = −(F + λI)⁻¹ ``grad``."""
    cd = _axpy(damping, direction, products(direction))
    dcd = float(_dot(direction, cd))
    gd = float(_dot(grad, direction))
    exact_reduction = -0.5 * float(_dot(grad, [-t for t in exact]))  # M(δ*) = −½ ∇ᵀC⁻¹∇
    norms = math.sqrt(float(_dot(direction, direction)) * float(_dot(exact, exact)))
    cosine = float(_dot(direction, exact)) / norms if norms > 0 else math.nan
    if dcd <= 0 or exact_reduction >= 0:
        return Quality(cosine, math.nan, math.nan)
    reduction = -0.5 * gd * gd / dcd
    return Quality(cosine, reduction / exact_reduction, -gd / dcd)


def kfac_direction(
    layers: Sequence[Layer],
    factors: Sequence[tuple[Tensor, Tensor]],
    grad: Sequence[Tensor],
    damping: float,
    how: Damping = "factored",
) -> list[Tensor]:
    """Δ = −F̆⁻¹∇h with F̆ K-FAC's block-diagonal approximation (§4.2) from ``factors`` (one
    ``(Ā, G)`` per layer, e.g. from :func:`~kfacbench.optim.factors.kronecker_factors`) and
    λ = ``damping``; parameters outside the covered layers get −∇h (the identity), as in K-FAC.

    ``factored``: (Ā + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹ (§6.3), i.e. G_d⁻¹ V Ā_d⁻¹ on the gradient
    matrix V; ``exact``: (Ā ⊗ G + λI)⁻¹ through the factors' eigendecompositions,
    Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ.
    """
    mats, rest = _layer_matrices(layers, grad)
    natural = []
    for v, (a, g) in zip(mats, factors, strict=True):
        if how == "factored":
            pi = factored_damping_pi(a, g)
            root = math.sqrt(damping)
            eye_a = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            eye_g = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
            nat = torch.linalg.solve(g + (root / pi) * eye_g, v)
            natural.append(torch.linalg.solve(a + (pi * root) * eye_a, nat.T).T)
        else:
            da, qa = torch.linalg.eigh(a)
            dg, qg = torch.linalg.eigh(g)
            rotated = qg.T @ v @ qa / (torch.outer(dg.clamp_min(0), da.clamp_min(0)) + damping)
            natural.append(qg @ rotated @ qa.T)
    return _descent(layers, natural, rest)


def _layer_matrices(
    layers: Sequence[Layer], grad: Sequence[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """``grad`` (in :func:`parameters_of` order) as one ``(out, in)`` gradient matrix per
    covered layer, and the rest (parameters of uncovered modules)."""
    mats, i = [], 0
    for layer in layers:
        n = len(layer.params())
        mats.append(grad_matrix(layer, grad[i : i + n]))
        i += n
    return mats, list(grad[i:])


def _descent(
    layers: Sequence[Layer], natural: Sequence[Tensor], rest: Sequence[Tensor]
) -> list[Tensor]:
    """−(preconditioned gradient) per parameter: each layer's matrix split back into weight and
    bias, −∇h for the uncovered parameters (the identity, as K-FAC and SKFAC do)."""
    out = [-t for layer, v in zip(layers, natural, strict=True) for t in split_matrix(layer, v)]
    return out + [-t for t in rest]


def dense_matrix(
    products: Callable[[Sequence[Tensor]], list[Tensor]], params: Sequence[Tensor]
) -> Tensor:
    """The matrix of a product (the Fisher, for :class:`FisherProducts`) formed column by column
    from basis vectors, in the flattened order of ``params``: n products for n parameters, so
    for the small networks (or layers) of the dense diagnostics only."""
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    columns = []
    for j in range(n):
        basis = torch.zeros(n, dtype=params[0].dtype, device=params[0].device)
        basis[j] = 1.0
        pieces = [t.view_as(p) for t, p in zip(basis.split(sizes), params, strict=True)]
        columns.append(torch.cat([t.flatten() for t in products(pieces)]))
    return torch.stack(columns, dim=1)


# ---------------------------------------------------------------- along training (`diagnose`)

DIAGNOSTIC_BATCH = 1000
"""Examples of the fixed diagnostic batch (the first of the training set), at most."""

MAX_EXACT_OUTPUTS = 64
"""Largest network output for which K-FAC's factors use the exact (type-2) Fisher: one backward
pass per output. Wider outputs (the autoencoders' 784 pixels) use one sampled target per example."""


def method_damping(method: object) -> float | None:
    """The λ a K-FAC or SKFAC run uses now (with K-FAC's ℓ2 cost η, its objective's part of the
    curvature), or ``None`` for a method without curvature damping."""
    lam = getattr(method, "lam", None)
    if lam is None:
        return None
    return float(lam) + float(getattr(method, "eta", 0.0))


def method_direction(method: object, grad: list[Tensor]) -> list[Tensor] | None:
    """The direction the run's own optimizer would take from ``grad`` now, with its inverses as
    they are (refreshed up to T_inv steps ago: the stale approximation a real run uses); ``None``
    for a method without one. Its parameter order is :func:`parameters_of`'s."""
    precondition = getattr(method, "_precondition", None)
    if precondition is not None and getattr(method, "gamma", None) is not None:
        if getattr(method, "steps", 0) == 0:
            return None  # no inverse yet
        return list(precondition(grad, method.gamma, True))  # type: ignore[attr-defined]
    natural = getattr(method, "_natural", None)
    if natural is not None and getattr(method, "roots", None) is not None:
        if any(c.a_inv is None for c in method.roots):  # type: ignore[attr-defined]
            return None
        assemble = method._assemble  # type: ignore[attr-defined]
        return [-t for t in assemble(natural(grad), grad)]
    return None


def checkpoint_rows(
    problem: Problem,
    method: object,
    x: Tensor,
    y: Tensor,
    *,
    fisher: ReferenceFisher,
    damping: float,
    generator: torch.Generator,
) -> list[dict[str, object]]:
    """The diagnostics of one checkpoint on the batch ``(x, y)``: the reference's CG residual and
    iterations, and cosine, model-reduction ratio and α* of each applicable approximation.

    Approximations, each named with the Fisher its statistics estimate (``[exact]``,
    ``[sampled]``, ``[empirical]``): ``gradient`` (−∇h, SGD's direction); from this batch's
    statistics, ``kfac`` and ``kfac-exact-damping`` (block-diagonal, factored or exact damping),
    ``kfac-tridiag`` (chains of Linear layers) and ``skfac`` (``skfac-sum`` and
    ``skfac-subsample`` for conv networks); and ``run``, the cell's own optimizer with the
    inverses it has now (stale by up to T_inv steps)."""
    layers, params = parameters_of(problem.model)
    products = FisherProducts(problem, params, x, y, fisher)
    grad = products.gradient()
    solve = conjugate_gradient(products, grad, damping)
    exact = [-t for t in solve.x]
    rows: list[dict[str, object]] = [
        {"approximation": "reference", "metric": "cg_residual", "value": solve.residual},
        {"approximation": "reference", "metric": "cg_iterations", "value": float(solve.iterations)},
        {"approximation": "reference", "metric": "damping", "value": damping},
    ]
    directions: dict[str, list[Tensor]] = {"gradient": [-t for t in grad]}
    if layers:
        outputs = products.output[0].numel()
        kind = fisher if fisher == "empirical" or outputs <= MAX_EXACT_OUTPUTS else "sampled"
        found = kronecker_factors(problem.model, problem, x, y, fisher=kind, generator=generator)
        pairs = [found[layer.name] for layer in layers]
        directions[f"kfac[{kind}]"] = kfac_direction(layers, pairs, grad, damping, "factored")
        directions[f"kfac-exact-damping[{kind}]"] = kfac_direction(
            layers, pairs, grad, damping, "exact"
        )
        rows_kind: Literal["sampled", "empirical"] = (
            "empirical" if fisher == "empirical" else "sampled"
        )
        chain = len(layers) > 1 and len(params) == sum(len(c.params()) for c in layers)
        if chain and all(c.kind == "linear" for c in layers):
            directions[f"kfac-tridiag[{rows_kind}]"] = tridiag_direction(
                problem, layers, x, y, grad, damping, rows_kind, generator
            )
        reductions = ("sum", "subsample") if any(c.kind == "conv2d" for c in layers) else ("sum",)
        for reduction in reductions:
            name = "skfac" if len(reductions) == 1 else f"skfac-{reduction}"
            directions[f"{name}[{rows_kind}]"] = skfac_direction(
                problem, layers, x, y, grad, damping, rows_kind, generator, reduction
            )
    own = method_direction(method, grad)
    if own is not None:
        directions["run"] = own
    for name, direction in directions.items():
        q = quality(products, damping, grad, exact, direction)
        for metric in ("cosine", "model_ratio", "alpha"):
            rows.append({"approximation": name, "metric": metric, "value": getattr(q, metric)})
    return [{"fisher": fisher, "layer": "all", **row} for row in rows]


@dataclass(frozen=True)
class Checkpoint:
    """What one checkpoint's diagnostics are computed from (given to a :class:`CheckpointPart`).

    Attributes:
        cell: the cell.
        step: the training step.
        problem: the model, at this step, and its output distribution.
        method: the cell's optimizer, with its state at this step.
        x: the fixed diagnostic batch's inputs.
        y: its targets.
        fisher: the Fisher of the reference.
        damping: λ at this step.
        run_dir: the run directory (for files beside the table, e.g. heatmaps).
    """

    cell: Cell
    step: int
    problem: Problem
    method: object
    x: Tensor
    y: Tensor
    fisher: ReferenceFisher
    damping: float
    run_dir: Path


@dataclass(frozen=True)
class CheckpointPart:
    """Further diagnostics computed at every checkpoint, kept in a part file of their own
    (``parts/<cell-id>.s<step>.<name>.diagnostics.parquet``), so that each part is resumed on its
    own: a run diagnosed without it gains it on ``--resume`` without recomputing the rest.

    Attributes:
        name: the part's name in its file name.
        compute: its rows (each with ``approximation``, ``layer``, ``metric`` and ``value``, and
            optionally ``rank`` and ``fisher``); an empty list marks the checkpoint done too.
    """

    name: str
    compute: Callable[[Checkpoint], list[dict[str, object]]]


def diagnostics_frame(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Rows of ``diagnostics.parquet`` in its column order: frames without ``rank`` (written
    before it existed) get it missing, and ``rank`` is a nullable integer column."""
    if not frames:
        table = pd.DataFrame(columns=list(DIAGNOSTIC_COLUMNS))
    else:
        table = pd.concat(
            [f.reindex(columns=list(DIAGNOSTIC_COLUMNS)) for f in frames], ignore_index=True
        )
    return table.astype({"rank": "Int64"})


def diagnose_cells(
    cells: Sequence[Cell],
    run_dir: Path,
    options: RunOptions,
    at: Sequence[int],
    *,
    fisher: ReferenceFisher = "exact",
    damping: float | None = None,
    parts: Sequence[CheckpointPart] = (),
    on_checkpoint: Callable[[Cell, int, str], None] | None = None,
) -> pd.DataFrame:
    """Train each cell as ``run`` does (same core, model, data and seed) and diagnose it at the
    steps ``at``; write ``run_dir/diagnostics.parquet`` and return it.

    Each checkpoint's rows are kept in ``parts/<cell-id>.s<step>.diagnostics.parquet`` (the
    matrix-free scores of :func:`checkpoint_rows`) and one file per further part in ``parts``
    (e.g. the dense diagnostics, :mod:`kfacbench.diagnostics.dense`): a resumed invocation trains
    through a checkpoint whose files all exist (training is deterministic) without computing its
    diagnostics again, and computes only the missing parts of the others. The diagnostic batch
    is fixed: the first :data:`DIAGNOSTIC_BATCH` training examples (at most the cell's batch
    size). λ is the cell's own damping at each checkpoint (K-FAC, SKFAC), else ``damping``. The
    diagnostic passes leave the model's buffers (BatchNorm statistics) as they were.

    Raises:
        KfacbenchError: ``at`` empty or negative, or no λ for a cell without damping.
    """
    if not at or min(at) < 0:
        raise KfacbenchError(f"--at needs steps >= 0, got {list(at)}")
    folder = run_dir / "parts"
    folder.mkdir(parents=True, exist_ok=True)
    data = DataCache(options)
    names = [None, *(p.name for p in parts)]
    for cell in cells:
        todo = [
            s
            for s in sorted(set(at))
            if not all(_part(folder, cell.id, s, n).exists() for n in names)
        ]
        if todo:
            _diagnose_cell(
                cell, data, options, run_dir, todo, fisher, damping, parts, on_checkpoint
            )
    frames = [pd.read_parquet(f) for f in sorted(folder.glob("*.diagnostics.parquet"))]
    table = diagnostics_frame(frames)
    atomic_write_parquet(run_dir / "diagnostics.parquet", table)
    return table


def _part(parts: Path, cell_id: str, step: int, name: str | None = None) -> Path:
    infix = "" if name is None else f".{name}"
    return parts / f"{cell_id}.s{step}{infix}.diagnostics.parquet"


def _diagnose_cell(
    cell: Cell,
    data: DataCache,
    options: RunOptions,
    run_dir: Path,
    todo: Sequence[int],
    fisher: ReferenceFisher,
    damping: float | None,
    parts: Sequence[CheckpointPart],
    on_checkpoint: Callable[[Cell, int, str], None] | None,
) -> None:
    """Train one cell to the last step of ``todo``, diagnosing it at each step of ``todo``
    (the parts whose files are missing)."""
    device = resolve_device(options.device or cell.settings.device)
    prepared = prepare_cell(cell, device, data)
    model = prepared.problem.model
    n = min(DIAGNOSTIC_BATCH, cell.batch_size, prepared.splits.train_x.shape[0])
    x, y = prepared.splits.train_x[:n], prepared.splits.train_y[:n]
    generator = torch.Generator(device=device).manual_seed(cell.seed)
    folder = run_dir / "parts"
    meta = {"cell_id": cell.id, "label": cell.label, "optimizer": cell.optimizer}

    def write(step: int, name: str | None, rows: list[dict[str, object]]) -> None:
        frame = pd.DataFrame([meta | {"step": step, "fisher": fisher} | r for r in rows])
        atomic_write_parquet(_part(folder, cell.id, step, name), diagnostics_frame([frame]))

    def checkpoint(step: int) -> None:
        if step not in todo:
            return
        lam = method_damping(prepared.method)
        lam = damping if lam is None else lam
        if lam is None:
            raise KfacbenchError(f"{cell.label}: no damping to diagnose with; give --damping")
        saved = {k: b.clone() for k, b in model.named_buffers()}
        problem, method = prepared.problem, prepared.method
        point = Checkpoint(cell, step, problem, method, x, y, fisher, lam, run_dir)
        try:
            if not _part(folder, cell.id, step).exists():
                rows = checkpoint_rows(
                    problem, method, x, y, fisher=fisher, damping=lam, generator=generator
                )
                write(step, None, rows)
            for part in parts:
                if not _part(folder, cell.id, step, part.name).exists():
                    write(step, part.name, part.compute(point))
        finally:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(saved[k])
        if on_checkpoint is not None:
            on_checkpoint(cell, step, "ok")

    checkpoint(0)
    last = max(todo)
    if last == 0:
        return
    result = train(
        prepared.problem,
        prepared.method,
        prepared.splits,
        replace(prepared.config, max_steps=last, max_seconds=None),
        metric=prepared.workload.metric,
        reached=lambda value: False,
        on_step=checkpoint,
    )
    if result.status != "ok" and on_checkpoint is not None:
        on_checkpoint(cell, result.steps, f"{result.status}: {result.reason}")


def _layer_statistics(
    problem: Problem,
    layers: Sequence[Layer],
    x: Tensor,
    y: Tensor,
    fisher: Literal["sampled", "empirical"],
    generator: torch.Generator,
    *,
    as_rows: bool,
) -> list[tuple[Tensor, Tensor]]:
    """Per layer, its inputs and its Fisher output-gradients on the batch: rows (ā with the bias
    coordinate, g) when ``as_rows``, else the raw input and the gradient map (SKFAC's
    :func:`~kfacbench.optim.skfac.factor_rows` takes those)."""
    capture = Capture(layers)
    try:
        with capture.recording():
            output = problem.forward(x)
        grads = output_grads(
            capture, layers, problem, output, y, fisher=fisher, generator=generator,
            retain_graph=False, as_rows=as_rows,
        )  # fmt: skip
        inputs = [capture.inputs(c) if as_rows else capture.raw_input(c) for c in layers]
        return list(zip(inputs, grads, strict=True))
    finally:
        capture.clear()


def tridiag_direction(
    problem: Problem,
    layers: Sequence[Layer],
    x: Tensor,
    y: Tensor,
    grad: Sequence[Tensor],
    damping: float,
    fisher: Literal["sampled", "empirical"],
    generator: torch.Generator,
) -> list[Tensor]:
    """Δ = −F̂⁻¹∇h with K-FAC's block-tridiagonal inverse (§4.3) of a chain of Linear layers,
    from this batch's diagonal and cross factors, diagonal blocks damped the factored way."""
    stats = _layer_statistics(problem, layers, x, y, fisher, generator, as_rows=True)
    m = x.shape[0]
    diag_a, diag_g = [], []
    root = math.sqrt(damping)
    for layer, (a_rows, g_rows) in zip(layers, stats, strict=True):
        a, g = factors(layer, a_rows, g_rows, m)
        pi = factored_damping_pi(a, g)
        diag_a.append(a + pi * root * torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
        diag_g.append(g + root / pi * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    cross = [cross_factors(a0, a1, g0, g1, m) for (a0, g0), (a1, g1) in itertools.pairwise(stats)]
    inverse = tridiag_inverse(diag_a, diag_g, [ca for ca, _ in cross], [cg for _, cg in cross])
    mats, rest = _layer_matrices(layers, grad)
    return _descent(layers, tridiag_apply(inverse, mats), rest)


def skfac_direction(
    problem: Problem,
    layers: Sequence[Layer],
    x: Tensor,
    y: Tensor,
    grad: Sequence[Tensor],
    damping: float,
    fisher: Literal["sampled", "empirical"],
    generator: torch.Generator,
    reduction: str = "sum",
    samples: int = 4,
) -> list[Tensor]:
    """Δ = −(Ā_δ ⊗ G_δ)⁻¹∇h with SKFAC's rank-r factors of this batch (Tang et al. 2021: rows
    reduced over conv positions by ``reduction``, Woodbury inverses).

    Damped at K-FAC's effective damping: λ split over the factors by π (:func:`pi_split`, the
    rule of :func:`kfac_direction`), not SKFAC's official √λ each. Under reduce-sum Ā is |T|²
    times K-FAC's Ā, so √λ each would damp it |T|² times less than K-FAC is damped, and the
    comparison would measure the damping's scale, not the factors' quality."""
    stats = _layer_statistics(problem, layers, x, y, fisher, generator, as_rows=False)
    rows: list[Tensor] = []
    dampings: list[Tensor] = []
    for layer, (raw, g) in zip(layers, stats, strict=True):
        ra, rg = factor_rows(
            layer, raw, g, reduction=reduction, samples=samples, generator=generator
        )
        root = torch.tensor(math.sqrt(damping), dtype=ra.dtype, device=ra.device)
        rows += [ra, rg]
        dampings += pi_split(ra, rg, root)
    inverses = damped_inverses(rows, dampings)
    mats, rest = _layer_matrices(layers, grad)
    natural = [kronecker_apply(inverses[2 * k + 1], inverses[2 * k], v) for k, v in enumerate(mats)]
    return _descent(layers, natural, rest)
