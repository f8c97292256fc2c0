"""ASDL's K-FAC and "swift" K-FAC (SKFAC) measured on the same training core.

A peer runs its own code; the adapter only drives it through the core's step and names its
phases where the peer's structure allows. Settings are matched to kfacbench's presets where the
peer has the same knob; what cannot be matched is said in each class's docstring.

ASDL (Osawa et al., PyPI ``asdfghjkl``, imported as ``asdl``) ships as the ``peers`` extra. Its
``PreconditionedGradientMaker.forward_and_backward`` is, in order: forward and backward (skipped
on a curvature step, whose pass computes the loss gradient too), the curvature update, the
preconditioner (inverse) update, preconditioning of ``.grad``. The adapter calls those stages
itself so that each is timed as the phase of the same name (``curvature`` then covers ASDL's
fused forward + backward + statistics pass).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

import torch

from kfacbench.core.memory import count_bytes, optimizer_state, walk_tensors
from kfacbench.core.method import (
    HParamValue,
    Method,
    MethodContext,
    MethodSpec,
    Param,
    hparams_from,
)
from kfacbench.core.problem import Problem, per_example_loss
from kfacbench.core.timing import PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim.capture import shared_modules
from kfacbench.optim.peers import package_version

FISHERS = {"sampled": "fisher_mc", "empirical": "fisher_emp"}
"""kfacbench's Fisher estimates and ASDL's names for them."""

EMA_STARTS = ("zero", "one-over-k")
"""How the factors' moving average starts (see :class:`AsdlKfac`)."""


class _NoNvtx:
    """ASDL's accumulate path opens ``torch.cuda.nvtx.range`` unconditionally, which raises on a
    CPU-only torch build; on such builds the adapter gives ASDL this no-op instead."""

    @staticmethod
    @contextlib.contextmanager
    def range(*args: Any, **kwargs: Any) -> Iterator[None]:
        yield


def _asdl() -> ModuleType:
    """The ``asdl`` package, or a one-line error naming the extra."""
    try:
        import asdl
        import asdl.precondition.natural_gradient as natural_gradient
    except ImportError:
        raise KfacbenchError(
            "the ASDL peers need the asdfghjkl package: pip install 'kfacbench[peers]'"
        ) from None
    if not torch.cuda.is_available():
        natural_gradient.nvtx = _NoNvtx
    # ASDL's module backward hooks make torch warn on every backward pass (not actionable here).
    warnings.filterwarnings(
        "ignore", message="Using a non-full backward hook", category=FutureWarning
    )
    return asdl


class AsdlKfac(Method):
    """ASDL's ``KfacGradientMaker`` (``swift=False``: K-FAC; ``True``: SKFAC) with SGD momentum.

    What maps to what (kfacbench's ``kfac-fast`` / ``skfac`` presets):

    - ``damping`` λ: ASDL damps both factors with the π split of √λ, (A + π√λ I) and
      (B + √λ/π I), as ``kfac-fast`` does with γ = √λ (η = 0), and as SKFAC with
      ``damping_split = "pi"`` (SKFAC's official √λ split has no ASDL equivalent).
    - ``inv_interval`` → ``preconditioner_upd_interval``; ``cov_interval`` →
      ``curvature_upd_interval`` (for swift, the curvature is measured at refreshes only, as
      SKFAC does).
    - ``fisher``: ``sampled`` → ``fisher_mc`` (one sample; categorical and Gaussian outputs only:
      ASDL has no Bernoulli likelihood, so the autoencoders need ``empirical`` → ``fisher_emp``).
    - ``ema_decay``: ASDL's weight of the newest batch (0: per-batch factors) ↔ 1 − ``ema_max``.
      ASDL's average starts from zero, so its first factors are scaled by ``ema_decay`` and the
      damping weighs more early on; kfacbench's K-FAC weights the k-th batch max(1/k,
      1 − ema_max) (the first factors are the first batch's). ``ema_start = "one-over-k"`` makes
      the adapter set ASDL's weight to that before each curvature update, so the two averages
      are the same; ``"zero"`` (default) is ASDL as shipped.
    - Biases: ASDL preconditions a Linear/Conv bias with the output-side factor alone; kfacbench
      folds it into Ā as the homogeneous coordinate (Martens & Grosse §3). Not matchable.
    - Conv layers under swift: ASDL reduces a conv factor over positions only when the batch is
      smaller than the factor's dimension and keeps K-FAC's full factor otherwise; SKFAC always
      reduces (Tang et al. §3.2, ``reduction = "sum"``). Not matchable.
    - The update: torch.optim.SGD with momentum on the preconditioned gradient, as kfac-fast and
      SKFAC apply theirs. BatchNorm layers get ASDL's unit-wise Fisher (kfacbench: identity).
    - Mixed precision: refused. ASDL forms its factors in the dtype of the recorded
      activations, bf16 under ``amp = "bf16"``, and then fails to invert them (no bf16
      Cholesky); kfacbench's K-FAC forms and inverts its factors in float32.
    - Embeddings and modules with a shared parameter are kept from ASDL (its
      ``ignore_modules``) and get plain SGD, kfacbench's identity: ASDL's embedding factor
      takes 1-D token ids only (``bincount`` fails on a language model's ``(batch, sequence)``
      ids), swift has no embedding factor at all, and a tied output layer would be
      preconditioned twice, with a vocab × vocab factor (see
      :func:`~kfacbench.optim.capture.find_layers`). ``method_info`` names them.

    Where the algorithms agree (no biases; for swift, Linear layers), the steps are the same to
    rounding: tests/optim/peers/test_asdl.py trains both side by side and compares the parameters.

    The keyword defaults are the ``asdl-kfac`` entry's (``asdl-skfac`` presets its own damping
    and ``ema_decay``). ``inverse_method`` names the one way ASDL inverts, Cholesky, so that the
    report pairs the peer with kfacbench's Cholesky cells; it is not a choice ASDL takes.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        swift: bool,
        inv_interval: int,
        seed: int,
        inverse_method: str = "cholesky",
        lr: float = 0.1,
        momentum: float = 0.9,
        damping: float = 1.0,
        fisher: str = "empirical",
        cov_interval: int = 1,
        ema_decay: float = 0.05,
        ema_start: str = "zero",
    ) -> None:
        if inverse_method != "cholesky":
            raise KfacbenchError(
                f"ASDL inverts by Cholesky only, got inverse_method = {inverse_method!r}"
            )
        asdl = _asdl()
        if problem.amp != "off":
            raise KfacbenchError(
                f"ASDL keeps its factors in the activations' dtype and cannot invert bf16 ones;"
                f" run the ASDL peers with amp = 'off', got {problem.amp!r}"
            )
        if fisher == "sampled" and problem.distribution == "bernoulli":
            raise KfacbenchError(
                "ASDL has no Bernoulli likelihood for a sampled Fisher; set fisher = 'empirical'"
                " for the autoencoders"
            )
        self.problem = problem
        shared = set(shared_modules(problem.model))
        ignored = {
            name: module
            for name, module in problem.model.named_modules()
            if name in shared or isinstance(module, torch.nn.Embedding)
        }
        self.ignored = list(ignored)
        config = asdl.PreconditioningConfig(
            damping=damping,
            preconditioner_upd_interval=inv_interval,
            curvature_upd_interval=inv_interval if swift else cov_interval,
            ema_decay=ema_decay if ema_decay > 0 else -1,
            ignore_modules=list(ignored.values()),
        )
        loss_type = "mse" if problem.distribution == "gaussian" else "cross_entropy"
        self.maker = asdl.KfacGradientMaker(
            problem.model,
            config,
            fisher_type=FISHERS[fisher],
            loss_type=loss_type,
            seed=seed,
            swift=swift,
        )
        self.opt = torch.optim.SGD(problem.model.parameters(), lr=lr, momentum=momentum)
        self.lr = lr
        self.swift = swift
        self.ema_decay = ema_decay
        self.one_over_k = ema_start == "one-over-k" and ema_decay > 0
        self.curvature_updates = 0
        self._loss = _reducible_loss(problem)

    def step(self, x: torch.Tensor, y: torch.Tensor, timer: PhaseTimer) -> torch.Tensor:
        """One step through ASDL's stages, each timed (see the module docstring)."""
        gm = self.maker
        k = gm.state["step"]
        self.opt.zero_grad(set_to_none=True)
        gm.config.data_size = x.shape[0]  # ASDL averages the statistics over it
        output = gm.setup_model_call(self.problem.forward, x)
        gm.setup_loss_call(self._loss, output, y)
        if gm.do_update_curvature(k):
            self.curvature_updates += 1
            if self.one_over_k:
                gm.config.ema_decay = max(1 / self.curvature_updates, self.ema_decay)
            with timer.phase("curvature"):
                gm.update_curvature()
        else:
            with timer.phase("forward"):
                gm.forward()
            with timer.phase("backward"):
                gm.backward()
        if gm.do_update_preconditioner(k):
            with timer.phase("inverse"):
                gm.update_preconditioner()
        with timer.phase("precondition"):
            gm.precondition()
        gm.state["step"] = k + 1
        with timer.phase("update"):
            self.opt.step()
        return gm.loss.detach()

    def log_values(self) -> dict[str, float]:
        """The learning rate."""
        return {"lr": self.lr}

    def state_bytes(self) -> dict[str, int]:
        """ASDL keeps its curvature on the model's modules, in attributes named after its Fisher
        (``module.fisher``: a SymMatrix holding the Kronecker factors A, B and their inverses
        A_inv, B_inv; unit-wise blocks for BatchNorm): tensors named ``*inv`` are inverses, the
        others factors (swift keeps only the inverses). SGD's momentum is first-order state."""
        attr = self.maker.fisher_maker.config.fisher_attr
        kept = [
            (path, t)
            for module in self.problem.model.modules()
            for name, value in vars(module).items()
            if name == attr or name.startswith(f"{attr}_")
            for path, t in walk_tensors(value, (name,))
        ]
        return count_bytes(
            [
                *(("factors", t) for path, t in kept if not path[-1].endswith("inv")),
                *(("inverses", t) for path, t in kept if path[-1].endswith("inv")),
                *optimizer_state(self.opt),
            ]
        )

    def info(self) -> dict[str, Any]:
        """The peer, its version and the modules kept from it (the cells table's
        ``method_info``)."""
        return {
            "peer": "asdl.KfacGradientMaker",
            "swift": self.swift,
            "version": package_version("asdfghjkl"),
            "identity_preconditioner": self.ignored,
        }


def _reducible_loss(problem: Problem) -> Callable[..., torch.Tensor]:
    """The problem's loss as a plain function with the ``reduction`` argument ASDL calls it with
    (``sum`` for its per-example statistics; ASDL accepts only a function or a loss module)."""
    distribution = problem.distribution

    def loss(output: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        per_example = per_example_loss(distribution, output, target)
        if reduction == "none":
            return per_example
        return per_example.sum() if reduction == "sum" else per_example.mean()

    return loss


def _asdl_build(swift: bool) -> Callable[[Problem, Mapping[str, Any], MethodContext], AsdlKfac]:
    def build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> AsdlKfac:
        if ctx.dist is not None:
            raise KfacbenchError("the ASDL peers run on one process (no --nproc)")
        return AsdlKfac(problem, swift=swift, seed=ctx.seed, **hp)

    return build


_ASDL_PARAMS: dict[str, Param] = {
    "inverse_method": Param(
        "ASDL inverts the damped factors by Cholesky, its only way (pairs it with kfacbench's"
        " Cholesky cell)",
        choices=("cholesky",),
    ),
    "lr": Param("learning rate of the SGD-momentum update", bounds="[0, inf)"),
    "momentum": Param("momentum of that update", bounds="[0, 1)"),
    "damping": Param("λ (π split of √λ)", bounds="(0, inf)"),
    "fisher": Param("sampled (fisher_mc) or empirical", choices=tuple(FISHERS)),
    "cov_interval": Param("steps between curvature updates (K-FAC only)", bounds="[1, inf)"),
    "ema_decay": Param("weight of the newest batch's factors (0: per batch)", bounds="[0, 1]"),
    "ema_start": Param("zero (ASDL) or one-over-k (kfacbench's K-FAC)", choices=EMA_STARTS),
}
"""The ASDL peers' hyperparameters: keyword arguments of :class:`AsdlKfac`, whose signature
holds the defaults (those of ``asdl-kfac``). Swift takes no ``inverse_method``."""

PRESETS: dict[str, dict[str, HParamValue]] = {"asdl-skfac": {"damping": 0.03, "ema_decay": 0.0}}
"""The registry entries whose defaults differ from their constructor's signature, and how."""

DEFAULTS_FROM: dict[str, Callable[..., Any]] = {"asdl-kfac": AsdlKfac, "asdl-skfac": AsdlKfac}
"""Each spec of this module and the callable whose signature holds its defaults (checked by
tests/optim/test_hparams.py)."""


SPECS = (
    MethodSpec(
        "asdl-kfac",
        "ASDL's K-FAC (KfacGradientMaker) with SGD momentum [peers extra]",
        hparams_from(AsdlKfac, _ASDL_PARAMS),
        uses_inv_interval=True,
        build=_asdl_build(swift=False),
    ),
    MethodSpec(
        "asdl-skfac",
        "ASDL's swift K-FAC (SKFAC, KfacGradientMaker swift=True) with SGD momentum [peers]",
        hparams_from(
            AsdlKfac,
            {k: v for k, v in _ASDL_PARAMS.items() if k != "inverse_method"},
            PRESETS["asdl-skfac"],
        ),
        uses_inv_interval=True,
        build=_asdl_build(swift=True),
    ),
)
