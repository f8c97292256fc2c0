"""KAISA (Pauloski et al., SC '21; gpauloski/kfac-pytorch), the most used PyTorch K-FAC, as a
peer on the same training core.

KAISA is not on PyPI: users install it from its repository (:data:`INSTALL`, the commit of
version 0.4.2). A missing package is a one-line error saying so, and ``method_info`` records the
version.

The adapter runs KAISA as its README does: forward, backward, ``KFACPreconditioner.step()``
(which rewrites ``.grad`` of the layers it registered), then ``torch.optim.SGD`` with momentum on
all parameters. KAISA computes its statistics in module hooks: each layer's A (with its moving
average) in a forward pre-hook and its G in a backward hook. It has no curvature phase, and its
curvature time lands in ``forward`` and ``backward``. ``step()`` is timed as ``inverse`` on the
steps where KAISA refreshes its decompositions (that phase then also holds the step's
preconditioning, which ``precondition`` times alone on the other steps), and as
``precondition`` otherwise. The SGD step is ``update``.

KAISA reads ``torch.distributed``'s default group. In a one-process cell there is none: its
``get_rank`` and ``get_world_size`` fall back to 0 and 1, its group factory to a stub, and every
allreduce and broadcast to a no-op. Data-parallel cells (``--nproc``) are refused, as for the
other peers.
"""

from __future__ import annotations

import importlib
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfacbench.core.memory import count_bytes, optimizer_state, walk_tensors
from kfacbench.core.method import Method, MethodContext, MethodSpec, Param, hparams_from
from kfacbench.core.problem import Problem
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import shared_modules
from kfacbench.optim.peers import package_version

INSTALL = "pip install 'git+https://github.com/gpauloski/kfac-pytorch@869cf11'"
"""How to install KAISA 0.4.2 (the commit the tests' copy of its source was taken from)."""

COMPUTE_METHODS = {"eigh": "eigen", "inv": "inverse"}
"""kfacbench's ``inverse_method`` values and KAISA's ``compute_method`` for them."""

EMA_STARTS = ("identity", "one-over-k")
"""How the factors' moving average starts (see :class:`KaisaKfac`)."""


def _kaisa() -> Any:
    """KAISA's ``kfac.preconditioner`` module, or a one-line error naming how to install it."""
    try:
        with warnings.catch_warnings():
            # Its bucketed allreduce falls back to torch's flatten (it runs on one process here).
            warnings.filterwarnings("ignore", message="NVIDIA Apex is not installed")
            module = importlib.import_module("kfac.preconditioner")
    except ImportError:
        raise KfacbenchError(
            f"the kaisa-kfac peer needs KAISA (kfac-pytorch, not on PyPI): {INSTALL}"
        ) from None
    # KAISA's full backward hook on a first layer, whose input needs no gradient, makes torch
    # warn that it fires for the outputs only: all KAISA reads there (not actionable).
    warnings.filterwarnings(
        "ignore", message="Full backward hook is firing when gradients", category=UserWarning
    )
    return module


@dataclass(frozen=True)
class _FactorDecay:
    """KAISA's ``factor_decay`` as a schedule of its step: ε, the weight of the old factors.

    With ``one_over_k``, the k-th factor update weighs the old factors ε_k = min(1 − 1/k,
    ``ema_max``), kfacbench's K-FAC average (Martens & Grosse §5). The first update (ε = 0) then
    replaces KAISA's identity start by the first batch's factors.
    """

    ema_max: float
    cov_interval: int
    one_over_k: bool

    def __call__(self, step: int) -> float:
        if not self.one_over_k:
            return self.ema_max
        k = step // self.cov_interval + 1  # KAISA updates the factors when step % interval == 0
        return min(1 - 1 / k, self.ema_max)


@dataclass(frozen=True)
class _InvSteps:
    """KAISA's ``inv_update_steps`` as a schedule: 1 at steps 0–2 (a refresh at each, as
    kfacbench's K-FAC does), ``interval`` after."""

    interval: int

    def __call__(self, step: int) -> int:
        return 1 if step < 3 else self.interval


def _no_kl_clip(step: int) -> None:
    """KAISA's ``kl_clip`` schedule for "no clipping".

    KAISA documents ``kl_clip=None`` as no clipping, but its constructor compares the value with
    0 and raises ``TypeError`` on ``None`` (0.4.2). As a schedule, ``None`` reaches ``step()``,
    which then skips the clip as documented.
    """
    return None


def _unsupported_convs(model: nn.Module) -> list[str]:
    """Conv2d layers whose patches KAISA would get wrong: its im2col ignores dilation, groups and
    non-zero padding modes (silently wrong factors, or a shape error), and it cannot read a
    string padding. They are kept from KAISA and get SGD."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and (
            module.groups != 1
            or any(d != 1 for d in module.dilation)
            or module.padding_mode != "zeros"
            or isinstance(module.padding, str)
        )
    ]


class KaisaKfac(Method):
    """KAISA's ``KFACPreconditioner`` with ``torch.optim.SGD`` momentum.

    What maps to what (kfacbench's ``kfac-fast``):

    - ``lr``, ``momentum``: the SGD update, v ← μv + g, θ ← θ − ηv, as kfac-fast's. KAISA also
      reads ``lr`` in its KL clip.
    - ``weight_decay``: SGD's, added *after* preconditioning. kfac-fast's η is part of the
      objective and is preconditioned with the gradient. The same only at 0 (both defaults).
    - ``cov_interval`` → ``factor_update_steps``; ``inv_interval`` → ``inv_update_steps``.
      KAISA refreshes at steps 0, T, 2T, ...; kfacbench's K-FAC also at steps 1 and 2.
      ``early_refreshes`` hands KAISA that schedule (off: KAISA as shipped).
    - ``inverse_method``: ``eigh`` → ``eigen`` (KAISA's default), ``inv`` → ``inverse``.
    - ``ema_max`` → ``factor_decay``, the weight of the old factors. KAISA's average starts from
      the identity: its first factors are εI + (1 − ε)·(first batch), and the identity's weight
      decays as εᵏ (0.36 after 20 updates at ε = 0.95), against a G that is small on KAISA's
      scale (below). ``ema_start = "one-over-k"`` hands KAISA kfacbench's weights, ε_k =
      min(1 − 1/k, ``ema_max``), and the averages are then the same. ``"identity"`` (default)
      is KAISA as shipped.
    - ``kl_clip``: KAISA's clip of the step, scale = min(1, √(c / |lr² Σ ĝ·g|)), with one host
      read per layer and step. 0 (default) turns it off, like kfac-fast, which has none.
    - ``fisher``: KAISA's G comes from the backward pass of the loss itself: the empirical
      Fisher, the only choice. kfac-fast's default is ``sampled``.
    - ``weight_sharing``: a Linear layer applied at several positions treats them as extra
      examples, Eschenhagen et al.'s expand, the only choice.

    ``fisher`` and ``weight_sharing`` have one value each: they state what KAISA computes, so
    that the report pairs the peer only with kfac-fast cells computing the same.

    What cannot be matched:

    - Damping. KAISA adds λ to the eigenvalue products of the Kronecker product,
      (A ⊗ G + λI)⁻¹ (``eigh``), or λ to each factor, (A + λI)⁻¹ ⊗ (G + λI)⁻¹ (``inv``).
      kfac-fast damps each factor with the π split of γ = √λ, (A + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹.
      The default λ is KAISA's, 0.001 (kfac-fast's is 1).
    - The factors' scale. KAISA's rows are the mean loss's output gradients, not the
      per-example ones, so for a Linear layer (one position per example) its A is kfacbench's
      and its G is kfacbench's G/m² (batch size m). A conv layer's patches and output gradients
      are also divided by the number of positions T: A/T² and G/(m²T³). A given λ weighs m²
      (conv: m²T⁵) times more against the curvature than kfacbench's, and in directions the
      curvature dominates KAISA's step is m² (m²T⁵) times the natural gradient.
      tests/optim/peers/test_kaisa.py checks these scales.
    - Biases: KAISA folds them into A as the homogeneous coordinate, as kfacbench does.
    - Layers: Linear and Conv2d modules with all parameters trainable, except the convs of
      :func:`_unsupported_convs` and the modules with a shared parameter (a tied output layer:
      kfacbench's K-FAC leaves it out too, :func:`~kfacbench.optim.capture.find_layers`; KAISA
      would give GPT-2's a 50,257² factor). The rest (BatchNorm, embeddings, ...) keep their
      gradient and get plain SGD, the identity preconditioner of kfac-fast. ``method_info``
      names them.
    - KAISA's ``accumulation_steps`` stays 1: the core runs one forward and backward pass per
      step, and with more KAISA would never update its factors. Its distribution settings
      (``grad_worker_fraction``, assignment, bucketing) do nothing on one process.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        inv_interval: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 0.001,
        cov_interval: int = 1,
        inverse_method: str = "eigh",
        ema_max: float = 0.95,
        ema_start: str = "identity",
        early_refreshes: bool = False,
        kl_clip: float = 0.0,
        fisher: str = "empirical",
        weight_sharing: str = "expand",
    ) -> None:
        for key, value, only in (
            ("fisher", fisher, "empirical"),
            ("weight_sharing", weight_sharing, "expand"),
        ):
            if value != only:
                raise KfacbenchError(f"KAISA computes {key} = {only!r} only, got {value!r}")
        preconditioner = _kaisa()
        self.problem = problem
        self.lr = lr
        self.damping = damping
        self.compute_method = COMPUTE_METHODS[inverse_method]
        model = problem.model
        skipped = _unsupported_convs(model) + shared_modules(model)
        self.preconditioner = preconditioner.KFACPreconditioner(
            model,
            factor_update_steps=cov_interval,
            inv_update_steps=_InvSteps(inv_interval) if early_refreshes else inv_interval,
            damping=damping,
            # Always a schedule: a constant ε = 0 (per-batch factors) fails KAISA's (0, 1] check.
            factor_decay=_FactorDecay(ema_max, cov_interval, ema_start == "one-over-k"),
            kl_clip=kl_clip if kl_clip > 0 else _no_kl_clip,
            lr=lr,
            compute_method=self.compute_method,
            skip_layers=[f"^{re.escape(name)}$" for name in skipped],
        )
        # The layer names KAISA registered, through its public state (no factors yet: cheap).
        self.preconditioned = list(self.preconditioner.state_dict()["layers"])
        covered = set(self.preconditioned)
        self.uncovered = [
            name
            for name, module in model.named_modules()
            if name not in covered and any(p.requires_grad for p in module.parameters(False))
        ]
        self.opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """Forward and backward (KAISA's hooks take the statistics), KAISA's ``step()``, SGD."""
        pre = self.preconditioner
        with timer.phase("forward"):
            loss = self.problem.loss(self.problem.forward(x), y)
        with timer.phase("backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        refresh = pre.steps % pre.inv_update_steps == 0  # KAISA's own test in step()
        with timer.phase("inverse" if refresh else "precondition"):
            pre.step()
        with timer.phase("update"):
            self.opt.step()
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        """The learning rate and λ."""
        return {"lr": self.lr, "damping": self.damping}

    def state_bytes(self) -> dict[str, int]:
        """KAISA's per-layer state (its private ``_layers``, the one place it keeps it): the
        factors and their running batch sums as factors; the eigendecompositions (``_qa``,
        ``_da``, ``_qg``, ``_dg``, ``_dgda``) or the inverses (``_a_inv``, ``_g_inv``) as
        inverses; its preconditioned-gradient buffer as other. SGD's momentum is first-order."""
        kinds = {"_qa", "_da", "_qg", "_dg", "_dgda", "_a_inv", "_g_inv"}
        kept = list(walk_tensors(self.preconditioner._layers))

        def kind(name: str) -> str:
            if "factor" in name or name.endswith("_batch"):
                return "factors"
            return "inverses" if name in kinds else "other"

        return count_bytes([*((kind(path[-1]), t) for path, t in kept), *optimizer_state(self.opt)])

    def info(self) -> dict[str, Any]:
        """The peer, its version, its Fisher and which modules it preconditions."""
        return {
            "peer": "kfac.preconditioner.KFACPreconditioner",
            "version": package_version("kfac-pytorch"),
            "fisher": "empirical (KAISA's G: the loss's own output gradients)",
            "compute_method": self.compute_method,
            "preconditioned": self.preconditioned,
            "identity_preconditioner": self.uncovered,
        }


def _build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> KaisaKfac:
    if ctx.dist is not None:
        raise KfacbenchError("the kaisa-kfac peer runs on one process (no --nproc)")
    return KaisaKfac(problem, **hp)


DEFAULTS_FROM: dict[str, Callable[..., Any]] = {"kaisa-kfac": KaisaKfac}
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


SPECS = (
    MethodSpec(
        "kaisa-kfac",
        "KAISA's K-FAC (kfac-pytorch KFACPreconditioner) with SGD momentum [from GitHub]",
        hparams_from(
            KaisaKfac,
            {
                "lr": Param("learning rate of the SGD-momentum update", bounds="[0, inf)"),
                "momentum": Param("momentum of that update", bounds="[0, 1)"),
                "weight_decay": Param("SGD's ℓ2, added after preconditioning", bounds="[0, inf)"),
                "damping": Param(
                    "λ on the eigenvalue products (eigh) or each factor (inv)", bounds="(0, inf)"
                ),
                "cov_interval": Param("steps between factor updates", bounds="[1, inf)"),
                "inverse_method": Param(
                    "eigh (KAISA's eigen) or inv (its inverse)", choices=tuple(COMPUTE_METHODS)
                ),
                "ema_max": Param("factor_decay: weight of the old factors", bounds="[0, 1)"),
                "ema_start": Param(
                    "identity (KAISA) or one-over-k (kfacbench's K-FAC)", choices=EMA_STARTS
                ),
                "early_refreshes": Param("also refresh at steps 1 and 2 (kfacbench's K-FAC)"),
                "kl_clip": Param("KAISA's KL clip of the step (0: off)", bounds="[0, inf)"),
                "fisher": Param("KAISA's only: the loss's own gradients", choices=("empirical",)),
                "weight_sharing": Param(
                    "KAISA's only: positions as extra examples", choices=("expand",)
                ),
            },
        ),
        uses_inv_interval=True,
        build=_build,
    ),
)
