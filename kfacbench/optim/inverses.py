"""Damped inverses (M + δI)⁻¹ of Kronecker factors: K-FAC's inverse refresh (§6.3, §8).

K-FAC with fixed damping needs only the damped inverses of its factors, (Ā + πγI)⁻¹ and
(G + γ/π I)⁻¹, once every T₃ steps. How they are computed is free, and on a GPU the choice decides
the refresh's cost: the factors are small (tens to a few thousand rows), so the refresh is a
handful of latency-bound solver calls, and the solvers' speed differs by build (``eigh`` on torch
2.11+cu130 is reported 30-130× slower than on older builds, pytorch/pytorch#183806). The methods:

- ``eigh``: the eigendecomposition, then Q diag(1/(d + δ)) Qᵀ (the paper's choice, §8, because
  it lets the damping change without a new factorisation).
- ``cholesky``: LLᵀ = M + δI, then the inverse from L.
- ``inv``: LU with pivoting.
- ``newton``: the Newton-Schulz iteration X ← X(2I − (M + δI)X), warm-started from the previous
  refresh's inverse: only GEMMs, which run at a GPU's arithmetic speed. It converges
  quadratically while ‖I − (M + δI)X₀‖ < 1, which holds when the factors moved little since the
  last refresh (they are moving averages, §5); its residual is checked and a matrix that did not
  converge is inverted again by Cholesky. The first refresh has no warm start and uses Cholesky.
- ``auto``: per size bucket, the fastest of the above on this device and torch build whose
  inverse agrees with eigh's (:mod:`kfacbench.optim.linalg_probe` measures and caches it).

A refresh is one call per *size bucket*: factors whose sizes lie within :data:`BUCKET_RATIO` of the
bucket's largest are padded with an identity block, [[M + δI, 0], [0, I]], whose inverse is
[[(M + δI)⁻¹, 0], [0, I]], and inverted as one batch. All buckets' status flags are read in one
host transfer per refresh, and only the systems that failed are solved again (in float64).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kfacbench.errors import KfacbenchError

METHODS = ("eigh", "cholesky", "inv", "newton")
"""The damped-inverse methods a refresh can run (``auto`` chooses among them)."""
INVERSE_METHODS = (*METHODS, "auto")
"""The values of K-FAC's ``inverse_method``."""
BUCKET_RATIO = math.sqrt(2.0)
"""On a GPU a factor joins a bucket when the bucket's size is at most this multiple of its own:
padding then costs at most 2^1.5 ≈ 2.8× the factor's own solver FLOPs, and saves the launches of
a separate call (the refresh is latency-bound there). On a CPU only equal sizes share a bucket:
a call costs no launch latency, and padding would cost FLOPs."""
NEWTON_STEPS = 6
"""Newton-Schulz iterations per refresh: the residual squares each step, so a warm start with
‖R₀‖ ≤ 0.5 reaches 0.5^64, below float64's rounding; two GEMMs each."""
NEWTON_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}
"""Largest accepted ‖I − (M + δI)X‖_F of a Newton-Schulz result; it bounds the relative error
of X in the spectral norm (‖X − X*‖ ≤ ‖X*‖‖R‖), so a larger residual falls back to Cholesky."""


def symmetric(mat: torch.Tensor) -> torch.Tensor:
    """½(M + Mᵀ): a factor or an inverse with the rounding asymmetry removed."""
    return 0.5 * (mat + mat.mT)


def robust_eigh(mat: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: the factors are PSD) and eigenvectors of a symmetric matrix.

    Retries in float64 with a warning when float32 fails, so a bad factor never becomes a NaN
    update.
    """
    sym = symmetric(mat)
    try:
        vals, vecs = torch.linalg.eigh(sym)
    except torch.linalg.LinAlgError:
        warnings.warn(f"K-FAC: eigh of {what} failed in float32; retrying in float64", stacklevel=2)
        vals, vecs = torch.linalg.eigh(sym.double())
    return vals.clamp_min(0).to(mat.dtype), vecs.to(mat.dtype)


def cholesky_inverse(chol: torch.Tensor) -> torch.Tensor:
    """(LLᵀ)⁻¹ from the Cholesky factor L, without a host check.

    On CPU this is LAPACK's potri (2n³/3 FLOPs, against 2n³ for a solve with the identity). On
    CUDA torch's ``cholesky_inverse`` is itself a solve against the identity followed by a host
    check of its status; ``cholesky_solve`` runs the same kernel without the check.
    """
    if chol.device.type == "cuda":
        eye = torch.eye(chol.shape[-1], device=chol.device, dtype=chol.dtype)
        return torch.cholesky_solve(eye.expand_as(chol), chol)
    return torch.cholesky_inverse(chol)


def invert(
    stack: torch.Tensor, method: str, warm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverses of a batch of symmetric positive definite matrices and a success flag per matrix.

    Args:
        stack: ``(k, n, n)`` damped matrices M + δI.
        method: one of :data:`METHODS`.
        warm: ``newton`` only: the starting inverses (``None``: Cholesky instead).

    Returns:
        The inverses, and a boolean ``(k,)`` device tensor (no host read here).
    """
    if method == "eigh":
        try:
            vals, vecs = torch.linalg.eigh(stack)  # no status variant: a failure raises
        except torch.linalg.LinAlgError:
            return torch.full_like(stack, math.nan), torch.zeros(
                stack.shape[0], dtype=torch.bool, device=stack.device
            )
        ok = (vals > 0).all(-1)
        return (vecs / vals.clamp_min(torch.finfo(vals.dtype).tiny).unsqueeze(-2)) @ vecs.mT, ok
    if method == "cholesky" or (method == "newton" and warm is None):
        chol, info = torch.linalg.cholesky_ex(stack)
        ok = info == 0
        # A failed factor would make the inverse raise (CPU) or fill with NaN: use the identity
        # in its place; the flag already says it failed.
        eye = torch.eye(stack.shape[-1], device=stack.device, dtype=stack.dtype)
        chol = torch.where(ok[:, None, None], chol, eye)
        return cholesky_inverse(chol), ok
    if method == "inv":
        inverse, info = torch.linalg.inv_ex(stack)
        return inverse, info == 0
    if method == "newton":
        assert warm is not None
        x = warm
        for _ in range(NEWTON_STEPS):
            x = torch.baddbmm(x, x, torch.bmm(stack, x), beta=2.0, alpha=-1.0)  # 2X − XMX
        eye = torch.eye(stack.shape[-1], device=stack.device, dtype=stack.dtype)
        residual = torch.linalg.matrix_norm(eye - torch.bmm(stack, x))
        return symmetric(x), residual <= NEWTON_TOL[stack.dtype]
    raise KfacbenchError(f"unknown inverse method {method!r}; known: {', '.join(METHODS)}")


def bucket_ratio(device: torch.device) -> float:
    """:data:`BUCKET_RATIO` on CUDA, 1 (equal sizes only) elsewhere."""
    return BUCKET_RATIO if device.type == "cuda" else 1.0


def plan_buckets(sizes: Sequence[int], ratio: float = BUCKET_RATIO) -> list[tuple[int, list[int]]]:
    """Group factors by size: ``[(padded size, indices into sizes)]``, largest bucket first.

    Sizes are taken from the largest down; a bucket keeps every size at least 1/``ratio`` of its
    largest. Deterministic for a given list of sizes.
    """
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    buckets: list[tuple[int, list[int]]] = []
    for i in order:
        if buckets and sizes[i] * ratio >= buckets[-1][0]:
            buckets[-1][1].append(i)
        else:
            buckets.append((sizes[i], [i]))
    return buckets


@dataclass
class Bucket:
    """One batched solver call of a refresh.

    Attributes:
        size: the padded size n of the batch.
        members: indices of the factors in it (into the inverter's factor list).
        method: the method it runs (resolved: never ``auto``).
        previous: the last refresh's padded inverses (Newton-Schulz warm start).
    """

    size: int
    members: list[int]
    method: str
    previous: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    """1 on each member's diagonal entries, 0 on its padding's; built at the first refresh (a
    host-to-device copy later would wait for the device)."""


@dataclass
class DampedInverter:
    """Refreshes the damped inverses of a fixed list of factors, one solver call per bucket.

    Args:
        sizes: the factors' sizes, in the order :meth:`refresh` receives them.
        methods: the method of each bucket of :func:`plan_buckets` (``sizes``), resolved.
        names: what to call each factor in warnings and errors.
        ratio: the bucket ratio (:func:`bucket_ratio` of the factors' device).
    """

    sizes: list[int]
    methods: list[str]
    names: list[str]
    ratio: float = BUCKET_RATIO
    buckets: list[Bucket] = field(init=False)
    fallbacks: int = field(default=0, init=False)
    """Newton-Schulz results rejected by the residual check and redone by Cholesky."""

    def __post_init__(self) -> None:
        plan = plan_buckets(self.sizes, self.ratio)
        if len(plan) != len(self.methods):
            raise ValueError(f"{len(plan)} buckets but {len(self.methods)} methods")
        self.buckets = [
            Bucket(size, members, method)
            for (size, members), method in zip(plan, self.methods, strict=True)
        ]

    def refresh(
        self, mats: Sequence[torch.Tensor], dampings: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """(mats[i] + dampings[i]·I)⁻¹ for every factor, with one host read of the status."""
        if [m.shape[0] for m in mats] != self.sizes:
            raise ValueError(f"factor sizes {[m.shape[0] for m in mats]}, planned {self.sizes}")
        results: list[torch.Tensor] = []
        flags: list[torch.Tensor] = []
        for bucket in self.buckets:
            stack = self._stack(bucket, mats, dampings, mats[0].dtype)
            inverse, ok = invert(stack, bucket.method, bucket.previous)
            results.append(inverse)
            flags.append(ok)
        failed = (~torch.cat(flags)).nonzero().flatten().tolist()  # the refresh's one host read
        if failed:
            self._redo(failed, mats, dampings, results)
        out: list[torch.Tensor | None] = [None] * len(mats)
        for bucket, inverse in zip(self.buckets, results, strict=True):
            if bucket.method == "newton":
                bucket.previous = inverse
            for j, i in enumerate(bucket.members):
                n = self.sizes[i]
                out[i] = inverse[j, :n, :n]
        return [inv for inv in out if inv is not None]

    def _stack(
        self,
        bucket: Bucket,
        mats: Sequence[torch.Tensor],
        dampings: Sequence[torch.Tensor],
        dtype: torch.dtype,
        members: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """The bucket's padded damped matrices [[sym(M) + δI, 0], [0, I]]."""
        members = bucket.members if members is None else members
        device = mats[members[0]].device
        stack = torch.eye(bucket.size, device=device, dtype=dtype).repeat(len(members), 1, 1)
        for j, i in enumerate(members):
            n = self.sizes[i]
            stack[j, :n, :n] = mats[i]
        stack = symmetric(stack)
        # δ on the members' diagonals, 0 on the padding's (its diagonal is the identity's 1).
        mask = bucket.mask
        if mask is None or len(members) != len(bucket.members) or mask.dtype != dtype:
            mask = torch.tensor(
                [[float(c < self.sizes[i]) for c in range(bucket.size)] for i in members],
                device=device,
                dtype=dtype,
            )
            if list(members) == bucket.members and dtype == mats[members[0]].dtype:
                bucket.mask = mask
        delta = torch.stack([dampings[i] for i in members]).to(dtype).unsqueeze(-1)
        stack.diagonal(dim1=-2, dim2=-1).add_(mask * delta)
        return stack

    def _redo(
        self,
        failed: list[int],
        mats: Sequence[torch.Tensor],
        dampings: Sequence[torch.Tensor],
        results: list[torch.Tensor],
    ) -> None:
        """Solve the failed systems again: a Newton-Schulz miss by Cholesky, any other failure in
        float64 (a small damping can vanish in the float32 sum already) with a warning."""
        start = 0
        for b, bucket in enumerate(self.buckets):
            mine = [j - start for j in failed if start <= j < start + len(bucket.members)]
            start += len(bucket.members)
            if not mine:
                continue
            members = [bucket.members[j] for j in mine]
            # A Newton bucket's first refresh ran Cholesky (no warm start yet).
            method = (
                "cholesky"
                if bucket.method == "newton" and bucket.previous is None
                else bucket.method
            )
            if method == "newton":
                self.fallbacks += len(mine)
                stack = self._stack(bucket, mats, dampings, mats[0].dtype, members)
                again, ok = invert(stack, "cholesky")
                if bool(ok.all()):
                    results[b][mine] = again
                    continue
                method = "cholesky"
            names = ", ".join(self.names[i] for i in members)
            warnings.warn(
                f"K-FAC: {method} of damped {names} failed in float32; retrying in float64",
                stacklevel=3,
            )
            stack64 = self._stack(bucket, mats, dampings, torch.float64, members)
            retry, ok64 = invert(stack64, method)
            if not bool(ok64.all()):
                bad = ", ".join(
                    self.names[i] for i, ok in zip(members, ok64.tolist(), strict=True) if not ok
                )
                raise torch.linalg.LinAlgError(
                    f"K-FAC: {method} of damped {bad} failed in float64 too"
                    f" ({'not positive definite' if method != 'inv' else 'singular'})"
                )
            results[b][mine] = retry.to(results[b].dtype)

    def info(self) -> dict[str, Any]:
        """The method of each factor (``method_info``) and the Newton-Schulz fallbacks."""
        chosen = {self.names[i]: b.method for b in self.buckets for i in b.members}
        buckets = [
            {"size": b.size, "factors": len(b.members), "method": b.method} for b in self.buckets
        ]
        return {
            "inverse_methods": chosen,
            "inverse_buckets": buckets,
            "newton_fallbacks": self.fallbacks,
        }


def damped_inverses(
    mats: Sequence[torch.Tensor], dampings: Sequence[torch.Tensor], method: str, what: Sequence[str]
) -> list[torch.Tensor]:
    """(mat_i + damping_i·I)⁻¹ of every factor by one method (a one-off :class:`DampedInverter`)."""
    sizes = [m.shape[0] for m in mats]
    ratio = bucket_ratio(mats[0].device) if mats else 1.0
    methods = [method] * len(plan_buckets(sizes, ratio))
    inverter = DampedInverter(sizes, methods, list(what), ratio)
    return inverter.refresh(mats, dampings)
