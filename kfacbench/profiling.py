"""Per-kernel profiles: torch.profiler traces of a window of steps, and the ``kernels`` table.

Profiling distorts timing (the profiler adds host work to every operator), so it never runs inside
a timed cell: :func:`profile_cell` builds the cell again from its config (the same model, method
and data as the timed run, :func:`~kfacbench.runner.prepare_cell`) and trains it for
``wait + warmup + active`` steps under ``torch.profiler.profile`` with a schedule. Only the
``active`` steps are recorded. The trace goes through ``tensorboard_trace_handler`` to
``<run>/traces/<cell-id>/<cell-id>.<pid>.pt.trace.json``: the Chrome-trace JSON that Kineto writes,
which the TensorBoard plugin (torch-tb-profiler), Perfetto and chrome://tracing all read.

:func:`kernel_rows` turns one trace into rows of the ``kernels`` table, one per (phase, kernel):

- on CUDA, the device kernels, copies and memsets, attributed to the phase whose host range
  (``kfacbench/<phase>``, see :class:`~kfacbench.core.timing.PhaseTimer`) contains the runtime
  call that launched them (matched by correlation id), plus a ``(device idle)`` row per phase;
- on CPU, the aten operators by *self* time (an operator's time minus its child operators', so
  nested ops such as ``aten::linear`` → ``aten::addmm`` are not counted twice), attributed by time
  containment, plus an ``(outside operators)`` row per phase for the Python and dispatch time
  between them.

Steps time outside any phase goes to phase ``(none)``. ``share`` is the row's time over the total
time of the profiled steps, so the shares of a cell sum to about 1 (exactly on CPU).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from kfacbench.core.device import dist_device, resolve_device
from kfacbench.core.loop import train
from kfacbench.core.timing import ANNOTATION_PREFIX, STEP
from kfacbench.distributed import Dist, broadcast_object
from kfacbench.errors import KfacbenchError
from kfacbench.runner import DataCache, RunOptions, prepare_cell
from kfacbench.runs.schema import KERNEL_COLUMNS
from kfacbench.runs.store import atomic_write_parquet
from kfacbench.suite import Cell, ProfileWindow

CATEGORIES = ("gemm", "solver", "elementwise", "reduction", "copy/memset", "communication", "other")
"""Kernel categories of the ``kernels`` table, matched in this order by :func:`categorize`."""

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("communication", re.compile(r"nccl|all_?reduce|all_?gather|broadcast|gloo|c10d", re.I)),
    (
        "solver",
        re.compile(
            r"eigh|syevd|syevj|cholesky|potr[fis]|getr[fs]|trsm|trtri|geqrf|linalg_|lu_|solve"
            r"|cusolver|magma|inverse"
            # cuSOLVER's symmetric eigensolver internals (tridiagonalise, divide and conquer, ...)
            r"|sytrd|ormtr|stedc|steqr|sterf|lansy|larf[gbt]?|orgtr|orgqr",
            re.I,
        ),
    ),
    (
        "gemm",
        re.compile(
            r"gemm|gemv|matmul|aten::(mm|bmm|addmm|addmv|baddbmm|linear|dot|mv)$|cutlass|cublas"
            r"|sm\d+_xmma|conv|cudnn|winograd|implicit_?gemm|mkldnn"
            r"|nvjet",  # Hopper cuBLAS kernels (nvjet_tst_...)
            re.I,
        ),
    ),
    (
        "copy/memset",
        re.compile(
            r"memcpy|memset|copy|aten::(to|_to_copy|contiguous|clone|cat|stack|fill_|zero_|zeros"
            r"|ones|empty\w*|pad|constant_pad_nd|im2col|col2im|unfold|index\w*|gather|scatter\w*)$",
            re.I,
        ),
    ),
    (
        "reduction",
        re.compile(
            r"reduce|aten::(sum|mean|norm|max|min|amax|amin|argmax|argmin|topk|cumsum"
            r"|var|std|logsumexp|softmax|log_softmax)",
            re.I,
        ),
    ),
    (
        "elementwise",
        re.compile(
            r"elementwise|vectorized|unrolled|foreach|multi_tensor_apply|aten::(add|sub|mul|div|addcmul|addcdiv|pow"
            r"|sqrt|rsqrt|exp|log|sigmoid|tanh|relu|threshold|neg|where|clamp\w*|lerp|copysign"
            r"|abs|sign|square|reciprocal|mse_loss|binary_cross_entropy\w*|nll_loss\w*"
            r"|native_batch_norm\w*|batch_norm\w*|_foreach\w*)",
            re.I,
        ),
    ),
)

_DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
_LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_NO_PHASE = "(none)"


def categorize(name: str) -> str:
    """The category of a kernel or operator name (``other`` when no rule matches)."""
    for category, pattern in _RULES:
        if pattern.search(name):
            return category
    return "other"


def profile_cell(
    cell: Cell,
    device: torch.device,
    data: DataCache,
    traces: Path,
    window: ProfileWindow,
    dist: Dist | None = None,
) -> Path:
    """Profile ``window.active`` steps of ``cell`` in a separate, untimed pass.

    Args:
        cell: the cell (its config decides model, method, batch size and seed).
        device: where it runs.
        data: the run's data cache.
        traces: the run's ``traces`` directory; the cell writes ``traces/<cell-id>/``.
        window: the schedule.
        dist: the process group of a data-parallel run: every rank writes its own trace, worker
            ``<cell-id>.rank<R>`` (one TensorBoard worker per rank); Kineto records the rank,
            world size and backend in the trace's ``distributedInfo``.

    Returns:
        The Chrome-trace JSON file written for the cell.
    """
    p = prepare_cell(cell, device, data, dist)
    steps = window.steps
    subset = p.config.train_eval_size
    config = replace(
        p.config,
        max_steps=steps,
        max_seconds=None,
        eval_every=steps,
        log_every=steps,
        train_eval_size=256 if subset is None else min(subset, 256),
    )
    out = traces / cell.id
    out.mkdir(parents=True, exist_ok=True)
    worker = cell.id if dist is None else f"{cell.id}.rank{dist.rank}"
    before = set(out.glob(f"{worker}.*.pt.trace.json"))
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(
        activities=activities,
        schedule=schedule(wait=window.wait, warmup=window.warmup, active=window.active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(out), worker_name=worker),
    ) as prof:
        train(
            p.problem,
            p.method,
            p.splits,
            config,
            metric=p.workload.metric,
            reached=lambda value: False,
            on_step=lambda step: prof.step(),
            dist=dist,
        )
    written = sorted(
        set(out.glob(f"{worker}.*.pt.trace.json")) - before, key=lambda f: f.stat().st_mtime
    )
    if not written:
        raise KfacbenchError(f"the profiler wrote no trace for cell {cell.id} under {out}")
    return written[-1]


def _phase_of(starts: Sequence[float], spans: Sequence[tuple[float, float, str]], t: float) -> str:
    """The phase whose span contains time ``t`` (spans sorted by start, not overlapping)."""
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and t <= spans[i][1]:
        return spans[i][2]
    return _NO_PHASE


def _self_times(ops: Iterable[Mapping[str, Any]]) -> list[tuple[Mapping[str, Any], float]]:
    """(op, self time in µs): the op's duration minus its direct children's, per thread."""
    by_tid: dict[Any, list[Mapping[str, Any]]] = defaultdict(list)
    for e in ops:
        by_tid[e.get("tid")].append(e)
    out: list[tuple[Mapping[str, Any], float]] = []
    for events in by_tid.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [event, end, children's time]
        for e in events:
            end = e["ts"] + e["dur"]
            while stack and e["ts"] >= stack[-1][1]:
                done = stack.pop()
                out.append((done[0], done[0]["dur"] - done[2]))
            if stack:
                stack[-1][2] += e["dur"]
            stack.append([e, end, 0.0])
        out += [(item[0], item[0]["dur"] - item[2]) for item in stack]
    return out


def kernel_rows(trace: Path, cell_id: str) -> list[dict[str, Any]]:
    """Rows of the ``kernels`` table from one Chrome-trace JSON (see the module docstring)."""
    try:
        events = json.loads(trace.read_text())["traceEvents"]
    except (OSError, ValueError, KeyError) as exc:
        raise KfacbenchError(f"cannot read the profiler trace {trace}: {exc}") from None
    spans_x = [e for e in events if e.get("ph") == "X" and "dur" in e]
    # Host ranges only: on CUDA, Kineto also emits each step as a GPU-side annotation.
    steps = [
        e
        for e in spans_x
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("ProfilerStep#")
    ]
    step_us = sum(e["dur"] for e in steps)
    if not steps or step_us <= 0:
        raise KfacbenchError(f"the trace {trace} holds no profiled steps (ProfilerStep# ranges)")
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"], str(e["name"])[len(ANNOTATION_PREFIX) :])
        for e in spans_x
        if e.get("cat") == "user_annotation"
        and str(e.get("name", "")).startswith(ANNOTATION_PREFIX)
        and e["name"] != ANNOTATION_PREFIX + STEP
    )
    starts = [s[0] for s in spans]
    phase_us: dict[str, float] = defaultdict(float)
    for start, end, name in spans:
        phase_us[name] += end - start
    phase_us[_NO_PHASE] = max(0.0, step_us - sum(phase_us.values()))
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    kernels = [e for e in spans_x if e.get("cat") in _DEVICE_CATS]
    if kernels:
        device, filler = "cuda", "(device idle)"
        launch_ts = {
            e["args"]["correlation"]: e["ts"]
            for e in spans_x
            if e.get("cat") in _LAUNCH_CATS and "correlation" in e.get("args", {})
        }
        for k in kernels:
            t = launch_ts.get(k.get("args", {}).get("correlation"), k["ts"])
            acc = totals[(_phase_of(starts, spans, t), str(k["name"]))]
            acc[0] += 1
            acc[1] += k["dur"]
    else:
        device, filler = "cpu", "(outside operators)"
        first, last = min(e["ts"] for e in steps), max(e["ts"] + e["dur"] for e in steps)
        ops = [e for e in spans_x if e.get("cat") == "cpu_op" and first <= e["ts"] <= last]
        for op, self_us in _self_times(ops):
            acc = totals[(_phase_of(starts, spans, op["ts"]), str(op["name"]))]
            acc[0] += 1
            acc[1] += self_us
    used: dict[str, float] = defaultdict(float)
    for (phase, _), (_, us) in totals.items():
        used[phase] += us
    for phase, us in phase_us.items():
        if us - used[phase] > 0:
            totals[(phase, filler)] = [0, us - used[phase]]
    rows = []
    for (phase, name), (calls, us) in totals.items():
        rows.append(
            {
                "cell_id": cell_id,
                "device": device,
                "phase": phase,
                "kernel": name,
                "category": "other" if name == filler else categorize(name),
                "calls": int(calls),
                "total_ms": us / 1e3,
                "mean_ms": us / 1e3 / calls if calls else float("nan"),
                "share": us / step_us,
            }
        )
    return rows


def kernels_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """The ``kernels`` table from rows, in :data:`KERNEL_COLUMNS` order, largest first per cell."""
    frame = pd.DataFrame(list(rows), columns=list(KERNEL_COLUMNS))
    return frame.sort_values(["cell_id", "total_ms"], ascending=[True, False], ignore_index=True)


def profile_cells(
    cells: Sequence[Cell],
    run_dir: Path,
    options: RunOptions,
    window: ProfileWindow,
    on_cell: Callable[[Cell, str], None] | None = None,
    dist: Dist | None = None,
) -> pd.DataFrame:
    """Profile every cell into ``run_dir/traces`` and write ``run_dir/kernels.parquet``.

    A cell that fails (out of memory, an error in the method) is reported through ``on_cell`` with
    its message and skipped; the others are still profiled. Each cell's rows are kept in
    ``parts/<cell-id>.kernels.parquet``, so the table is rebuilt from every profiled cell of the
    run directory, including earlier invocations, and a cell profiled before is not profiled
    again. In a data-parallel run every rank profiles (and writes a trace); the kernels table
    comes from rank 0's traces.
    """
    data = DataCache(options)
    parts = run_dir / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    main = dist is None or dist.is_main
    done = {c.id for c in cells if (parts / f"{c.id}.kernels.parquet").exists()} if main else set()
    if dist is not None:
        done = broadcast_object(done, dist)
    for cell in cells:
        if cell.id in done:
            continue  # profiled by an earlier, interrupted invocation (--resume)
        try:
            device = resolve_device(options.device or cell.settings.device)
            if dist is not None:
                device = dist_device(device, dist)
            trace = profile_cell(cell, device, data, run_dir / "traces", window, dist)
            if not main:
                continue
            meta = {"label": cell.label, "workload": cell.workload, "optimizer": cell.optimizer}
            rows = [row | meta for row in kernel_rows(trace, cell.id)]
            atomic_write_parquet(parts / f"{cell.id}.kernels.parquet", kernels_frame(rows))
            message = f"ok: {trace.relative_to(run_dir)}"
        except (KfacbenchError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
            message = f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        if on_cell is not None:
            on_cell(cell, message)
    if not main:
        return kernels_frame([])
    frames = [pd.read_parquet(f) for f in sorted(parts.glob("*.kernels.parquet"))]
    table = pd.concat(frames, ignore_index=True) if frames else kernels_frame([])
    atomic_write_parquet(run_dir / "kernels.parquet", table)
    return table


def top_kernels(kernels: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` kernels by time per optimizer and phase (summed over the optimizer's cells;
    ``share`` is their mean share of a cell's profiled steps)."""
    grouped = (
        kernels.groupby(["optimizer", "phase", "kernel", "category"], as_index=False)
        .agg(calls=("calls", "sum"), total_ms=("total_ms", "sum"), share=("share", "mean"))
        .sort_values(["optimizer", "phase", "total_ms"], ascending=[True, True, False])
    )
    return grouped.groupby(["optimizer", "phase"], sort=False).head(top).reset_index(drop=True)
