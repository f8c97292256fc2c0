"""K-FAC (Martens & Grosse 2015) as a Method of the training core and as a library optimizer.

Every part of the paper's algorithm is here and switchable, so the suite can measure what each
costs and buys:

- Kronecker-factored Fisher blocks F_ii ≈ Ā ⊗ G from a backward pass with targets sampled from
  the model (§3; ``fisher``), kept as exponential moving averages with ε_k = min(1 − 1/k, 0.95)
  (§5), updated every ``cov_interval`` steps on a fraction of the batch;
- factored Tikhonov damping (§6.3): (Ā + πγI) ⊗ (G + γ/π I), π² = (tr Ā/dim Ā)/(tr G/dim G);
- inverses refreshed every ``inv_interval`` (T3) steps and at each of the first three steps, by
  eigendecomposition (so damping changes are a rescale of eigenvalues), Cholesky, or explicit
  inversion; float64 retry with a warning when float32 fails;
- block-diagonal (§4.2) or block-tridiagonal (§4.3, ``structure = "tridiag"``) inverse;
- re-scaling of the update with the exact Fisher and momentum (§6.4, §7): δ = αΔ + μδ₀ minimising
  the quadratic model M(δ) = ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ, with Fisher-vector products from
  Jacobian-vector products (torch.func), never forming F;
- Levenberg–Marquardt adaptation of λ every T1 steps (§6.5) and the greedy search over γ every
  T2 steps (§6.6).

All damping arithmetic (λ, γ, π, the 2×2 solve, the LM and γ decisions) stays on the device as
tensors, so a K-FAC step does not synchronise with the host, except in the inverse refresh every
T3 steps (eigh/Cholesky check their result).

Presets (``kfac``, ``kfac-tridiag``, ``kfac-fast``) are registry entries with different defaults;
``kfac-fast`` is the variant distributed implementations use: fixed damping, no re-scaling, the
preconditioned gradient applied by SGD with momentum.

Size: the KFAC class is about 600 lines: its factors, damping (fixed, LM-adapted or searched)
and the inverse refresh share one per-layer state. The exact-Fisher re-scaling and
Levenberg–Marquardt (§6.4–6.5) are in :mod:`kfacbench.optim.rescale`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from kfacbench.core.compiling import CompileMode, PhaseCompiled, compiled
from kfacbench.core.graphs import land
from kfacbench.core.memory import count_bytes
from kfacbench.core.method import (
    HParamValue,
    Method,
    MethodContext,
    MethodSpec,
    Param,
    hparams_from,
)
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.distributed import Dist, PendingMean, mean_over_ranks
from kfacbench.errors import KfacbenchError
from kfacbench.optim.base import IterateAverage, fp32_matmuls, gradients
from kfacbench.optim.capture import (
    Capture,
    Layer,
    find_layers,
    fisher_output_grads,
    grad_matrix,
    other_params,
    split_matrix,
)
from kfacbench.optim.factors import (
    WEIGHT_SHARING,
    accumulate_gram,
    cross_factors,
    factor_rows,
    factors,
)
from kfacbench.optim.inverses import (
    INVERSE_METHODS,
    DampedInverter,
    bucket_ratio,
    plan_buckets,
    robust_eigh,
)
from kfacbench.optim.linalg_probe import choose, refresh_shapes
from kfacbench.optim.owners import STRATEGIES, LayerOwners
from kfacbench.optim.rescale import QuadraticRescaling
from kfacbench.optim.schedules import growing_batch_size
from kfacbench.optim.sgd import SGD
from kfacbench.optim.tridiag import TridiagInverse, tridiag_apply, tridiag_inverse

FISHERS = ("sampled", "empirical", "exact")


def _decay_per_step(base: float, interval: int) -> float:
    """ω = base^T: the paper's per-adjustment factor for an adjustment every T steps."""
    return base**interval


@dataclass
class LayerCurvature:
    """The statistics and inverse pieces of one preconditioned layer.

    Attributes:
        layer: the layer.
        a, g: moving averages of the Kronecker factors Ā and G.
        pi: π of the factored damping (§6.3), fixed at the last inverse refresh.
        qa, da, qg, dg: eigendecompositions (``eigh``), or ``None``.
        a_inv, g_inv: damped inverses (``cholesky``/``inv``), or ``None``.
    """

    layer: Layer
    a: torch.Tensor | None = None
    g: torch.Tensor | None = None
    pi: torch.Tensor | None = None
    qa: torch.Tensor | None = None
    da: torch.Tensor | None = None
    qg: torch.Tensor | None = None
    dg: torch.Tensor | None = None
    a_inv: torch.Tensor | None = None
    g_inv: torch.Tensor | None = None


class KFAC(QuadraticRescaling, Method):
    """K-FAC on any ``nn.Module`` whose curvature is captured for its Linear and Conv2d layers.

    Parameters of other modules (BatchNorm, ...) get the identity preconditioner: with re-scaling
    they are part of the same δ = αΔ + μδ₀, otherwise they follow SGD with momentum.

    Args:
        problem: the model and its output distribution.
        lr: learning rate of the SGD-with-momentum update (``rescale=False`` only).
        momentum: momentum μ of that update (``rescale=False`` only; with re-scaling μ is solved
            for each step when ``rescale_momentum`` is on).
        fisher: ``sampled`` (targets from the model: the paper's choice), ``empirical`` (data
            labels) or ``exact`` (type-2: one backward per output, for models with few outputs).
        cov_interval: steps between factor updates.
        cov_fraction: fraction of the minibatch used for the factor statistics.
        weight_sharing: ``expand`` or ``reduce``, the factors of a layer applied at several
            positions (sequences, conv maps; Eschenhagen et al. 2023, see
            :mod:`~kfacbench.optim.factors`).
        ema_max: cap of the moving-average weight ε_k = min(1 − 1/k, ema_max) (§5: 0.95).
        damping: initial λ (λ₀ = 150 in the paper); with ``adapt_gamma`` off, γ = sqrt(λ + η).
        weight_decay: η, the ℓ2 cost of the objective (1e-5 for the autoencoders).
        inv_interval: T3, steps between inverse refreshes (every step for the first three).
        inverse_method: ``eigh`` | ``cholesky`` | ``inv`` | ``newton`` | ``auto``
            (:mod:`~kfacbench.optim.inverses`). With adaptive damping (LM, γ search) ``eigh``
            and ``auto`` keep the eigendecomposition, so a new γ rescales eigenvalues; with fixed
            damping a refresh forms the damped inverses, one call per size bucket, and ``auto``
            picks each bucket's method from the device's measured linear algebra.
        structure: ``blockdiag`` (§4.2) or ``tridiag`` (§4.3, chains of Linear layers).
        rescale: choose α (and μ) with the exact Fisher's quadratic model (§6.4).
        rescale_momentum: include the previous update δ₀ in the quadratic model (§7).
        adapt_damping: Levenberg–Marquardt adjustment of λ every ``lm_interval`` (T1) steps.
        lm_interval: T1 (5 in the paper); ω₁ = (19/20)^T1.
        lm_include_damping: whether ρ's denominator uses M with λ (True) or without (False,
            the kfac-jax default; the paper's text is ambiguous here (?)).
        adapt_gamma: greedy search of γ over {ω₂γ, γ, γ/ω₂} every ``gamma_interval`` steps (§6.6).
        gamma_tracks_lambda: between searches γ moves with √(λ+η): γ = c·√(λ+η), and the search
            adapts c (with ``adapt_gamma``; ignored without it, where γ = √(λ+η)). The paper
            starts γ at √(λ₀+η) and then keeps it apart from λ (off: the literal rule). Its
            ω₂ = (19/20)^(T2/2) is exactly how far √λ falls in T2 steps when Levenberg–Marquardt
            lowers λ at every chance, so a γ moved only by the search can at best keep pace with
            a falling λ, never catch up with it.
        gamma_interval: T2 (20 in the paper); ω₂ = sqrt(19/20)^T2.
        gamma_ratio_bound: m ≥ 1 keeps γ within ω₂^m and ω₂^−m of √(λ+η) at every step (the
            paper's γ "near √(λ+η), corrected by a local search"; default 1); 0 leaves it
            unbounded. On the reproduction run's CURVES cell the unbounded search raised
            c = γ/√(λ+η) at almost every search (1.7·10⁶ by step 600): λ fell to its floor, the
            steps turned into scaled gradients and K-FAC stalled at recon error 19.6; with m = 1
            (and m = 2) it reached the target in 350 steps, ahead of every SGD of the grid
            (README, "The γ search on CURVES").
        gamma_criterion: how the γ candidates are scored: ``loss``, the objective h(θ + δ) on
            the minibatch of each candidate's re-scaled update (one extra forward pass per
            candidate; the default), or ``model``, the damped quadratic model value M(δ)
            (§6.6 names both and reports similar results). On CURVES the literal rule
            (``model``, γ apart from λ) picks the larger γ at every search while λ falls
            10⁴-fold: M includes (λ+η)‖δ‖², and while λ dominates the curvature the damped model
            favours gradient-like steps; γ ends ~10⁴ × √λ and K-FAC stays on the plateau. With
            γ tracking λ and candidates scored by h, it leaves the plateau as soon as γ fixed to
            √(λ+η) does (README, "The γ search on CURVES").
        growing_batch: when > 0, the iteration from which the whole training set is the
            minibatch; m_k = min(m₁ exp((k − 1)/b), |S|) from the cell's batch size m₁ (§13,
            tensorflow/kfac's example uses 500). 0 keeps the batch size fixed.
        polyak: decay of the Polyak average of the iterates used for evaluation (§13 (?):
            0.99); 0 evaluates the current iterate.
        seed: seed of the generator used to sample Fisher targets.
        dist: the process group of a data-parallel run, or ``None``. Factors are all-reduced
            (bucketed, asynchronously: launched after the curvature pass, awaited when next
            needed), each layer's inversion is done by one owner rank (balanced by d_A³ + d_G³),
            and the exact-Fisher quadratic model's batch means are averaged over ranks, so every
            rank takes the update of the global batch.
        dist_strategy: ``comm-opt`` (owners broadcast inverses at each refresh, every rank
            preconditions every layer) or ``mem-opt`` (only the owner keeps a layer's inverses;
            it broadcasts the preconditioned gradient every step). The block-tridiagonal inverse
            couples all layers and is computed on every rank.
        compile: the torch.compile mode of the compilable regions (:meth:`compiled_phases`);
            ``off`` runs eagerly.
        cuda_graph: steps may be replayed from CUDA graphs (:meth:`graph_key`): refreshes land
            in place, in the memory the graphs read.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        lr: float = 1.0,
        momentum: float = 0.9,
        fisher: str = "sampled",
        cov_interval: int = 1,
        cov_fraction: float = 1.0,
        weight_sharing: str = "expand",
        ema_max: float = 0.95,
        damping: float = 150.0,
        weight_decay: float = 1e-5,
        inv_interval: int = 20,
        inverse_method: str = "eigh",
        structure: str = "blockdiag",
        rescale: bool = True,
        rescale_momentum: bool = True,
        adapt_damping: bool = True,
        lm_interval: int = 5,
        lm_include_damping: bool = False,
        adapt_gamma: bool = True,
        gamma_tracks_lambda: bool = True,
        gamma_interval: int = 20,
        gamma_ratio_bound: int = 1,
        gamma_criterion: str = "loss",
        growing_batch: int = 0,
        polyak: float = 0.0,
        seed: int = 0,
        dist: Dist | None = None,
        dist_strategy: str = "comm-opt",
        compile: CompileMode = "off",
        cuda_graph: bool = False,
    ) -> None:
        if inverse_method not in INVERSE_METHODS:
            raise KfacbenchError(
                f"unknown inverse_method {inverse_method!r}; known: {', '.join(INVERSE_METHODS)}"
            )
        if adapt_gamma and inverse_method not in ("eigh", "auto"):
            raise KfacbenchError(
                "adapt_gamma needs inverse_method = 'eigh' or 'auto' (the γ search rescales"
                " eigenvalues; "
                "with cholesky/inv it would need three new factorisations every T2 steps)"
            )
        if (adapt_damping or adapt_gamma) and not rescale:
            raise KfacbenchError(
                "adapt_damping and adapt_gamma need rescale = true (they use the exact-Fisher "
                "quadratic model)"
            )
        if fisher not in FISHERS:
            raise KfacbenchError(f"unknown fisher {fisher!r}; known: {', '.join(FISHERS)}")
        if weight_sharing not in WEIGHT_SHARING:
            raise KfacbenchError(
                f"unknown weight_sharing {weight_sharing!r}; known: {', '.join(WEIGHT_SHARING)}"
            )
        if dist_strategy not in STRATEGIES:
            raise KfacbenchError(
                f"unknown dist_strategy {dist_strategy!r}; known: {', '.join(STRATEGIES)}"
            )
        self.problem = problem
        self.model = problem.model
        layers, others = find_layers(self.model)
        self.curv = [LayerCurvature(layer) for layer in layers]
        self.capture = Capture(layers)
        self.other_params: list[torch.Tensor] = list(other_params(self.model, layers))
        self.uncovered = [name for name, _ in others]
        if structure == "tridiag":
            if any(c.layer.kind != "linear" for c in self.curv) or self.other_params:
                raise KfacbenchError(
                    "structure = 'tridiag' needs a chain of Linear layers (the autoencoders); "
                    "this model has conv or other parameterised layers"
                )
            if fisher == "exact":
                raise KfacbenchError("structure = 'tridiag' supports fisher = sampled | empirical")
        elif structure != "blockdiag":
            raise KfacbenchError(f"unknown structure {structure!r}; known: blockdiag, tridiag")
        self.params: list[torch.Tensor] = [
            *(p for c in self.curv for p in c.layer.params()),
            *self.other_params,
        ]
        device = next(self.model.parameters()).device
        self.device = device
        self.lr = lr
        self.momentum = momentum
        self.fisher = fisher
        self.cov_interval = cov_interval
        self.cov_fraction = cov_fraction
        self.weight_sharing = weight_sharing
        self.ema_max = ema_max
        self.eta = weight_decay
        self.inv_interval = inv_interval
        self.inverse_method = inverse_method
        self.structure = structure
        self.rescale = rescale
        self.rescale_momentum = rescale_momentum
        self.adapt_damping = adapt_damping
        self.lm_interval = lm_interval
        self.omega1 = _decay_per_step(19 / 20, lm_interval)
        self.lm_include_damping = lm_include_damping
        self.adapt_gamma = adapt_gamma
        self.gamma_tracks_lambda = gamma_tracks_lambda
        self.gamma_ratio_bound = gamma_ratio_bound
        self.gamma_interval = gamma_interval
        self.fixed_damping = not (adapt_damping or adapt_gamma)
        if gamma_criterion not in ("loss", "model"):
            raise KfacbenchError(f"unknown gamma_criterion {gamma_criterion!r}; known: loss, model")
        self.gamma_criterion = gamma_criterion
        self.omega2 = _decay_per_step(math.sqrt(19 / 20), gamma_interval)
        self.lam = torch.tensor(float(damping), device=device)
        self.gamma = torch.sqrt(self.lam + self.eta)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.steps = 0
        self.factor_updates = 0
        self.prev_update: list[torch.Tensor] | None = None
        self.tridiag: TridiagInverse | None = None
        self.cross: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sgd = (
            None
            if rescale
            else SGD(problem, lr=lr, momentum=momentum, params=self.params, compile=compile)
        )
        self._compiled_direction = compiled(self._direction, compile)
        self.compile: CompileMode = compile
        self.cuda_graph = cuda_graph
        self.graph_generation = 0  # bumped when a refresh cannot land in place
        if not 0.0 <= polyak < 1.0:
            raise KfacbenchError(f"polyak must be in [0, 1), got {polyak}")
        self.growing_batch = growing_batch
        self.average = IterateAverage(self.params, polyak) if polyak > 0 else None
        self.last_alpha = torch.zeros((), device=device)
        self.last_mu = torch.zeros((), device=device)
        self.last_rho = torch.full((), math.nan, device=device)
        self.dist = dist
        self.pending: PendingMean | None = None
        # Inversions split over ranks by owner (block-diagonal only: tridiag couples the layers).
        self.owners = LayerOwners(
            [float(c.layer.in_dim**3 + c.layer.out_dim**3) for c in self.curv],
            dist,
            dist_strategy,
            split=structure == "blockdiag",
        )
        # CUDA: one GEMM per factor with the EMA folded in; CPU: the blocked symmetric product
        # (measured faster there) and one fused interpolation of all factors.
        self.fused_ema = device.type == "cuda"
        # Adaptive damping keeps the eigenbasis (a new γ rescales eigenvalues, §6.6); otherwise
        # a refresh forms the damped inverses, one call per size bucket.
        self.eigenbasis = inverse_method in ("eigh", "auto") and not self.fixed_damping
        self.inverter = (
            self._inverter(inverse_method)
            if structure == "blockdiag" and not self.eigenbasis
            else None
        )

    def _inverter(self, method: str) -> DampedInverter:
        """The refresh of this rank's damped inverses; ``auto`` resolved per bucket here, when the
        optimizer is built (outside the timed steps: it may probe the device once)."""
        sizes: list[int] = []
        names: list[str] = []
        for c in self._owned():
            sizes += (c.layer.in_dim, c.layer.out_dim)
            names += (f"A of {c.layer.name}", f"G of {c.layer.name}")
        ratio = bucket_ratio(self.device)
        if method == "auto":
            methods = choose(refresh_shapes(sizes, ratio), self.device) if sizes else []
        else:
            methods = [method] * len(plan_buckets(sizes, ratio))
        return DampedInverter(sizes, methods, names, ratio)

    # ---------------------------------------------------------------- the step
    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """One K-FAC step: forward, backward, curvature, inverse, precondition, rescale, update."""
        k = self.steps
        update_cov = k % self.cov_interval == 0
        # The empirical Fisher's g come with the loss gradient; the others need the graph again.
        keep = self.fisher == "empirical"
        with timer.phase("forward"):
            with self.capture.recording(update_cov, keep_grads=keep):
                output = self.problem.forward(x)
            loss = self.problem.loss(output, y)
        with timer.phase("backward"):
            for p in self.params:
                p.grad = None
            loss.backward(retain_graph=update_cov and not keep)
        with fp32_matmuls():  # the curvature arithmetic in full float32 (TF32: forward/backward)
            if update_cov:
                self._land_factors(timer)  # the EMA below must start from the all-reduced factors
                with timer.phase("curvature"):
                    self._update_factors(output, x.shape[0])
                if self.dist is not None:
                    # Launched now, awaited at the next refresh or factor update: between refreshes
                    # the all-reduce overlaps the rest of the step and the next ones.
                    self.pending = PendingMean(self._factor_tensors(), self.dist.world)
            self.capture.clear()
            if k < 3 or k % self.inv_interval == 0:
                self._land_factors(timer)
                with timer.phase("inverse"):
                    self._refresh_inverses()
                if self.owners.shares_inverses:
                    with timer.phase("comm"):
                        self._share_inverses()
            with torch.no_grad():  # no autograd graph for the optimizer's own arithmetic
                with timer.phase("precondition"):
                    grads, nat = self._compiled_direction()
                if self.owners.shares_directions:
                    with timer.phase("comm"):
                        nat = self.owners.share_directions(
                            nat, self.device, [c.layer for c in self.curv]
                        )
                direction = self._assemble(nat, grads, negate=self.rescale)
                if self.rescale:
                    with timer.phase("rescale"):
                        update = self._rescaled_update(x, y, output, grads, direction)
                with timer.phase("update"):
                    if self.rescale:
                        torch._foreach_add_(self.params, update)
                        self.prev_update = update
                    else:
                        assert self.sgd is not None
                        self.sgd.apply(direction, self.lr)  # the preconditioned gradient
                if self.rescale and self.adapt_damping and (k + 1) % self.lm_interval == 0:
                    with timer.phase("rescale"):
                        self._levenberg_marquardt(x, y, loss)
                if self.rescale and self.adapt_gamma and self.gamma_ratio_bound:
                    # After LM: the bound holds for the γ the next step uses.
                    root = torch.sqrt(self.lam + self.eta)
                    width = self.omega2**self.gamma_ratio_bound
                    self.gamma = torch.clamp(self.gamma, min=root * width, max=root / width)
        if self.average is not None:
            self.average.update()
        self.steps += 1
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        """λ, γ and the learning rate (with re-scaling: α and μ of the last step, and ρ of the last
        Levenberg–Marquardt check, NaN before the first). Called at read-back points only, right
        after the loop synchronised the device."""
        if self.rescale:
            return {
                "lr": float(self.last_alpha),
                "damping": float(self.lam),
                "gamma": float(self.gamma),
                "mu": float(self.last_mu),
                "rho": float(self.last_rho),
            }
        return {"lr": self.lr, "damping": float(self.lam), "gamma": float(self.gamma)}

    def graph_key(self, step: int) -> Hashable | None:
        """The steps a CUDA graph may replay (:mod:`kfacbench.core.graphs`): with fixed damping
        and no re-scaling (kfac-fast), every step but the refreshes and those before the moving
        average's weight ε = min(1 − 1/k, ε_max) (§5) stops changing; a factor-update step and a
        plain one have different kernels. The adaptive methods (LM, the γ search, the quadratic
        model's α and μ) decide on the host between refreshes, and data-parallel, tridiagonal
        and compiled steps are not graphed."""
        if not (
            self.fixed_damping
            and not self.rescale
            and self.dist is None
            and self.structure == "blockdiag"
            and self.compile == "off"
        ):
            return None
        if step < 3 or step % self.inv_interval == 0:
            return None
        update_cov = step % self.cov_interval == 0
        if update_cov and 1 - 1 / (self.factor_updates + 1) < self.ema_max:
            return None
        return ("kfac", update_cov, self.graph_generation)

    def graph_replayed(self) -> None:
        """A replayed step's host state: the step and factor-update counts."""
        if self.steps % self.cov_interval == 0:
            self.factor_updates += 1
        self.steps += 1

    def graph_generators(self) -> list[torch.Generator]:
        """The sampled Fisher's target draws."""
        return [self.generator]

    def compiled_phases(self) -> dict[str, PhaseCompiled]:
        """Preconditioning is a compiled region, and so is the SGD update without re-scaling.
        Forward and backward stay eager: the capture hooks record layer inputs and output
        gradients, which tracing would remove. The rescale phase (torch.func JVPs) and the
        inverse refresh (eigh/Cholesky with their host checks) are eager."""
        if self.compile == "off":
            return {}
        phases: dict[str, PhaseCompiled] = {"precondition": "all"}
        if self.sgd is not None:
            phases["update"] = "all"
        return phases

    def batch_size_at(self, step: int, base: int, n: int) -> int:
        """The growing minibatch schedule (§13), or ``base`` when it is off."""
        return growing_batch_size(step, base, n, self.growing_batch) if self.growing_batch else base

    def averaged(self) -> AbstractContextManager[None]:
        """Evaluation on the Polyak-averaged iterates (a no-op when averaging is off)."""
        return self.average.swapped() if self.average is not None else nullcontext()

    def info(self) -> dict[str, Any]:
        """Which layers are preconditioned (and, distributed, which rank inverts each)."""
        info: dict[str, Any] = {
            "preconditioned": [c.layer.name for c in self.curv],
            "identity_preconditioner": self.uncovered,
        }
        if self.inverter is not None:
            info |= self.inverter.info()
        return info | self.owners.info([c.layer.name for c in self.curv])

    def state_bytes(self) -> dict[str, int]:
        """Factors Ā and G (and the tridiagonal cross factors); the eigendecompositions, the
        damped inverses (their size buckets' stacks) or the tridiagonal pieces; the momentum:
        SGD's buffers (kfac-fast) or the previous update δ₀ (§7); π, λ, γ, the buckets' masks
        and the Polyak average. :mod:`kfacbench.optim.memory` predicts the first three from the
        layer shapes."""
        inverses: list[torch.Tensor | None] = [
            getattr(c, f) for c in self.curv for f in ("qa", "da", "qg", "dg", "a_inv", "g_inv")
        ]
        if self.tridiag is not None:
            t = self.tridiag
            inverses += [*t.psi_a, *t.psi_g, *t.k_a, *t.k_g, *t.scale, t.a_inv, t.g_inv]
        buckets = self.inverter.buckets if self.inverter is not None else []
        inverses += [b.previous for b in buckets]
        first = list(self.sgd.velocity if self.sgd is not None else self.prev_update or [])
        other = [c.pi for c in self.curv] + [b.mask for b in buckets]
        other += [self.lam, self.gamma, self.last_alpha, self.last_mu, self.last_rho]
        other += self.average.average if self.average is not None else []
        return count_bytes(
            [
                *(("factors", t) for t in self._factor_tensors()),
                *(("inverses", t) for t in inverses),
                *(("first_order", t) for t in first),
                *(("other", t) for t in other),
            ]
        )

    # ---------------------------------------------------------------- distribution
    def _factor_tensors(self) -> list[torch.Tensor]:
        tensors = [t for c in self.curv for t in (c.a, c.g) if t is not None]
        return tensors + [t for pair in self.cross for t in pair]

    def _land_factors(self, timer: PhaseTimer) -> None:
        """Wait for the factors' pending all-reduce (timed as ``comm``: the part not hidden)."""
        if self.pending is not None:
            with timer.phase("comm"):
                self.pending.wait()
            self.pending = None

    def _inverse_fields(self) -> tuple[str, ...]:
        """What preconditioning reads of a layer: damped inverses, or the eigendecomposition."""
        if self.eigenbasis:
            return ("qa", "da", "qg", "dg")
        return ("a_inv", "g_inv")

    def _share_inverses(self) -> None:
        """comm-opt: every owner broadcasts its layers' inverses to all ranks."""
        fields = self._inverse_fields()
        items = [
            [getattr(c, f) for f in fields] if self.owners.mine(i) else []
            for i, c in enumerate(self.curv)
        ]
        shared = self.owners.broadcast(items, self.device)
        for c, tensors in zip(self.curv, shared, strict=True):
            for f, t in zip(fields, tensors, strict=True):
                setattr(c, f, t)

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """A minibatch mean over this rank's shard turned into the global batch's mean."""
        if self.dist is None:
            return value
        value = value.clone()
        mean_over_ranks([value], self.dist)
        return value

    # ---------------------------------------------------------------- curvature
    def _update_factors(self, output: torch.Tensor, m: int) -> None:
        """EMA of Ā and G (§5) from the captured inputs and the Fisher's output gradients."""
        layers = [c.layer for c in self.curv]
        gs = fisher_output_grads(
            self.capture,
            layers,
            self.problem,
            output,
            self.fisher,  # type: ignore[arg-type]
            self.generator,
        )
        n = max(1, math.ceil(self.cov_fraction * m))
        self.factor_updates += 1
        eps = min(1 - 1 / self.factor_updates, self.ema_max)
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        olds: list[torch.Tensor] = []
        news: list[torch.Tensor] = []
        for c, g in zip(self.curv, gs, strict=True):
            a = self.capture.inputs(c.layer)
            per_example = a.shape[0] // m  # conv: spatial positions per example
            a = a[: n * per_example]
            # Exact Fisher: K blocks of rows (one per output-Hessian column), each like ``a``.
            g = g.reshape(-1, m * per_example, g.shape[-1])[:, : n * per_example].flatten(0, 1)
            rows.append((a, g))
            if c.a is None or c.g is None:
                c.a, c.g = factors(c.layer, a, g, n, self.weight_sharing)
            elif self.fused_ema:
                ra, rg, div_a, div_g = factor_rows(c.layer, a, g, n, self.weight_sharing)
                accumulate_gram(c.a, ra, div_a, 1 - eps)
                accumulate_gram(c.g, rg, div_g, 1 - eps)
            else:
                olds += (c.a, c.g)
                news += factors(c.layer, a, g, n, self.weight_sharing)
        if self.structure == "tridiag":
            new_cross = [
                cross_factors(a0, a1, g0, g1, n) for (a0, g0), (a1, g1) in itertools.pairwise(rows)
            ]
            if not self.cross:
                self.cross = new_cross
            else:
                for (ca, cg), (na, ng) in zip(self.cross, new_cross, strict=True):
                    olds += (ca, cg)
                    news += (na, ng)
        if olds:  # Ā ← εĀ + (1 − ε)Ā_new for every factor at once (one fused call per dtype)
            torch._foreach_lerp_(olds, news, 1 - eps)

    def _refresh_inverses(self) -> None:
        """Decompositions (eigh) or damped inverses (cholesky/inv) of every factor."""
        for c in self.curv:
            if c.a is None or c.g is None:
                raise RuntimeError("K-FAC inverse requested before any factor update")
            self._land(c, "pi", factored_damping_pi(c.a, c.g))
        if self.structure == "tridiag":
            self.tridiag = self._tridiag_pieces(self.gamma)
        elif self.eigenbasis:
            self._batched_eigh()
        else:
            assert self.inverter is not None
            owned = self._owned()
            mats: list[torch.Tensor] = []
            dampings: list[torch.Tensor] = []
            for c in owned:
                assert c.a is not None and c.g is not None and c.pi is not None
                mats += (c.a, c.g)
                dampings += (c.pi * self.gamma, self.gamma / c.pi)
            inverses = self.inverter.refresh(mats, dampings)
            for c, a_inv, g_inv in zip(owned, inverses[::2], inverses[1::2], strict=True):
                self._land(c, "a_inv", a_inv)
                self._land(c, "g_inv", g_inv)

    def _land(self, c: LayerCurvature, name: str, value: torch.Tensor) -> None:
        """Store a refresh's result; under CUDA graphs in place (:func:`.graphs.land`)."""
        if land(c, name, value, in_place=self.cuda_graph):
            self.graph_generation += 1

    def _batched_eigh(self) -> None:
        """Eigendecompose all factors, one batched call per distinct size (fewer launches on a
        GPU when layers share shapes, e.g. an autoencoder's mirrored encoder and decoder)."""
        groups: dict[int, list[tuple[LayerCurvature, str]]] = {}
        for c in self._owned():
            assert c.a is not None and c.g is not None
            groups.setdefault(c.a.shape[0], []).append((c, "a"))
            groups.setdefault(c.g.shape[0], []).append((c, "g"))
        for size, members in groups.items():
            stack = torch.stack([getattr(c, which) for c, which in members])
            vals, vecs = robust_eigh(stack, f"the {len(members)} factors of size {size}")
            for (c, which), d, q in zip(members, vals, vecs, strict=True):
                self._land(c, f"d{which}", d)
                self._land(c, f"q{which}", q)

    def _tridiag_pieces(self, gamma: torch.Tensor) -> TridiagInverse:
        diag_a, diag_g = [], []
        for c in self.curv:
            assert c.a is not None and c.g is not None and c.pi is not None
            diag_a.append(c.a + c.pi * gamma * torch.eye(c.a.shape[0], device=c.a.device))
            diag_g.append(c.g + gamma / c.pi * torch.eye(c.g.shape[0], device=c.g.device))
        return tridiag_inverse(
            diag_a, diag_g, [ca for ca, _ in self.cross], [cg for _, cg in self.cross]
        )

    # ---------------------------------------------------------------- directions
    def _gradient(self) -> list[torch.Tensor]:
        """∇h = ∇(mean loss) + η θ, per parameter in ``self.params`` order."""
        return gradients(self.params, self.eta)

    def _owned(self) -> list[LayerCurvature]:
        return [c for i, c in enumerate(self.curv) if self.owners.mine(i)]

    def _direction(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """∇h and F̆⁻¹∇h at the current γ: the precondition phase (a compiled region when the cell
        compiles)."""
        grads = self._gradient()
        return grads, self._natural(grads, self.gamma, current=True)

    def _precondition(
        self, grads: list[torch.Tensor], gamma: torch.Tensor, current: bool = False
    ) -> list[torch.Tensor]:
        """Δ = −F̆⁻¹∇h: the K-FAC direction for covered layers, −∇h for the others, at a candidate
        γ of the search (or at the current γ: ``current``)."""
        nat = self._natural(grads, gamma, current=current)
        if self.owners.shares_directions:
            nat = self.owners.share_directions(nat, self.device, [c.layer for c in self.curv])
        return self._assemble(nat, grads)

    def _natural(
        self, grads: list[torch.Tensor], gamma: torch.Tensor, *, current: bool
    ) -> list[torch.Tensor | None]:
        """F̆⁻¹∇h as gradient matrices per covered layer (``None`` for a layer another rank
        preconditions under mem-opt). ``current``: ``gamma`` is the γ of the last refresh (its
        tridiagonal pieces and fixed-damping inverses are formed), not a search candidate."""
        i = 0
        mats: list[torch.Tensor] = []
        for c in self.curv:
            n = len(c.layer.params())
            mats.append(grad_matrix(c.layer, grads[i : i + n]))
            i += n
        if self.structure == "tridiag":
            tri = self.tridiag if current else self._tridiag_pieces(gamma)
            assert tri is not None
            return list(tridiag_apply(tri, mats))
        return [
            self._apply_block(c, v, gamma, current) if self.owners.preconditions(i) else None
            for i, (c, v) in enumerate(zip(self.curv, mats, strict=True))
        ]

    def _assemble(
        self, nat: list[torch.Tensor | None], grads: list[torch.Tensor], negate: bool = True
    ) -> list[torch.Tensor]:
        """−(natural gradient) per parameter in ``self.params`` order, −∇h for the others (the
        descent direction); with ``negate`` off, the preconditioned gradient itself, as the SGD
        update takes it (no negation kernels to undo)."""
        out: list[torch.Tensor] = []
        for c, v in zip(self.curv, nat, strict=True):
            assert v is not None
            pieces = split_matrix(c.layer, v)
            out += [-t for t in pieces] if negate else pieces
        rest = grads[sum(len(c.layer.params()) for c in self.curv) :]
        return out + ([-g for g in rest] if negate else list(rest))

    def _apply_block(
        self, c: LayerCurvature, v: torch.Tensor, gamma: torch.Tensor, current: bool
    ) -> torch.Tensor:
        """(Ā + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹ applied to the (out, in) gradient matrix: G⁻¹ V Ā⁻¹."""
        if self.eigenbasis:
            assert c.qa is not None and c.da is not None and c.qg is not None and c.dg is not None
            assert c.pi is not None
            v1 = c.qg.T @ v @ c.qa
            v1 = v1 / torch.outer(c.dg + gamma / c.pi, c.da + c.pi * gamma)
            return c.qg @ v1 @ c.qa.T
        assert c.a_inv is not None and c.g_inv is not None
        return c.g_inv @ v @ c.a_inv


def factored_damping_pi(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """π = sqrt((tr Ā / dim Ā) / (tr G / dim G)) (§6.3), guarded against zero traces."""
    ta = a.diagonal().mean().clamp_min(1e-12)
    tg = g.diagonal().mean().clamp_min(1e-12)
    return torch.sqrt(ta / tg)


_PARAMS: dict[str, Param] = {
    "lr": Param("learning rate of the SGD update (rescale = false only)", bounds="[0, inf)"),
    "momentum": Param("momentum of the SGD update (rescale = false only)", bounds="[0, 1)"),
    "fisher": Param("Fisher estimate (exact: type-2, few outputs)", choices=FISHERS),
    "cov_interval": Param("steps between factor updates", bounds="[1, inf)"),
    "cov_fraction": Param("fraction of the batch used for statistics", bounds="(0, 1]"),
    "weight_sharing": Param("factors of layers shared over positions", choices=WEIGHT_SHARING),
    "ema_max": Param("cap of the moving-average weight ε_k", bounds="[0, 1)"),
    "damping": Param("initial λ (λ₀)", bounds="(0, inf)"),
    "weight_decay": Param("η, the ℓ2 cost of the objective", bounds="[0, inf)"),
    "inverse_method": Param("factor inversion", choices=INVERSE_METHODS),
    "structure": Param("inverse structure", choices=("blockdiag", "tridiag")),
    "rescale": Param("α (and μ) from the exact-Fisher quadratic model (§6.4)"),
    "rescale_momentum": Param("include the previous update in the model (§7)"),
    "adapt_damping": Param("Levenberg–Marquardt adjustment of λ (§6.5)"),
    "lm_interval": Param("T1: steps between λ adjustments", bounds="[1, inf)"),
    "lm_include_damping": Param("ρ's model change includes λ"),
    "adapt_gamma": Param("greedy γ search (§6.6)"),
    "gamma_tracks_lambda": Param("γ = c·√(λ+η) between searches; the search adapts c"),
    "gamma_interval": Param("T2: steps between γ searches", bounds="[1, inf)"),
    "gamma_ratio_bound": Param("m: γ kept within ω₂^±m of √(λ+η) (0: unbounded)", bounds="[0, 64]"),
    "gamma_criterion": Param("γ candidates scored by h(θ+δ) or by M(δ)", choices=("loss", "model")),
    "growing_batch": Param(
        "iteration from which the batch is the full set (0: off)", bounds="[0, inf)"
    ),
    "polyak": Param("Polyak-average decay of evaluated iterates (0: off)", bounds="[0, 1)"),
    "dist_strategy": Param("data-parallel runs: who preconditions (KAISA)", choices=STRATEGIES),
}
"""K-FAC's hyperparameters: keyword arguments of :class:`KFAC`, whose signature holds the
defaults (those of the ``kfac`` preset)."""

PRESETS: dict[str, dict[str, HParamValue]] = {
    "kfac": {},
    "kfac-tridiag": {"structure": "tridiag"},
    "kfac-fast": {
        "lr": 0.1,
        "damping": 1.0,
        "weight_decay": 0.0,
        "rescale": False,
        "adapt_damping": False,
        "adapt_gamma": False,
        "inverse_method": "auto",
    },
}
"""Each registry entry's defaults that differ from :class:`KFAC`'s signature."""

_HELPS: dict[str, dict[str, str]] = {
    "kfac-fast": {
        "lr": "learning rate of the SGD update",
        "damping": "fixed λ (γ = sqrt(λ + η))",
        "inverse_method": "factor inversion (auto: measured per size bucket)",
    },
}
"""The help lines a preset changes the meaning of."""

DEFAULTS_FROM: dict[str, Callable[..., Any]] = dict.fromkeys(PRESETS, KFAC)
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


def _build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> KFAC:
    return KFAC(
        problem,
        **hp,
        seed=ctx.seed,
        dist=ctx.dist,
        compile=ctx.compile,
        cuda_graph=ctx.cuda_graph,
    )


def _spec(name: str, summary: str) -> MethodSpec:
    hparams = hparams_from(KFAC, _PARAMS, PRESETS[name], _HELPS.get(name))
    return MethodSpec(name, summary, hparams, uses_inv_interval=True, build=_build)


SPECS = (
    _spec(
        "kfac",
        "K-FAC as in Martens & Grosse 2015 (sampled Fisher, all adaptation, block-diag)",
    ),
    _spec(
        "kfac-tridiag",
        "K-FAC with the block-tridiagonal inverse (§4.3; chains of Linear layers)",
    ),
    _spec(
        "kfac-fast",
        "K-FAC as distributed implementations run it: fixed damping, no re-scaling, SGD momentum",
    ),
)
