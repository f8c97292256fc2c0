"""K-FAC's re-scaling of its update with the exact Fisher (Martens & Grosse 2015, §6.4 and §7)
and the Levenberg–Marquardt adaptation of λ (§6.5): a mixin of :class:`.kfac.KFAC`.

δ = αΔ + μδ₀ minimises the quadratic model M(δ) = ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ over (α, μ), with the
Fisher-vector products taken as Jacobian-vector products (torch.func): F is never formed. The γ
search (§6.6) scores its candidates with the same model, or with the loss itself. Every decision
(the 2×2 solve, the best γ, the λ update) is a device tensor: no host sync.

The mixin reads the optimizer's state (declared below) and three of its methods; KFAC defines them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfacbench.core.problem import Distribution, Problem, loss_terms
from kfacbench.optim.tridiag import TridiagInverse

LAMBDA_RANGE = (1e-8, 1e8)
"""Bounds on λ under Levenberg–Marquardt adaptation (keeps ω₁ steps from running away)."""


def fisher_quadratic(
    distribution: Distribution, output: torch.Tensor, u: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """(1/m) Σ_examples uᵀ H v, with H the Hessian of the loss w.r.t. the network output.

    With u = Jδ₁ and v = Jδ₂ (Jacobian-vector products) this is δ₁ᵀ F δ₂ for the exact Fisher
    (generalised Gauss-Newton) of the mean loss — §6.4's "exact F" — without forming F.
    Bernoulli logits: H = diag(p(1−p)); Gaussian mean: H = I; softmax logits:
    H = diag(p) − ppᵀ, per position for sequences, whose per-token mean loss divides each
    position's block by the P positions (:func:`~kfacbench.core.problem.loss_terms`).
    """
    m = output.shape[0] * loss_terms(distribution, output)
    out = output.detach().float()
    u, v = u.float(), v.float()
    if distribution == "bernoulli":
        p = torch.sigmoid(out)
        return (p * (1 - p) * u * v).sum() / m
    if distribution == "gaussian":
        return (u * v).sum() / m
    p = torch.softmax(out, dim=-1)
    return ((p * u * v).sum() - ((p * u).sum(-1) * (p * v).sum(-1)).sum()) / m


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_i ⟨a_i, b_i⟩ over parameter lists, as a device scalar."""
    return torch.stack([(u * v).sum() for u, v in zip(a, b, strict=True)]).sum()


class QuadraticRescaling:
    """The re-scaling and Levenberg–Marquardt steps of K-FAC (see the module docstring)."""

    model: nn.Module
    problem: Problem
    params: list[torch.Tensor]
    device: torch.device
    steps: int
    lam: torch.Tensor
    gamma: torch.Tensor
    eta: float
    omega1: float
    omega2: float
    prev_update: list[torch.Tensor] | None
    rescale_momentum: bool
    adapt_gamma: bool
    gamma_interval: int
    gamma_criterion: str
    gamma_tracks_lambda: bool
    lm_include_damping: bool
    structure: str
    tridiag: TridiagInverse | None
    last_alpha: torch.Tensor
    last_mu: torch.Tensor
    last_rho: torch.Tensor
    _model_change: torch.Tensor

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _precondition(
        self, grads: list[torch.Tensor], gamma: torch.Tensor, current: bool = False
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def _tridiag_pieces(self, gamma: torch.Tensor) -> TridiagInverse:
        raise NotImplementedError

    def _functional_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The training-mode forward pass at ``params`` on *copies* of the buffers.

        A train-mode BatchNorm must not update its running statistics in these extra passes, and
        under torch.func the copies must be made inside the transformed function.
        """
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        return functional_call(self.model, (params, buffers), (x,))

    def _by_name(
        self, values: Sequence[torch.Tensor], fill: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """``values`` (in ``self.params`` order) keyed by parameter name for ``functional_call``;
        parameters outside ``self.params`` get ``fill(parameter)``."""
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        out = {n: fill(p) for n, p in self.model.named_parameters()}
        out.update({by_id[id(p)]: v for p, v in zip(self.params, values, strict=True)})
        return out

    def _jvp(self, x: torch.Tensor, tangents: Sequence[torch.Tensor]) -> torch.Tensor:
        """J v: the change of the network output along ``tangents`` (forward mode).

        Attention runs in its composite (math) form here: the fused flash and memory-efficient
        kernels have no forward-mode derivative (torch 2.11-2.13).
        """
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        tangent = self._by_name(tangents, fill=torch.zeros_like)
        with sdpa_kernel(SDPBackend.MATH):
            out = jvp(lambda p: self._functional_forward(p, x), (params,), (tangent,))
        return out[1]

    def _quad_terms(
        self,
        x: torch.Tensor,
        output: torch.Tensor,
        grads: list[torch.Tensor],
        direction: list[torch.Tensor],
        j_prev: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The 2×2 exact-Fisher system of §7 for δ = αΔ + μδ₀.

        Returns (F2, N2, b, jd): F2 the Fisher Gram matrix of (Δ, δ₀), N2 their Euclidean Gram
        matrix, b = [∇hᵀΔ, ∇hᵀδ₀], jd = JΔ. Without momentum (or before the first update) the
        δ₀ row and column are zero.
        """
        dist = self.problem.distribution
        jd = self._jvp(x, direction)
        fdd = fisher_quadratic(dist, output, jd, jd)
        ndd = dot(direction, direction)
        bd = dot(grads, direction)
        zero = torch.zeros((), device=self.device)
        if j_prev is None or self.prev_update is None:
            f2 = torch.stack([torch.stack([fdd, zero]), torch.stack([zero, zero])])
            n2 = torch.stack([torch.stack([ndd, zero]), torch.stack([zero, zero])])
            return self._global_mean(f2), n2, torch.stack([bd, zero]), jd
        prev = self.prev_update
        fdp = fisher_quadratic(dist, output, jd, j_prev)
        fpp = fisher_quadratic(dist, output, j_prev, j_prev)
        ndp, npp = dot(direction, prev), dot(prev, prev)
        f2 = torch.stack([torch.stack([fdd, fdp]), torch.stack([fdp, fpp])])
        n2 = torch.stack([torch.stack([ndd, ndp]), torch.stack([ndp, npp])])
        # F2 is a mean over the shard's examples; ∇h and the directions are already global.
        return self._global_mean(f2), n2, torch.stack([bd, dot(grads, prev)]), jd

    def _solve(
        self, f2: torch.Tensor, n2: torch.Tensor, b: torch.Tensor, has_prev: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Minimise M over (α, μ): C2 [α, μ]ᵀ = −b with C2 = F2 + (λ+η) N2; returns (coef, M)."""
        c2 = f2 + (self.lam + self.eta) * n2
        if has_prev:
            # A tiny ridge keeps the solve finite when Δ and δ₀ are parallel.
            ridge = 1e-12 * c2.diagonal().abs().max() * torch.eye(2, device=self.device)
            coef, _ = torch.linalg.solve_ex(c2 + ridge, -b)  # _ex: no error check, no sync
        else:
            alpha = -b[0] / c2[0, 0].clamp_min(1e-30)
            coef = torch.stack([alpha, torch.zeros_like(alpha)])
        m_value = 0.5 * coef @ c2 @ coef + b @ coef
        return coef, m_value

    def _rescaled_update(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        output: torch.Tensor,
        grads: list[torch.Tensor],
        direction: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """δ = αΔ + μδ₀ from the exact-Fisher quadratic model, with the γ search when due."""
        use_prev = self.rescale_momentum and self.prev_update is not None
        j_prev = self._jvp(x, self.prev_update) if use_prev and self.prev_update else None
        gammas = [self.gamma]
        directions = [direction]
        if self.adapt_gamma and self.steps > 0 and self.steps % self.gamma_interval == 0:
            for gamma in (self.gamma * self.omega2, self.gamma / self.omega2):
                gammas.append(gamma)
                directions.append(self._precondition(grads, gamma))
        solved = []
        for cand in directions:
            f2, n2, b, _ = self._quad_terms(x, output, grads, cand, j_prev)
            coef, m_value = self._solve(f2, n2, b, use_prev)
            if len(directions) > 1 and self.gamma_criterion == "loss":
                moved = torch._foreach_add(self.params, self._combine(cand, coef, use_prev))
                m_value = self._objective(moved, x, y)
            solved.append((coef, m_value, f2, n2, b))
        if len(solved) == 1:
            (coef, _, f2, n2, b), cand = solved[0], direction
        else:
            # Keep the γ whose update scores best, chosen on the device (§6.6).
            # Indexing with a 0-dim device tensor would read it on the host (a sync).
            best = torch.argmin(torch.stack([r[1] for r in solved])).reshape(1)

            def pick(values: Sequence[torch.Tensor]) -> torch.Tensor:
                return torch.stack(list(values)).index_select(0, best).squeeze(0)

            coef, _, f2, n2, b = (pick([r[i] for r in solved]) for i in range(5))
            cand = [pick(ts) for ts in zip(*directions, strict=True)]
            self.gamma = pick(gammas)
            if self.structure == "tridiag":
                self.tridiag = self._tridiag_pieces(self.gamma)

        self.last_alpha, self.last_mu = coef[0], coef[1]
        update = self._combine(cand, coef, use_prev)
        # The model change that Levenberg–Marquardt compares the actual change with (§6.5).
        lm_damping = self.lam + self.eta if self.lm_include_damping else self.eta
        self._model_change = 0.5 * coef @ (f2 + lm_damping * n2) @ coef + b @ coef
        return update

    def _combine(
        self, direction: list[torch.Tensor], coef: torch.Tensor, use_prev: bool
    ) -> list[torch.Tensor]:
        """δ = αΔ + μδ₀."""
        update = list(torch._foreach_mul(direction, coef[0]))
        if use_prev and self.prev_update is not None:
            torch._foreach_add_(update, list(torch._foreach_mul(self.prev_update, coef[1])))
        return update

    def _objective(
        self, values: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """h on the minibatch (ℓ2 cost included) with ``self.params`` set to ``values``, without
        touching θ or BatchNorm statistics."""
        params = self._by_name(values, fill=torch.Tensor.detach)
        with self.problem.precision(x.device):  # as the step's forward: ρ compares the two
            output = self._functional_forward(params, x)
        loss = self._global_mean(self.problem.loss(output.float(), y))
        return loss + 0.5 * self.eta * dot(values, values)

    def _levenberg_marquardt(self, x: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        """§6.5: ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0)); λ ← ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4.

        h includes the ℓ2 cost (η/2)‖θ‖². The decision is taken with ``torch.where`` on the
        device, so it costs one extra forward pass and no host sync.
        """
        assert self.prev_update is not None
        old = torch._foreach_sub(self.params, self.prev_update)
        before = self._global_mean(loss) + 0.5 * self.eta * dot(old, old)
        actual = self._objective(self.params, x, y) - before
        rho = actual / self._model_change
        self.last_rho = rho
        lam = torch.where(rho > 0.75, self.lam * self.omega1, self.lam)
        lam = torch.where(rho < 0.25, self.lam / self.omega1, lam)
        lam = lam.clamp(*LAMBDA_RANGE)
        if not self.adapt_gamma:
            self.gamma = torch.sqrt(lam + self.eta)
        elif self.gamma_tracks_lambda:
            self.gamma = self.gamma * torch.sqrt((lam + self.eta) / (self.lam + self.eta))
        self.lam = lam
