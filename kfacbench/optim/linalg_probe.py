"""Measured linear algebra: which damped-inverse method is fastest here, at the sizes a model has.

The refresh's cost depends less on FLOPs than on the solver builds of the device: on the first
GPU run (an H200, torch 2.11+cu130) K-FAC's ``eigh`` refresh was only 1.7-3.7× faster than on 2
CPU cores, and pytorch/pytorch#183806 reports ``eigh`` 30-130× slower on that build than on
2.5.1+cu124; #175585 reports that batched ``eigh`` loops matrix by matrix above n = 32. So the
choice is measured, not assumed: :func:`probe` times every method of
:mod:`kfacbench.optim.inverses` on batches of the shapes a model's refresh runs (one per size
bucket), in float32 and float64, and checks each result against float64 ``eigh``.

The test matrices are K-FAC-like: M = Q diag(λ) Qᵀ with a random orthogonal Q and a Zipf spectrum
λ_i ∝ 1/i scaled to mean 1, damped by δ = :data:`DAMPING` (condition number ≈ 10³ at n = 1000).
Newton-Schulz starts from the inverse of the same factor with its eigenvalues moved by a
log-normal :data:`DRIFT` (a factor between refreshes; in a run its residual check decides).

A method *agrees* when its relative Frobenius error against float64 eigh is at most
:data:`AGREE_FACTOR` × float32 (or float64) eigh's own, or below :data:`ERROR_FLOOR`: ``auto``
then never loses accuracy against the eigh path it replaces by more than that factor.

Results are cached per device name, torch version and CUDA version under
``$KFACBENCH_CACHE`` (default ``~/.cache/kfacbench``), so a suite probes each shape once per
machine, when the optimizer is built (outside the timed steps).
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from kfacbench.errors import KfacbenchError
from kfacbench.optim.inverses import METHODS, invert, plan_buckets

DAMPING = 1e-2
"""δ of the test matrices, relative to their mean eigenvalue 1."""
DRIFT = 0.1
"""σ of the log-normal eigenvalue change between the warm start's factor and the probed one."""
AGREE_FACTOR = 4.0
"""A method agrees with eigh when its error is at most this multiple of eigh's own."""
ERROR_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-12}
"""Errors below these always agree (eigh's own can be smaller than a rounding of the result)."""
EIGH_SLOW = 10.0
"""``eigh`` at least this many times slower than Cholesky at the same shape is flagged."""
BUDGET_S = 30.0
"""Default wall-clock budget of a probe; shapes not reached are rows with status ``budget``."""
SLOW_CALL_S = 0.2
"""Calls slower than this are timed once (the probe's time goes to the shapes, not repeats)."""
CACHE_VERSION = 1
"""Bumped when the probe's matrices or rules change (older cache entries are ignored)."""
DTYPES = {"float32": torch.float32, "float64": torch.float64}
_T = TypeVar("_T")


@dataclass(frozen=True)
class Shape:
    """One batched solver call: ``batch`` matrices of size ``size``."""

    size: int
    batch: int


def refresh_shapes(sizes: Iterable[int], ratio: float) -> list[Shape]:
    """The calls a refresh of factors of these sizes makes (its size buckets at ``ratio``)."""
    return [Shape(size, len(members)) for size, members in plan_buckets(list(sizes), ratio)]


def build_name(device: torch.device) -> str:
    """The device and the torch/CUDA build, as the probe's rows and cache key name them."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} | torch {torch.__version__} | CUDA {torch.version.cuda}"
    return f"cpu ({torch.get_num_threads()} threads) | torch {torch.__version__}"


def cache_dir() -> Path:
    """Where probe results are kept: ``$KFACBENCH_CACHE`` or ``~/.cache/kfacbench``."""
    root = os.environ.get("KFACBENCH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "kfacbench"


def _cache_file(device: torch.device) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", build_name(device)).strip("-")
    return cache_dir() / "linalg" / f"{slug}.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _test_batch(
    shape: Shape, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 damped matrices, the damped matrices the warm start inverts, and their inverses
    from the known eigendecomposition (the float64 reference)."""
    gen = torch.Generator().manual_seed(seed)
    n, k = shape.size, shape.batch
    q, _ = torch.linalg.qr(torch.randn(k, n, n, generator=gen, dtype=torch.float64))
    lam = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    lam = (lam / lam.mean()).expand(k, n)
    drifted = lam * torch.exp(DRIFT * torch.randn(k, n, generator=gen, dtype=torch.float64))

    def damped(values: torch.Tensor) -> torch.Tensor:
        return (q * (values + DAMPING).unsqueeze(-2)) @ q.mT

    mats, previous = damped(lam), damped(drifted)
    reference = (q / (lam + DAMPING).unsqueeze(-2)) @ q.mT  # Q diag(1/(λ + δ)) Qᵀ, exactly
    return mats.to(device), previous.to(device), reference.to(device)


def _time(fn: Callable[[], _T], device: torch.device, deadline: float) -> tuple[float, _T]:
    """Median milliseconds of ``fn`` after one untimed call, and the result of its last call.

    A call slower than :data:`SLOW_CALL_S` is timed by its first call alone (start-up costs are
    small beside it), a faster one by the median of three more.
    """
    _sync(device)
    t0 = time.perf_counter()
    result = fn()
    _sync(device)
    first = time.perf_counter() - t0
    if first > SLOW_CALL_S:
        return 1e3 * first, result
    repeats = 1 if time.perf_counter() + 3 * first > deadline else 3
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times), result


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want)
    return float(diff.max())


def probe(
    shapes: Sequence[Shape],
    device: torch.device,
    dtypes: Sequence[str] = ("float32", "float64"),
    budget_s: float = BUDGET_S,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Time and check every method on batches of ``shapes`` on ``device``, within ``budget_s``.

    Shapes run smallest first, so a budget cut leaves the largest unmeasured (status
    ``budget``). Returns one row per (shape, dtype, method): ``ms`` per batched call and per
    matrix, the relative error against float64 eigh, the tolerance and whether it ``agrees``,
    and ``eigh_over_cholesky`` (eigh's time / Cholesky's at that shape) with ``eigh_slow``.
    """
    deadline = time.perf_counter() + budget_s
    build = build_name(device)
    rows: list[dict[str, Any]] = []
    for shape in sorted(set(shapes), key=lambda s: (s.size, s.batch)):
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            base = {"build": build, "size": shape.size, "batch": shape.batch, "dtype": dtype_name}
            if time.perf_counter() > deadline:
                rows += [base | {"method": m, "status": "budget"} for m in METHODS]
                continue
            mats64, previous64, reference = _test_batch(shape, device, seed)
            mats = mats64.to(dtype)
            warm, _ = invert(previous64.to(dtype), "cholesky")
            measured: dict[str, dict[str, Any]] = {}
            for method in METHODS:
                call = partial(invert, mats, method, warm if method == "newton" else None)
                try:
                    ms, (result, ok) = _time(call, device, deadline)
                    error = _rel_error(result, reference) if bool(ok.all()) else math.inf
                    measured[method] = {"ms": ms, "rel_error": error, "status": "measured"}
                except (RuntimeError, torch.linalg.LinAlgError) as exc:
                    measured[method] = {"status": f"failed: {str(exc).splitlines()[0][:120]}"}
            eigh_error = measured["eigh"].get("rel_error", math.nan)
            tolerance = max(AGREE_FACTOR * eigh_error, ERROR_FLOOR[dtype])
            eigh_ms = measured["eigh"].get("ms", math.nan)
            ratio = eigh_ms / measured["cholesky"].get("ms", math.nan)
            for method, row in measured.items():
                ms = row.get("ms", math.nan)
                rows.append(
                    base
                    | row
                    | {
                        "method": method,
                        "ms": ms,
                        "ms_per_matrix": ms / shape.batch,
                        "tolerance": tolerance,
                        "agrees": bool(row.get("rel_error", math.inf) <= tolerance),
                        "eigh_over_cholesky": ratio,
                        "eigh_slow": bool(ratio >= EIGH_SLOW),
                    }
                )
    return rows


def fastest(rows: Iterable[dict[str, Any]], shape: Shape, dtype: str) -> str | None:
    """The fastest agreeing method measured at ``shape`` and ``dtype`` (``None``: none)."""
    candidates = [
        r
        for r in rows
        if r["size"] == shape.size
        and r["batch"] == shape.batch
        and r["dtype"] == dtype
        and r.get("status") == "measured"
        and r.get("agrees")
    ]
    return min(candidates, key=lambda r: r["ms"])["method"] if candidates else None


def load_cache(device: torch.device) -> list[dict[str, Any]]:
    """The cached probe rows of this device and build (empty when none or outdated)."""
    path = _cache_file(device)
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []  # a damaged cache is probed again, not an error
    return list(data.get("rows", [])) if data.get("version") == CACHE_VERSION else []


def save_cache(device: torch.device, rows: Sequence[dict[str, Any]]) -> Path:
    """Write the probe rows of this device and build to the cache; returns the file."""
    path = _cache_file(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "rows": list(rows)}, indent=1))
        tmp.replace(path)
    except OSError as exc:
        raise KfacbenchError(f"cannot write the linear-algebra cache {path}: {exc}") from None
    return path


def choose(shapes: Sequence[Shape], device: torch.device, dtype: str = "float32") -> list[str]:
    """``auto``'s method for each shape: the cached choice, probing the shapes not yet cached.

    A shape where no method agrees (or none could be measured) gets ``eigh``, the reference.
    """
    rows = load_cache(device)
    known = {(r["size"], r["batch"], r["dtype"]) for r in rows if r.get("status") == "measured"}
    missing = {(s.size, s.batch, dtype) for s in shapes} - known
    if missing:
        probed = [Shape(size, batch) for size, batch, _ in sorted(missing)]
        fresh = probe(probed, device, dtypes=(dtype,), budget_s=math.inf)
        rows = [r for r in rows if (r["size"], r["batch"], r["dtype"]) not in missing] + fresh
        save_cache(device, rows)
    return [fastest(rows, s, dtype) or "eigh" for s in shapes]


def slow_eigh(rows: Iterable[dict[str, Any]]) -> list[str]:
    """One line per shape where eigh is ≥ :data:`EIGH_SLOW`× slower than Cholesky."""
    seen: set[tuple[int, int, str]] = set()
    lines = []
    for r in rows:
        key = (r["size"], r["batch"], r["dtype"])
        if r.get("eigh_slow") and key not in seen:
            seen.add(key)
            lines.append(
                f"eigh {r['eigh_over_cholesky']:.0f}× slower than Cholesky at"
                f" {r['batch']}×{r['size']}² {r['dtype']}"
            )
    return lines
