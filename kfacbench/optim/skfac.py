"""SKFAC (Tang et al., CVPR 2021): K-FAC with per-batch low-rank factors inverted by Woodbury.

SKFAC keeps K-FAC's Kronecker-factored curvature (Martens & Grosse 2015, §3) and attacks the
cost of inverting it:

- **Low-rank factors.** Each factor comes from one minibatch, Ā = R_AᵀR_A and G = R_GᵀR_G with one
  scaled row per example, so its rank r is at most the batch size m. When r < d the damped inverse
  is applied through Sherman–Morrison–Woodbury with an r×r Cholesky (:mod:`.lowrank`), and falls
  back to the ordinary damped inverse when r ≥ d. A Woodbury inverse is stored as a dense d×d
  matrix when that is cheaper over the ``inv_interval`` steps it is applied
  (:func:`~kfacbench.optim.lowrank.dense_pays`: r close to d, long intervals).
- **Conv dimension reduction.** A conv layer has one patch row per example *and output position*,
  m·|T| rows, which destroys the low rank. ``reduction`` brings it back to m or m·s rows:

  - ``"sum"``: ā_i = Σ_t ā_{i,t} and g_i = Σ_t g_{i,t} per example (the paper's Reduce Sum);
  - ``"mean"``: the same divided by |T| (what the official code computes);
  - ``"subsample"``: s positions per example drawn uniformly without replacement (Spatial
    Subsampling), seeded.

- **Update.** The preconditioned gradient G_δ⁻¹ ∇W̄ Ā_δ⁻¹ of every layer is applied by SGD with
  momentum; inverses are refreshed every ``inv_interval`` steps, and factors are only measured
  when a refresh will use them (every step costs the extra sampled-target backward pass only if
  ``inv_interval`` is 1).

**Scales** (R rows of a layer on a batch of m examples; ā includes the bias 1, which becomes |T|
under ``"sum"``):

- Linear, and conv under ``"sum"``/``"mean"``: R_A = ā/√m, R_G = g/√m, so Ā = (1/m) Σ_i ā_i ā_iᵀ
  and G = (1/m) Σ_i g_i g_iᵀ, with g the per-example gradient (the official code's
  ``batch_coefficient`` 1/√m on both factors and ``dout·batch_size``). On a Linear layer these are
  exactly K-FAC's per-batch factors (:func:`~kfacbench.optim.factors.factors`).
- Linear layers applied at R positions (a transformer's): ``weight_sharing = "reduce"`` (the
  default) R_A = â/√m, R_G = ĝ/√m with â the mean of an example's ā over positions and ĝ the
  sum of its g, rank m; ``"expand"`` every position a row, R_A = ā/√(mR), R_G = g/√m, rank m·R:
  the roots of K-FAC-reduce's and K-FAC-expand's factors (Eschenhagen et al. 2023; g of a
  per-token mean loss carries the √P of :mod:`~kfacbench.optim.factors`).
- conv under ``"subsample"``: R_A = ā_S/√(m·s), R_G = g_S·√(|T|/(m·s)), so Ā and G are unbiased
  estimates of K-FAC's conv factors in this package's KFC normalisation (Ā the average over all
  patch rows, G summed over positions and averaged over examples), and equal them when s ≥ |T|.

**Damping.** λ is split over the two factors: ``damping_split = "sqrt"`` adds √λ to each (the
official code), ``"pi"`` adds π√λ to Ā and √λ/π to G with π² = (tr Ā/d_A)/(tr G/d_G) (K-FAC
§6.3, ASDL's choice). Unlike π, the equal split sees the scale of the reduction: under ``"sum"``
Ā grows with |T|², so the damping is relatively weaker than under ``"mean"``.

**Moving average (off by default).** The official code uses each refresh's batch alone. With
``factor_decay`` ε > 0 the factor is the exponentially weighted average of the last
``factor_window`` batches' factors (weights ∝ εʲ, j = 0 for the newest, normalised to sum to 1),
whose root is the row-wise concatenation of √wⱼ Rⱼ: it stays low-rank (rank ≤ window·m), so the
Woodbury path still applies. Those batches are the ones just before each refresh.

Weight decay η is part of the objective, as in K-FAC: ∇h = ∇L + ηθ is what gets preconditioned.
Parameters of unsupported modules (BatchNorm) get the identity preconditioner.

Size: the SKFAC class is about 350 lines, and the conv patch reductions (sum, subsample) that make
its factor rows are used by it alone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

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
from kfacbench.distributed import Dist, gather_rows
from kfacbench.errors import KfacbenchError
from kfacbench.optim.base import fp32_matmuls, gradients
from kfacbench.optim.capture import (
    Capture,
    Layer,
    as_float,
    find_layers,
    fisher_output_grads,
    grad_matrix,
    other_params,
    pad_conv_input,
    split_matrix,
)
from kfacbench.optim.factors import WEIGHT_SHARING
from kfacbench.optim.lowrank import DampedInverse, damped_inverses, dense_pays, kronecker_apply
from kfacbench.optim.owners import STRATEGIES, LayerOwners
from kfacbench.optim.schedules import SCHEDULES
from kfacbench.optim.sgd import SGD

REDUCTIONS = ("sum", "mean", "subsample")
DAMPING_SPLITS = ("sqrt", "pi")
FISHERS = ("sampled", "empirical")


# ---------------------------------------------------------------- conv reductions
def conv_output_size(module: nn.Conv2d, padded: Tensor) -> tuple[int, int]:
    """(H', W') of the conv's output for an already padded input ``(m, C, Hp, Wp)``."""
    sizes = []
    for size, k, d, s in zip(
        padded.shape[-2:], module.kernel_size, module.dilation, module.stride, strict=True
    ):
        sizes.append((size - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def conv_patch_sums(module: nn.Conv2d, x: Tensor) -> Tensor:
    """Σ_t ā_t: the sum of the im2col patches of each example over output positions,
    ``(m, C_in·kh·kw)`` in the weight's column order, without the bias column.

    Never forms the im2col matrix (kh·kw times the input): column (c, i, j) of the sum is the sum
    of the padded input over the strided window that kernel offset (i, j) visits, one strided
    slice-and-sum per offset.
    """
    xp = pad_conv_input(module, x)
    h_out, w_out = conv_output_size(module, xp)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    sums = [
        xp[
            ...,
            i * dh : i * dh + sh * (h_out - 1) + 1 : sh,
            j * dw : j * dw + sw * (w_out - 1) + 1 : sw,
        ].sum(dim=(-2, -1))
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(sums, dim=-1).flatten(-2)  # (m, C, kh·kw) -> (m, C·kh·kw)


def conv_patches_at(module: nn.Conv2d, x: Tensor, positions: Tensor) -> Tensor:
    """The im2col patches of each example at the given output positions only.

    Args:
        module: the conv.
        x: its input ``(m, C, H, W)``.
        positions: ``(m, s)`` flat output positions (row-major over the output map) per example.

    Returns:
        ``(m, s, C_in·kh·kw)`` patches, columns in the weight's order, without the bias column;
        gathered directly from the padded input (the full im2col matrix is never formed).
    """
    xp = pad_conv_input(module, x)
    _, w_out = conv_output_size(module, xp)
    (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
    dev = x.device
    rows = (positions // w_out * sh)[:, :, None, None] + (torch.arange(kh, device=dev) * dh)[
        :, None
    ]
    cols = (positions % w_out * sw)[:, :, None, None] + torch.arange(kw, device=dev) * dw
    batch = torch.arange(x.shape[0], device=dev)[:, None, None, None]
    picked = xp.movedim(1, -1)[batch, rows, cols]  # (m, s, kh, kw, C)
    return picked.movedim(-1, 2).flatten(2)  # (m, s, C·kh·kw)


def sample_positions(m: int, positions: int, s: int, generator: torch.Generator) -> Tensor:
    """``(m, s)`` distinct positions in ``range(positions)`` per example, uniformly drawn."""
    device = generator.device
    keys = torch.rand(m, positions, generator=generator, device=device)
    return keys.topk(min(s, positions), dim=1).indices


def pi_split(ra: Tensor, rg: Tensor, root: Tensor) -> list[Tensor]:
    """The dampings [π√λ, √λ/π] of Ā = R_AᵀR_A and G = R_GᵀR_G (K-FAC §6.3's factored damping),
    π² = (tr Ā/d_A)/(tr G/d_G): each factor is damped relative to its own scale, so the damping
    means the same whatever the reduction's scale (under ``"sum"`` Ā grows with |T|²)."""
    pi = torch.sqrt(
        (ra.square().sum() / ra.shape[1]).clamp_min(1e-12)
        / (rg.square().sum() / rg.shape[1]).clamp_min(1e-12)
    )
    return [pi * root, root / pi]


def factor_rows(
    layer: Layer,
    x: Tensor,
    grad: Tensor,
    *,
    reduction: str = "sum",
    samples: int = 1,
    generator: torch.Generator | None = None,
    weight_sharing: str = "reduce",
) -> tuple[Tensor, Tensor]:
    """The scaled rows (R_A, R_G) of one layer's per-batch factors Ā = R_AᵀR_A, G = R_GᵀR_G.

    Args:
        layer: the layer.
        x: its recorded input (:meth:`~kfacbench.optim.capture.Capture.raw_input`).
        grad: the output-gradient of the per-example losses, shaped like the layer's output
            (:func:`~kfacbench.optim.capture.output_grads` with ``as_rows=False``).
        reduction: ``sum``, ``mean`` or ``subsample`` over a conv layer's positions; see the
            module docstring.
        samples: s, positions kept per example by ``subsample``.
        generator: the random source of ``subsample`` (on the layer's device).
        weight_sharing: ``reduce`` or ``expand`` for a Linear layer applied to inputs with
            extra position dimensions (a transformer's): the roots of K-FAC-reduce's or
            K-FAC-expand's factors (Eschenhagen et al. 2023; :func:`~kfacbench.optim.factors.
            factors`).

    Returns:
        ``R_A`` of shape ``(r, in_dim)`` and ``R_G`` of shape ``(r, out_dim)`` with r = m, or
        m·s under ``subsample`` (s capped at the number of positions), or m·R for a Linear
        layer at R positions under ``expand``.
    """
    x = as_float(x)
    m = x.shape[0]
    if layer.kind == "conv2d":
        module = cast(nn.Conv2d, layer.module)
        g = grad.flatten(2)  # (m, C_out, T)
        positions = g.shape[-1]
        if reduction == "subsample":
            if generator is None:
                raise ValueError("reduction = 'subsample' needs a generator")
            pos = sample_positions(m, positions, samples, generator)
            a = conv_patches_at(module, x, pos)
            g = g.gather(2, pos[:, None, :].expand(-1, g.shape[1], -1)).transpose(1, 2)
        else:
            a = conv_patch_sums(module, x)[:, None]  # (m, 1, d)
            g = g.sum(dim=-1)[:, None]  # (m, 1, C_out)
        if layer.has_bias:
            # The bias "patch" is 1 at every position: it sums to |T| (and averages to 1).
            ones = 1.0 if reduction == "subsample" else float(positions)
            a = torch.nn.functional.pad(a, (0, 1), value=ones)
    else:
        a = x.reshape(m, -1, x.shape[-1])
        if layer.has_bias:
            a = torch.nn.functional.pad(a, (0, 1), value=1.0)
        g = grad.reshape(m, -1, layer.out_dim)
        if weight_sharing == "reduce":  # â = mean of the positions' ā, ĝ = sum of their g
            a, g = a.mean(dim=1, keepdim=True), g.sum(dim=1, keepdim=True)
        elif weight_sharing != "expand":
            raise ValueError(f"unknown weight_sharing {weight_sharing!r}; known: expand, reduce")
        r = a.shape[0] * a.shape[1]  # expand: every position a row, Ā their mean
        return a.reshape(r, -1) / math.sqrt(r), g.reshape(r, -1) / math.sqrt(m)
    if positions > 1 and reduction == "mean":
        a, g = a / positions, g / positions
    rows_per_example = a.shape[1]
    r = m * rows_per_example
    a_scale = 1.0 / math.sqrt(r)
    g_scale = math.sqrt(positions / r) if reduction == "subsample" else 1.0 / math.sqrt(m)
    return a.reshape(r, -1) * a_scale, g.reshape(r, -1) * g_scale


# ---------------------------------------------------------------- the optimizer
@dataclass
class LayerRoots:
    """The factor roots of one layer and the inverses formed from them.

    Attributes:
        layer: the layer.
        history: (R_A, R_G) of the most recent batches measured, newest last.
        a_inv, g_inv: the damped inverses of the last refresh.
        rank: r, the number of rows the factors of the last refresh had.
    """

    layer: Layer
    history: deque[tuple[Tensor, Tensor]] = field(default_factory=deque)
    a_inv: DampedInverse | None = None
    g_inv: DampedInverse | None = None
    rank: int = 0


class SKFAC(Method):
    """SKFAC on any ``nn.Module`` (Linear and Conv2d layers preconditioned).

    Args:
        problem: the model and its output distribution.
        lr: learning rate of the SGD-with-momentum update (peak value under a schedule).
        momentum: its momentum μ.
        schedule, warmup_steps, lr_decay, total_steps: the learning-rate schedule (as for SGD).
        damping: λ, split over the two factors by ``damping_split``.
        damping_split: ``sqrt`` (√λ each, the official code) or ``pi`` (π-split, K-FAC §6.3).
        weight_decay: η, added to the gradient before preconditioning.
        fisher: ``sampled`` (targets drawn from the model) or ``empirical`` (data targets).
        reduction: ``sum``, ``mean`` or ``subsample`` for conv layers.
        weight_sharing: ``reduce`` (rank m, the default: the low rank SKFAC is built on) or
            ``expand`` (rank m·R) for Linear layers applied at R positions (Eschenhagen et al.
            2023; :func:`factor_rows`).
        samples: s, the positions per example kept by ``subsample``.
        inv_interval: steps between refreshes of the factors and their inverses.
        factor_decay: ε of the moving average of the factors (0: per-batch factors).
        factor_window: batches averaged when ``factor_decay`` > 0.
        seed: seed of the Fisher targets and the subsampled positions.
        dist: the process group of a data-parallel run, or ``None``. Each rank's factor rows are
            all-gathered after the curvature pass (the global roots are the shards' rows
            stacked, scaled by 1/√world: the factors and rank r of the global batch), each
            layer's two inverses are formed by one owner rank (balanced by their cost), and
            ``dist_strategy`` decides who preconditions, as for K-FAC.
        dist_strategy: ``comm-opt`` or ``mem-opt`` (see :class:`~kfacbench.optim.kfac.KFAC`).
        compile: the torch.compile mode of the compilable regions (:meth:`compiled_phases`);
            ``off`` runs eagerly.
        cuda_graph: steps may be replayed from CUDA graphs (:meth:`graph_key`): refreshes land
            in place, in the memory the graphs read.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        schedule: str = "constant",
        warmup_steps: int = 0,
        lr_decay: float = 0.1,
        total_steps: int | None = None,
        damping: float = 0.03,
        damping_split: str = "sqrt",
        weight_decay: float = 0.0,
        fisher: str = "sampled",
        reduction: str = "sum",
        weight_sharing: str = "reduce",
        samples: int = 4,
        inv_interval: int = 20,
        factor_decay: float = 0.0,
        factor_window: int = 4,
        seed: int = 0,
        dist: Dist | None = None,
        dist_strategy: str = "comm-opt",
        compile: CompileMode = "off",
        cuda_graph: bool = False,
    ) -> None:
        for key, value, known in (
            ("reduction", reduction, REDUCTIONS),
            ("weight_sharing", weight_sharing, WEIGHT_SHARING),
            ("damping_split", damping_split, DAMPING_SPLITS),
            ("fisher", fisher, FISHERS),
            ("dist_strategy", dist_strategy, STRATEGIES),
        ):
            if value not in known:
                raise KfacbenchError(f"unknown {key} {value!r}; known: {', '.join(known)}")
        if damping <= 0:
            raise KfacbenchError(f"SKFAC needs damping > 0 (Woodbury divides by it), got {damping}")
        if not 0.0 <= factor_decay < 1.0:
            raise KfacbenchError(f"factor_decay must be in [0, 1), got {factor_decay}")
        if inv_interval < 1 or samples < 1 or factor_window < 1:
            raise KfacbenchError("inv_interval, samples and factor_window must be at least 1")
        self.problem = problem
        self.model = problem.model
        layers, others = find_layers(self.model)
        self.window = factor_window if factor_decay > 0 else 1
        self.roots = [LayerRoots(layer, deque(maxlen=self.window)) for layer in layers]
        self.capture = Capture(layers)
        self.other_params: list[Tensor] = list(other_params(self.model, layers))
        self.uncovered = [name for name, _ in others]
        self.params: list[Tensor] = [
            *(p for c in self.roots for p in c.layer.params()),
            *self.other_params,
        ]
        device = next(self.model.parameters()).device
        self.lam = torch.tensor(float(damping), device=device)
        self.damping_split = damping_split
        self.eta = weight_decay
        self.fisher = fisher
        self.reduction = reduction
        self.weight_sharing = weight_sharing
        self.samples = samples
        self.inv_interval = inv_interval
        self.decay = factor_decay
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.position_generator = torch.Generator(device=device)
        self.position_generator.manual_seed(seed + 1)
        self.sgd = SGD(
            problem,
            lr=lr,
            momentum=momentum,
            schedule=schedule,
            warmup_steps=warmup_steps,
            lr_decay=lr_decay,
            total_steps=total_steps,
            params=self.params,
            compile=compile,
        )
        self.compile: CompileMode = compile
        self._compiled_direction = compiled(self._direction, compile)
        self.float64_systems = False
        self.cuda_graph = cuda_graph
        self.graph_generation = 0  # bumped when a refresh cannot land in place
        self.steps = 0
        self.device = device
        self.dist = dist
        self.owners = LayerOwners(
            [float(_dense_cost(c.layer)) for c in self.roots], dist, dist_strategy
        )

    def step(self, x: Tensor, y: Tensor, timer: PhaseTimer) -> Tensor:
        """Forward, backward, curvature and inverse (when due), precondition, momentum update."""
        k = self.steps
        refresh = k % self.inv_interval == 0
        # With the moving average, the batches just before each refresh are measured too.
        measure = refresh or (-k) % self.inv_interval < self.window
        keep = self.fisher == "empirical"  # its g come with the loss gradient (capture.py)
        with timer.phase("forward"):
            with self.capture.recording(measure, keep_grads=keep):
                output = self.problem.forward(x)
            loss = self.problem.loss(output, y)
        with timer.phase("backward"):
            for p in self.params:
                p.grad = None
            loss.backward(retain_graph=measure and not keep)
        with fp32_matmuls():  # the curvature arithmetic in full float32 (TF32: forward/backward)
            if measure:
                with timer.phase("curvature"):
                    self._measure(output)
                if self.dist is not None:
                    with timer.phase("comm"):
                        self._gather_latest()
            self.capture.clear()
            if refresh:
                with timer.phase("inverse"):
                    self._refresh()
                if self.owners.shares_inverses:
                    with timer.phase("comm"):
                        self._share_inverses()
            with torch.no_grad():
                with timer.phase("precondition"):
                    grads, nat = self._compiled_direction()
                if self.owners.shares_directions:
                    with timer.phase("comm"):
                        nat = self.owners.share_directions(
                            nat, self.device, [c.layer for c in self.roots]
                        )
                direction = self._assemble(nat, grads)
                with timer.phase("update"):
                    self.sgd.lr = self.sgd.lr_at(k)
                    self.sgd.apply(direction, self.sgd.lr)
        self.steps += 1
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        """The learning rate and λ."""
        return {"lr": self.sgd.lr, "damping": float(self.lam)}

    def graph_key(self, step: int) -> Hashable | None:
        """The steps a CUDA graph may replay (:mod:`kfacbench.core.graphs`): those that neither
        refresh nor measure factor roots (the moving average keeps a window of them on the host),
        one graph per learning rate. Data-parallel and compiled steps are not graphed."""
        if self.dist is not None or self.compile != "off":
            return None
        if step % self.inv_interval == 0 or (-step) % self.inv_interval < self.window:
            return None
        return ("skfac", self.sgd.lr_at(step), self.graph_generation)

    def graph_replayed(self) -> None:
        """A replayed step's host state: the learning rate and the step count."""
        self.sgd.lr = self.sgd.lr_at(self.steps)
        self.steps += 1

    def graph_generators(self) -> list[torch.Generator]:
        """The sampled Fisher's target draws and the sampled positions of conv layers."""
        return [self.generator, self.position_generator]

    def info(self) -> dict[str, Any]:
        """Which layers are preconditioned, and per layer the rank of the last factors and the
        form each inverse took (``woodbury``, ``woodbury-dense``: formed by SMW and stored dense
        because the refresh interval pays for it, or ``dense``): where SMW applied."""
        forms = {}
        for c in self.roots:
            if c.a_inv is None or c.g_inv is None:
                continue  # not yet refreshed, or held by another rank (mem-opt)
            forms[c.layer.name] = {
                "rank": c.rank,
                "A": c.a_inv.form,
                "G": c.g_inv.form,
            }
        return {
            "preconditioned": [c.layer.name for c in self.roots],
            "identity_preconditioner": self.uncovered,
            "inverse_forms": forms,
            "float64_systems": self.float64_systems,
        }

    def state_bytes(self) -> dict[str, int]:
        """The factor roots R_A, R_G of the batches kept (the window of the moving average);
        the damped inverses: W = K⁻¹R of a Woodbury form (its R is the roots, counted as
        factors; with a window, their weighted stack) or the dense d×d matrix; SGD's momentum;
        λ and the dampings δ. :mod:`kfacbench.optim.memory` predicts the first three from the
        layer shapes and the batch."""
        inverses = [
            t
            for c in self.roots
            for inv in (c.a_inv, c.g_inv)
            if inv is not None
            for t in (inv.rows, inv.solved, inv.dense)
        ]
        dampings = [
            inv.damping for c in self.roots for inv in (c.a_inv, c.g_inv) if inv is not None
        ]
        return count_bytes(
            [
                *(("factors", t) for c in self.roots for pair in c.history for t in pair),
                *(("inverses", t) for t in inverses),
                *(("first_order", t) for t in self.sgd.velocity),
                *(("other", t) for t in [self.lam, *dampings]),
            ]
        )

    def _measure(self, output: Tensor) -> None:
        """Per-batch factor roots of every layer (the sampled Fisher: one extra backward pass
        w.r.t. the layer outputs; the empirical one: the loss gradient's output gradients)."""
        layers = [c.layer for c in self.roots]
        grads = fisher_output_grads(
            self.capture,
            layers,
            self.problem,
            output,
            self.fisher,  # type: ignore[arg-type]
            self.generator,
            as_rows=False,
        )
        for c, g in zip(self.roots, grads, strict=True):
            c.history.append(
                factor_rows(
                    c.layer,
                    self.capture.raw_input(c.layer),
                    g,
                    reduction=self.reduction,
                    weight_sharing=self.weight_sharing,
                    samples=self.samples,
                    generator=self.position_generator,
                )
            )

    def _averaged_rows(self, c: LayerRoots) -> tuple[Tensor, Tensor]:
        """The roots of the (weighted average) factors: √wⱼ-scaled rows stacked, newest first."""
        batches = list(reversed(c.history))
        if len(batches) == 1:
            return batches[0]
        weights = [self.decay**j for j in range(len(batches))]
        total = sum(weights)
        ra = torch.cat(
            [r * math.sqrt(w / total) for (r, _), w in zip(batches, weights, strict=True)]
        )
        rg = torch.cat(
            [r * math.sqrt(w / total) for (_, r), w in zip(batches, weights, strict=True)]
        )
        return ra, rg

    def _gather_latest(self) -> None:
        """Replace each layer's newest roots by the global batch's: every rank's rows stacked,
        scaled by 1/√world (a mean of equal shards' factors)."""
        assert self.dist is not None
        local = [t for c in self.roots for t in c.history[-1]]
        stacked = gather_rows(local, self.dist)
        scale = 1.0 / math.sqrt(self.dist.world)
        for i, c in enumerate(self.roots):
            c.history[-1] = (stacked[2 * i] * scale, stacked[2 * i + 1] * scale)

    def _share_inverses(self) -> None:
        """comm-opt: every owner broadcasts its layers' damped inverses to all ranks."""
        items = [
            _pack(c.a_inv) + _pack(c.g_inv) if self.owners.mine(i) else []
            for i, c in enumerate(self.roots)
        ]
        shared = self.owners.broadcast(items, self.device)
        # A's part is δ, tag, then R and W (Woodbury: two (r, d) matrices) or the dense inverse
        # followed by G's δ (0-dim): told apart by shape. The tags' values (float64, formed by
        # Woodbury) are read in one transfer for all layers: one sync per refresh.
        splits = [4 if tensors[3].dim() == 2 else 3 for tensors in shared]
        tags = torch.stack(
            [
                t
                for tensors, k in zip(shared, splits, strict=True)
                for t in (tensors[1], tensors[k + 1])
            ]
        ).tolist()
        for i, (c, tensors, k) in enumerate(zip(self.roots, shared, splits, strict=True)):
            c.a_inv = _unpack(tensors[:k], tags[2 * i])
            c.g_inv = _unpack(tensors[k:], tags[2 * i + 1])

    def _refresh(self) -> None:
        """Damped inverses of every factor (of this rank's layers, when distributed) from its
        roots (Woodbury or dense, batched)."""
        rows: list[Tensor] = []
        dampings: list[Tensor] = []
        store_dense: list[bool] = []
        root = torch.sqrt(self.lam)
        owned = [c for i, c in enumerate(self.roots) if self.owners.mine(i)]
        for c in self.roots:
            c.rank = sum(ra.shape[0] for ra, _ in c.history)
        for c in owned:
            ra, rg = self._averaged_rows(c)
            dampings += pi_split(ra, rg, root) if self.damping_split == "pi" else [root, root]
            rows += [ra, rg]
            # Each side is applied to the (out, in) gradient matrix, the other side's dimension.
            d_a, d_g = c.layer.in_dim, c.layer.out_dim
            store_dense += [
                dense_pays(d_a, ra.shape[0], d_g, self.inv_interval),
                dense_pays(d_g, rg.shape[0], d_a, self.inv_interval),
            ]
        inverses = damped_inverses(
            rows, dampings, float64=self.float64_systems, store_dense=store_dense
        )
        # Once float32 has failed, later refreshes go straight to float64 (no failing attempt).
        self.float64_systems = self.float64_systems or any(inv.float64 for inv in inverses)
        for i, c in enumerate(owned):
            for name, inverse in (("a_inv", inverses[2 * i]), ("g_inv", inverses[2 * i + 1])):
                if land(c, name, inverse, in_place=self.cuda_graph):
                    self.graph_generation += 1

    def compiled_phases(self) -> dict[str, PhaseCompiled]:
        """Preconditioning and the update are compiled regions. Forward and backward stay eager
        (the capture hooks), and so do the curvature rows (random positions, the sampled
        backward) and the refresh (Cholesky with its host check)."""
        if self.compile == "off":
            return {}
        return {"precondition": "all", "update": "all"}

    def _direction(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """∇h and G_δ⁻¹∇h Ā_δ⁻¹ per layer: the precondition phase (a compiled region when the cell
        compiles)."""
        grads = gradients(self.params, self.eta)
        return grads, self._natural(grads)

    def _natural(self, grads: list[Tensor]) -> list[Tensor | None]:
        """G_δ⁻¹ ∇h Ā_δ⁻¹ as a gradient matrix per layer (``None`` for a layer another rank
        preconditions under mem-opt)."""
        out: list[Tensor | None] = []
        i = 0
        for k, c in enumerate(self.roots):
            n = len(c.layer.params())
            if self.owners.preconditions(k):
                assert c.a_inv is not None and c.g_inv is not None
                v = grad_matrix(c.layer, grads[i : i + n])
                out.append(kronecker_apply(c.g_inv, c.a_inv, v))
            else:
                out.append(None)
            i += n
        return out

    def _assemble(self, nat: list[Tensor | None], grads: list[Tensor]) -> list[Tensor]:
        """The preconditioned gradient per parameter in ``self.params`` order (∇h for the
        parameters of uncovered modules)."""
        out: list[Tensor] = []
        for c, v in zip(self.roots, nat, strict=True):
            assert v is not None
            out += split_matrix(c.layer, v)
        covered = sum(len(c.layer.params()) for c in self.roots)
        return out + grads[covered:]


def _dense_cost(layer: Layer) -> int:
    """What a layer's two inverses cost at most (d³ each): the owners' balance. The Woodbury
    form is cheaper, by a factor that depends on the batch, not on the layer."""
    return layer.in_dim**3 + layer.out_dim**3


FORM_TAGS = {"dense": 1.0, "woodbury": 2.0, "woodbury-dense": 3.0}


def _pack(inv: DampedInverse | None) -> list[Tensor]:
    """A damped inverse as tensors for a broadcast: δ, a form tag (1 dense, 2 Woodbury,
    3 Woodbury stored dense; +0.5 when float64), then R and W, or the dense inverse."""
    assert inv is not None
    tag = FORM_TAGS[inv.form] + (0.5 if inv.float64 else 0.0)
    head = [inv.damping.reshape(()), torch.tensor(tag, device=inv.damping.device)]
    if inv.low_rank:
        assert inv.rows is not None and inv.solved is not None
        return [*head, inv.rows, inv.solved]
    assert inv.dense is not None
    return [*head, inv.dense]


def _unpack(tensors: list[Tensor], tag: float) -> DampedInverse:
    """The inverse :func:`_pack` sent, with its form tag already read (``tensors[1]``)."""
    damping = tensors[0]
    wide = tag % 1 != 0
    if math.floor(tag) == FORM_TAGS["woodbury"]:
        return DampedInverse(damping, rows=tensors[2], solved=tensors[3], float64=wide)
    formed = math.floor(tag) == FORM_TAGS["woodbury-dense"]
    return DampedInverse(damping, dense=tensors[2], float64=wide, woodbury_formed=formed)


_PARAMS: dict[str, Param] = {
    "lr": Param("learning rate of the momentum update", bounds="[0, inf)"),
    "momentum": Param("momentum μ", bounds="[0, 1)"),
    "schedule": Param("learning-rate schedule", choices=SCHEDULES),
    "warmup_steps": Param("linear learning-rate warm-up steps", bounds="[0, inf)"),
    "lr_decay": Param("factor of the step schedule (at 50% and 75% of the steps)", bounds="(0, 1]"),
    "damping": Param("λ, split over the two factors", bounds="(0, inf)"),
    "damping_split": Param("√λ per factor, or the π split", choices=DAMPING_SPLITS),
    "weight_decay": Param("η, added to the gradient before preconditioning", bounds="[0, inf)"),
    "fisher": Param("Fisher estimate", choices=FISHERS),
    "reduction": Param("conv dimension reduction", choices=REDUCTIONS),
    "weight_sharing": Param("Linear layers shared over positions", choices=WEIGHT_SHARING),
    "samples": Param("positions per example kept by subsample", bounds="[1, inf)"),
    "factor_decay": Param("moving-average ε of the factors (0: per batch)", bounds="[0, 1)"),
    "factor_window": Param("batches in the moving average", bounds="[1, inf)"),
    "dist_strategy": Param("data-parallel runs: who preconditions (KAISA)", choices=STRATEGIES),
}
"""SKFAC's hyperparameters: keyword arguments of :class:`SKFAC`, whose signature holds the
defaults (those of the ``skfac`` preset)."""

PRESETS: dict[str, dict[str, HParamValue]] = {
    "skfac": {},
    "skfac-subsample": {"reduction": "subsample"},
}
"""Each registry entry's defaults that differ from :class:`SKFAC`'s signature."""

DEFAULTS_FROM: dict[str, Callable[..., Any]] = dict.fromkeys(PRESETS, SKFAC)
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


def _build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> SKFAC:
    return SKFAC(
        problem,
        **hp,
        total_steps=ctx.total_steps,
        seed=ctx.seed,
        dist=ctx.dist,
        compile=ctx.compile,
        cuda_graph=ctx.cuda_graph,
    )


SPECS = (
    MethodSpec(
        "skfac",
        "SKFAC (Tang et al. 2021): per-batch factors, Woodbury inverses, conv reduce-sum",
        hparams_from(SKFAC, _PARAMS, PRESETS["skfac"]),
        uses_inv_interval=True,
        build=_build,
    ),
    MethodSpec(
        "skfac-subsample",
        "SKFAC with spatial subsampling of conv positions (s per example)",
        hparams_from(SKFAC, _PARAMS, PRESETS["skfac-subsample"]),
        uses_inv_interval=True,
        build=_build,
    ),
)
