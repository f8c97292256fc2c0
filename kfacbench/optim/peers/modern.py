"""Today's second-order peers on the same training core: SINGD, Shampoo and SOAP.

Each is the maintained package's optimizer, driven through the core's step. Their
preconditioner statistics, refreshes and preconditioning all happen inside the package's
``step()``, so the adapter times forward, backward and ``update``, where ``update`` holds all of
that. They ship as the ``peers`` extra (``pip install 'kfacbench[peers]'``). A missing package is
a one-line error naming the extra, and ``method_info`` records the package version.

- **SINGD** (Lin et al., ICML 2024; PyPI ``singd``): structured inverse-free natural gradient,
  the inverse-free member of the K-FAC family. It updates Kronecker factors of the *inverse*
  preconditioner with Riemannian momentum and inverts nothing.
- **Shampoo** (Gupta, Koren & Singer 2018) and **SOAP** (Vyas et al. 2024: Adam in Shampoo's
  eigenbasis) come from ``pytorch-optimizer``. ``heavyball``, the other maintained package, has
  no plain Shampoo. Its SOAP changes the paper's defaults and numerics (a shifted power
  iteration, bias-corrected statistics) and compiles about 90 helpers with torch.compile on the
  first step, on CPU as well. ``pytorch-optimizer``'s SOAP is a line-by-line port of the
  authors' reference with the same defaults, and it runs eagerly. Its ``ScalableShampoo`` is
  Google's distributed Shampoo (Anil et al. 2020): blocked statistics, inverse p-th roots by
  coupled Newton iterations, and the step size grafted from a first-order method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from kfacbench.core.memory import count_bytes, optimizer_state, walk_tensors
from kfacbench.core.method import Method, MethodContext, MethodSpec, Param, hparams_from
from kfacbench.core.problem import Problem, loss_terms
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import shared_modules
from kfacbench.optim.peers import package_version

EXTRA = "pip install 'kfacbench[peers]'"
SINGD_STRUCTURES = (
    "dense",
    "diagonal",
    "block30diagonal",
    "hierarchical15_15",
    "triltoeplitz",
    "triutoeplitz",
)
"""SINGD's structures of the factors (one choice here for both sides)."""
GRAFTS = ("adagrad", "sgd", "sqrtn")
"""Shampoo's grafting (the step size per layer from a first-order method). The package's
RMSProp graft lacks Adam's bias correction and blew up a small MLP at lr 0.05 (loss 1.7 → 316
in 12 steps), so it is not offered."""


def _import(module: str, dist: str, who: str) -> Any:
    """``module`` imported, or a one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KfacbenchError(f"{who} needs the {dist} package: {EXTRA}") from None


def _one_process(ctx: MethodContext, who: str) -> None:
    if ctx.dist is not None:
        raise KfacbenchError(f"the {who} peer runs on one process (no --nproc)")


class _Peer(Method):
    """Forward, backward and the package's ``step()`` (timed as ``update``)."""

    problem: Problem
    optimizers: list[torch.optim.Optimizer]
    lr: float
    state_names: ClassVar[Mapping[tuple[str, ...], str]] = {}
    """The kinds of the package's per-parameter state entries that are not first-order state,
    by their path in it (:func:`~kfacbench.core.memory.optimizer_state`)."""

    def _before_backward(self, output: torch.Tensor) -> None:
        """Called once per step between the forward pass and the backward pass."""

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """One step: forward, backward, the package's update (statistics, refreshes and
        preconditioning included)."""
        with timer.phase("forward"):
            output = self.problem.forward(x)
            loss = self.problem.loss(output, y)
        self._before_backward(output)
        with timer.phase("backward"):
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("update"):
            for opt in self.optimizers:
                opt.step()
        return loss.detach()

    def log_values(self) -> dict[str, float]:
        """The learning rate."""
        return {"lr": self.lr}

    def state_bytes(self) -> dict[str, int]:
        """The optimizers' per-parameter state, by :attr:`state_names` (else first-order when
        shaped like the parameter: momentum, the graft's and Adam's moments)."""
        return count_bytes(self._state())

    def _state(self) -> list[tuple[str, torch.Tensor]]:
        return [pair for opt in self.optimizers for pair in optimizer_state(opt, self.state_names)]


class Singd(_Peer):
    """SINGD (``singd.optim.optimizer.SINGD``) on every Linear and Conv2d layer.

    What maps to what:

    - ``inv_interval`` → SINGD's T, the steps between preconditioner updates.
    - ``weight_sharing`` → ``kfac_approx``: expand or reduce for layers applied at several
      positions, Eschenhagen et al. 2023, as in kfacbench's K-FAC.
    - ``loss_average`` is set from the first output. It is ``batch+sequence`` for a per-token
      loss, which is the mean over examples × positions, and ``batch`` otherwise. SINGD scales
      its output gradients by the square root of that count, as kfacbench does with P.
    - The Fisher: SINGD uses the empirical one (the loss gradient's own statistics). kfacbench's
      ``fisher`` does not map.
    - Biases are folded into the input-side factor as the homogeneous coordinate, as in
      kfacbench's K-FAC.
    - Other parameters (embeddings, layer norms, BatchNorm) are not SINGD's. Passed to SINGD
      they would silently never move, so they get SGD with the same learning rate, momentum and
      weight decay, the identity preconditioner that kfacbench's ``kfac-fast`` gives them.
      So does a module with a shared parameter (GPT-2's tied output layer, whose output-side
      factor SINGD would make vocab × vocab; :func:`~kfacbench.optim.capture.find_layers`).
      ``method_info`` names them.
    - Hyperparameters keep SINGD's names and defaults: ``lr`` β₂, ``momentum`` α₂, ``damping``
      λ, ``alpha1`` α₁ (Riemannian momentum), ``lr_cov`` β₁. SINGD starts its factors at the
      identity with no warm start, so its first steps are close to SGD with momentum.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        inv_interval: int,
        lr: float = 1e-3,
        momentum: float = 0.9,
        damping: float = 1e-3,
        alpha1: float = 0.5,
        lr_cov: float = 1e-2,
        weight_decay: float = 0.0,
        structure: str = "dense",
        weight_sharing: str = "expand",
        kfac_like: bool = False,
    ) -> None:
        optimizer = _import("singd.optim.optimizer", "singd", "the singd peer")
        self.problem = problem
        self.lr = lr
        shared = set(shared_modules(problem.model))
        layers = [
            p
            for name, module in problem.model.named_modules()
            if isinstance(module, optimizer.SINGD.SUPPORTED_MODULES) and name not in shared
            for p in module.parameters(recurse=False)
            if p.requires_grad
        ]
        self.opt = optimizer.SINGD(
            problem.model,
            layers,
            lr=lr,
            momentum=momentum,
            damping=damping,
            alpha1=0.0 if kfac_like else alpha1,
            weight_decay=weight_decay,
            T=inv_interval,
            lr_cov=lr_cov,
            structures=(structure, structure),
            kfac_approx=weight_sharing,
            kfac_like=kfac_like,
            warn_unsupported=False,
        )
        covered = {id(p) for group in self.opt.param_groups for p in group["params"]}
        names = dict(problem.model.named_modules())
        self.uncovered = [
            name
            for name, module in names.items()
            if any(id(p) not in covered for p in module.parameters(recurse=False))
        ]
        others = [p for p in problem.model.parameters() if id(p) not in covered]
        self.optimizers: list[torch.optim.Optimizer] = [self.opt]
        if others:
            self.optimizers.append(
                torch.optim.SGD(others, lr=lr, momentum=momentum, weight_decay=weight_decay)
            )
        self.averaging_set = False

    def _before_backward(self, output: torch.Tensor) -> None:
        """SINGD reads ``loss_average`` in its backward hooks: set it from the first output."""
        if self.averaging_set:
            return
        average = "batch+sequence" if loss_terms(self.problem.distribution, output) > 1 else "batch"
        for group in self.opt.param_groups:
            group["loss_average"] = average
        self.averaging_set = True

    def state_bytes(self) -> dict[str, int]:
        """SINGD keeps its structured matrices per layer on the optimizer (not in ``state``):
        K and C, whose products are the preconditioner (inverses), and their Riemannian
        momenta m_K and m_C, the statistics it accumulates (factors); the momentum of the
        update is first-order."""
        opt = self.opt
        return count_bytes(
            [
                *(("factors", t) for _, t in walk_tensors([opt.m_Ks, opt.m_Cs])),
                *(("inverses", t) for _, t in walk_tensors([opt.Ks, opt.Cs])),
                *self._state(),
            ]
        )

    def info(self) -> dict[str, Any]:
        """The peer, its version, and the modules left to SGD."""
        return {
            "peer": "singd.optim.optimizer.SINGD",
            "version": package_version("singd"),
            "loss_average": self.opt.param_groups[0]["loss_average"],
            "identity_preconditioner": self.uncovered,
        }


class Shampoo(_Peer):
    """``pytorch_optimizer.ScalableShampoo``: Shampoo with blocking and grafting.

    What maps to what:

    - ``inv_interval`` → ``preconditioning_compute_steps``, the steps between inverse-root
      refreshes. Preconditioning starts at the first refresh (``start_preconditioning_step``),
      which is Shi et al.'s default, and it is the graft's update before that.
    - The graft is chosen with ``graft``. AdaGrad (the default here) is what Shi et al.'s
      AlgoPerf Shampoo grafts besides Adam; this package has no Adam graft.
    - ``shape_interpretation`` is off. With it on (the package's default), matrices of up to 512
      entries were not preconditioned at all, and a matrix whose first dimension is over 512
      (e.g. 1024 × 768) was given a third dimension of size 1 and the exponent −1/6 instead of
      Shampoo's −1/4. Off, every matrix gets one factor per side at −1/4, and a conv weight gets
      one per dimension (Gupta et al.'s tensor rule, −1/8 for 4-D).
    - Statistics are moving averages with β₂. The roots come from coupled Newton iterations,
      which read a convergence check on the host each iteration (a sync on GPUs) at every
      refresh.
    - 1-D parameters (biases, norms) get the graft's update alone.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        inv_interval: int,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        weight_decay: float = 0.0,
        graft: str = "adagrad",
        block_size: int = 512,
        matrix_eps: float = 1e-6,
        nesterov: bool = True,
    ) -> None:
        package = _import("pytorch_optimizer", "pytorch-optimizer", "the shampoo peer")
        grafting = importlib.import_module("pytorch_optimizer.optimizer.utils.graft")
        self.problem = problem
        self.lr = lr
        self.opt = package.ScalableShampoo(
            problem.model.parameters(),
            lr=lr,
            betas=(beta1, beta2),
            weight_decay=weight_decay,
            start_preconditioning_step=inv_interval,
            preconditioning_compute_steps=inv_interval,
            block_size=block_size,
            shape_interpretation=False,
            graft_type=getattr(grafting.LayerWiseGrafting, graft.upper()),
            nesterov=nesterov,
            matrix_eps=matrix_eps,
        )
        self.optimizers = [self.opt]

    state_names: ClassVar[Mapping[tuple[str, ...], str]] = {
        ("pre_conditioner", "statistics"): "factors",
        ("pre_conditioner", "pre_conditioners"): "inverses",
    }
    """The statistics L, R and their inverse p-th roots; the graft's statistics and momentum
    are first-order state."""

    def info(self) -> dict[str, Any]:
        """The peer and its version."""
        return {
            "peer": "pytorch_optimizer.ScalableShampoo",
            "version": package_version("pytorch-optimizer"),
        }


class Soap(_Peer):
    """``pytorch_optimizer.SOAP``, the authors' reference algorithm with its defaults.

    What maps to what:

    - ``inv_interval`` → ``precondition_frequency``, the steps between eigenbasis refreshes.
      Each refresh is one power iteration and a QR, from an ``eigh`` at the first step. That
      first step only initialises, and the parameters do not move, as in the reference.
    - ``merge_dims`` stays off: this version fails on tensors that fit in one preconditioner
      when it is on.
    - 1-D parameters get AdamW unless ``precondition_1d``. Weight decay is decoupled.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        inv_interval: int,
        lr: float = 3e-3,
        beta1: float = 0.95,
        beta2: float = 0.95,
        shampoo_beta: float = 0.95,
        weight_decay: float = 0.01,
        eps: float = 1e-8,
        max_precondition_dim: int = 10000,
        precondition_1d: bool = False,
        normalize_gradient: bool = False,
    ) -> None:
        package = _import("pytorch_optimizer", "pytorch-optimizer", "the soap peer")
        self.problem = problem
        self.lr = lr
        self.opt = package.SOAP(
            problem.model.parameters(),
            lr=lr,
            betas=(beta1, beta2),
            shampoo_beta=shampoo_beta,
            weight_decay=weight_decay,
            precondition_frequency=inv_interval,
            max_precondition_dim=max_precondition_dim,
            merge_dims=False,
            precondition_1d=precondition_1d,
            normalize_gradient=normalize_gradient,
            eps=eps,
        )
        self.optimizers = [self.opt]

    state_names: ClassVar[Mapping[tuple[str, ...], str]] = {("GG",): "factors", ("Q",): "inverses"}
    """Shampoo's factors GG and their eigenbases Q; Adam's moments are first-order state."""

    def info(self) -> dict[str, Any]:
        """The peer and its version."""
        return {"peer": "pytorch_optimizer.SOAP", "version": package_version("pytorch-optimizer")}


def _build(
    cls: Callable[..., _Peer], who: str
) -> Callable[[Problem, Mapping[str, Any], MethodContext], Any]:
    def build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> Any:
        _one_process(ctx, who)
        return cls(problem, **hp)

    return build


DEFAULTS_FROM: dict[str, Callable[..., Any]] = {"singd": Singd, "shampoo": Shampoo, "soap": Soap}
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


SPECS = (
    MethodSpec(
        "singd",
        "SINGD, inverse-free structured natural gradient (Lin et al. 2024) [peers extra]",
        hparams_from(
            Singd,
            {
                "lr": Param("β₂, the step size", bounds="[0, inf)"),
                "momentum": Param("α₂, momentum of the update", bounds="[0, 1)"),
                "damping": Param("λ", bounds="(0, inf)"),
                "alpha1": Param("α₁, Riemannian momentum of the factors", bounds="[0, 1)"),
                "lr_cov": Param("β₁, the factors' step size", bounds="(0, inf)"),
                "weight_decay": Param("γ, ℓ2 added to the update", bounds="[0, inf)"),
                "structure": Param("structure of both factors", choices=SINGD_STRUCTURES),
                "weight_sharing": Param(
                    "layers shared over positions (kfac_approx)", choices=("expand", "reduce")
                ),
                "kfac_like": Param("the K-FAC-like variant (α₁ = 0)"),
            },
        ),
        uses_inv_interval=True,
        build=_build(Singd, "singd"),
    ),
    MethodSpec(
        "shampoo",
        "Shampoo with blocking and grafting (pytorch-optimizer ScalableShampoo) [peers extra]",
        hparams_from(
            Shampoo,
            {
                "lr": Param("learning rate", bounds="[0, inf)"),
                "beta1": Param("momentum", bounds="[0, 1)"),
                "beta2": Param("moving average of the statistics", bounds="[0, 1]"),
                "weight_decay": Param("weight decay (coupled)", bounds="[0, inf)"),
                "graft": Param("the graft's first-order method", choices=GRAFTS),
                "block_size": Param("largest preconditioner block", bounds="[1, inf)"),
                "matrix_eps": Param("ridge of the inverse roots", bounds="(0, inf)"),
                "nesterov": Param("Nesterov momentum"),
            },
        ),
        uses_inv_interval=True,
        build=_build(Shampoo, "shampoo"),
    ),
    MethodSpec(
        "soap",
        "SOAP, Adam in Shampoo's eigenbasis (pytorch-optimizer, Vyas et al. 2024) [peers extra]",
        hparams_from(
            Soap,
            {
                "lr": Param("learning rate", bounds="[0, inf)"),
                "beta1": Param("Adam's β₁", bounds="[0, 1)"),
                "beta2": Param("Adam's β₂", bounds="[0, 1)"),
                "shampoo_beta": Param("moving average of the Shampoo factors", bounds="[0, 1)"),
                "weight_decay": Param("decoupled weight decay", bounds="[0, inf)"),
                "eps": Param("Adam's ε", bounds="(0, inf)"),
                "max_precondition_dim": Param(
                    "larger dimensions are not rotated", bounds="[1, inf)"
                ),
                "precondition_1d": Param("rotate 1-D parameters too"),
                "normalize_gradient": Param("normalise the gradient"),
            },
        ),
        uses_inv_interval=True,
        build=_build(Soap, "soap"),
    ),
)
