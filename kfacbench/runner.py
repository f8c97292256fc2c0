"""Runs the cells of a suite: build, train, record; resume; progress; failures isolated per cell.

A cell that diverges, runs out of memory (device or host) or raises is recorded with status
``diverged``, ``oom`` (with the size that did not fit) or ``error`` (with its message) and the
suite goes on. An interrupted run (Ctrl-C, a killed process) keeps every finished cell;
``kfacbench run --resume`` reruns only the rest.

Size: run_cells (about 150 lines) drives resume, progress, failures and the ranks of a data-parallel
run around the build, train and record steps of one cell, which are beside it.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import math
import sysconfig
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from kfacbench.core import subnormals
from kfacbench.core.compiling import fresh_caches, load_compiler, phase_column
from kfacbench.core.device import dist_device, is_oom, resolve_device
from kfacbench.core.loop import LoopConfig, TrainResult, train
from kfacbench.core.memory import memory_columns
from kfacbench.core.opcount import PROBE_STEPS, PhaseOps, count_steps, phase_ops
from kfacbench.core.problem import Problem
from kfacbench.core.timing import STEP
from kfacbench.data import Splits
from kfacbench.distributed import Dist, any_rank, broadcast_object, local_peer_pids
from kfacbench.errors import KfacbenchError
from kfacbench.launch import DIST_DIR, write_json
from kfacbench.machine_load import LoadMonitor, LoadRecord
from kfacbench.optim import Method, MethodContext, get_method
from kfacbench.runs.environment import environment, gemm_gflops
from kfacbench.runs.store import RunStore, dumps
from kfacbench.suite import Cell
from kfacbench.workloads import Workload, get_workload

CPU = torch.device("cpu")


@dataclass(frozen=True)
class RunOptions:
    """Run-wide settings from the command line.

    Attributes:
        device: overrides every cell's ``device`` setting when given.
        data_dir: where real data files are looked for (besides ``$KFACBENCH_DATA``).
        cache_dir: where generated data (CURVES, FACES) is cached.
    """

    device: str | None = None
    data_dir: Path | None = None
    cache_dir: Path | None = None


class DataCache:
    """Keeps the last workload's data on its device, so consecutive cells share one copy."""

    def __init__(self, options: RunOptions) -> None:
        self.options = options
        self._key: tuple[str, str, str] | None = None
        self._data: Splits | None = None

    def get(self, workload: str, mode: str, device: torch.device) -> Splits:
        """The splits of ``workload`` in ``mode`` on ``device``."""
        key = (workload, mode, str(device))
        if key != self._key or self._data is None:
            self._data = None  # free the previous workload's tensors first
            host = get_workload(workload).load_data(
                mode,  # type: ignore[arg-type]
                self.options.data_dir,
                self.options.cache_dir,
            )
            self._data = to_device(host, device)
            self._key = key
        return self._data


def to_device(data: Splits, device: torch.device) -> Splits:
    """Move splits to ``device``, keeping autoencoder targets aliased to the inputs."""
    train_x, test_x = data.train_x.to(device), data.test_x.to(device)
    train_y = train_x if data.train_y is data.train_x else data.train_y.to(device)
    test_y = test_x if data.test_y is data.test_x else data.test_y.to(device)
    return Splits(train_x, train_y, test_x, test_y, data.source)


@dataclass
class PreparedCell:
    """Everything a cell's training run needs, built from its config (:func:`prepare_cell`)."""

    workload: Workload
    problem: Problem
    method: Method
    splits: Splits
    config: LoopConfig


def prepare_cell(
    cell: Cell, device: torch.device, data: DataCache, dist: Dist | None = None
) -> PreparedCell:
    """Build a cell's model (seeded), method and data on ``device``; shared by the timed run and
    the profiling pass, so both run exactly the same thing. In a data-parallel run the model is
    wrapped in DistributedDataParallel (every rank built the same seeded model)."""
    settings = cell.settings
    if settings.amp == "fp16":
        raise KfacbenchError(
            "amp = 'fp16' needs loss scaling, which kfacbench does not do; use bf16"
        )
    if settings.compile != "off":
        if dist is not None:
            raise KfacbenchError(
                f"compile = {settings.compile!r} is not supported in data-parallel runs"
                " (compiled regions and DDP's gradient hooks are not measured together yet);"
                " use compile = 'off' with --nproc"
            )
        fresh_caches()
    if settings.cuda_graph and (
        dist is not None or settings.compile != "off" or settings.amp != "off"
    ):
        raise KfacbenchError(
            "cuda_graph = true replays eager steps from CUDA graphs: it needs compile = 'off',"
            " amp = 'off' (autocast's weight cache does not survive a capture) and one process"
            " (not --nproc)"
        )
    workload = get_workload(cell.workload)
    spec = get_method(cell.optimizer)
    if device.type == "cuda":
        # The phase timer records its events on the current device's stream: make it this one
        # (a plain "cuda" is the current device already; set_device refuses it).
        if device.index is not None:
            torch.cuda.set_device(device.index)
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    splits = data.get(cell.workload, settings.data, device)
    torch.manual_seed(cell.seed)
    model = workload.build_model(torch.Generator().manual_seed(cell.seed)).to(device)
    wrapped = None
    if dist is not None:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    problem = Problem(model, workload.distribution, settings.amp, wrapped)  # type: ignore[arg-type]
    hparams: dict[str, Any] = dict(cell.hparams)
    if spec.uses_inv_interval:
        hparams["inv_interval"] = cell.inv_interval
    context = MethodContext(
        settings.max_steps,
        cell.seed,
        device,
        dist,
        settings.compile,  # type: ignore[arg-type]
        settings.cuda_graph,
    )
    method = spec.build(problem, hparams, context)
    if settings.compile != "off" and not method.supports("compiled_phases"):
        raise KfacbenchError(
            f"optimizer {cell.optimizer!r} has no compiled regions; compile ="
            f" {settings.compile!r} applies to SGD, K-FAC and SKFAC (set compile = 'off' for it)"
        )
    if settings.cuda_graph and not method.supports("graph_key"):
        raise KfacbenchError(
            f"optimizer {cell.optimizer!r} has no steps a CUDA graph may replay; cuda_graph ="
            " true applies to SGD, K-FAC and SKFAC (set cuda_graph = false for it)"
        )
    config = LoopConfig(
        batch_size=cell.batch_size,
        seed=cell.seed,
        max_steps=settings.max_steps,
        max_seconds=settings.max_seconds,
        eval_every=settings.eval_every,
        log_every=settings.log_every,
        train_eval_size=settings.train_eval_size,
        eval_size=settings.eval_size,
        diverge_factor=settings.diverge_factor,
        stop_at_target=settings.stop_at_target,
        cuda_graph=settings.cuda_graph,
    )
    return PreparedCell(workload, problem, method, splits, config)


@dataclass
class CellOutcome:
    """What training one cell gave (:func:`run_cell`).

    Attributes:
        result: the loop's result.
        data_source: where the data came from (the ``data_source`` column).
        method_info: the method's description of itself (the ``method_info`` column), with
            its state's bytes by kind (``state_bytes``) when it says what it holds.
        state: the bytes of the method's state by kind after training
            (:meth:`~kfacbench.core.method.Method.state_bytes`; empty: unknown).
        flush_denormal: whether subnormal floats were flushed on every CPU thread of every
            process that trained it (measured after training: :mod:`kfacbench.core.subnormals`).
        build_s: seconds building the cell (data on the device, model, method).
    """

    result: TrainResult
    data_source: str
    method_info: dict[str, Any]
    state: dict[str, int]
    flush_denormal: bool
    build_s: float


def run_cell(
    cell: Cell,
    device: torch.device,
    data: DataCache,
    on_progress: Callable[[int], None] | None = None,
    dist: Dist | None = None,
    monitor: LoadMonitor | None = None,
) -> CellOutcome:
    """Build and train one cell.

    ``monitor`` spans the training (not the build): the machine's load while the cell was timed.
    """
    started = time.perf_counter()
    p = prepare_cell(cell, device, data, dist)
    build_s = time.perf_counter() - started
    real = cell.settings.data == "real"
    with monitor if monitor is not None else nullcontext():
        result = train(
            p.problem,
            p.method,
            p.splits,
            p.config,
            metric=p.workload.metric,
            # Targets are values on the real data; synthetic data has no time-to-target.
            reached=p.workload.reached if real else (lambda value: False),
            on_progress=on_progress,
            dist=dist,
        )
    state = p.method.state_bytes()  # after training: state is allocated at the first steps
    info = p.method.info() | ({"state_bytes": state} if state else {})
    flushed = subnormals.flushing()
    if dist is not None:
        flushed = not any_rank(not flushed, device)
    return CellOutcome(result, p.splits.source, info, state, flushed, build_s)


def cell_row(
    cell: Cell,
    env: dict[str, Any],
    started: str,
    *,
    result: TrainResult | None = None,
    data_source: str = "",
    method_info: dict[str, Any] | None = None,
    state: dict[str, int] | None = None,
    status: str = "ok",
    error: str = "",
    load: LoadRecord | None = None,
    flush_denormal: bool | None = None,
    build_s: float = math.nan,
    ops_probe_s: float = math.nan,
    wall_s: float = math.nan,
) -> dict[str, Any]:
    """The ``cells`` table row of a finished (or failed) cell; ``state`` the bytes of its
    method's state (rank 0's in a data-parallel run), ``load`` the machine's load while it
    trained (not measured when it failed before), ``flush_denormal`` whether subnormal
    floats were flushed while it trained (by default: in this process now), ``build_s``,
    ``ops_probe_s`` and ``wall_s`` the seconds building it, counting its ops (:func:`probe_ops`;
    0 when it was not counted) and in all (building, training, compiling, evaluating,
    counting)."""
    load = load or LoadRecord.not_measured("not measured (the cell did not train)")
    workload = get_workload(cell.workload)
    step = next((s for s in result.phases if s.phase == STEP), None) if result else None
    median_step = step.median_ms if step else math.nan
    overhead = result.timer_overhead_ms if result else math.nan
    final = result.final if result else {}
    return {
        "cell_id": cell.id,
        "suite": cell.suite,
        "label": cell.label,
        "workload": cell.workload,
        "optimizer": cell.optimizer,
        "batch_size": cell.batch_size,
        "inv_interval": cell.inv_interval,
        "seed": cell.seed,
        "hparams": dumps(dict(cell.hparams)),
        "config": dumps(cell.config()),
        "method_info": dumps(method_info or {}),
        "data_mode": cell.settings.data,
        "data_source": data_source,
        "status": result.status if result else status,
        "error": result.reason if result else error,
        "steps": result.steps if result else 0,
        "train_time_s": result.train_time_s if result else math.nan,
        "time_to_target_s": (
            result.time_to_target_s if result and result.time_to_target_s is not None else math.nan
        ),
        "time_to_target_lo_s": (
            result.time_to_target_lo_s
            if result and result.time_to_target_lo_s is not None
            else math.nan
        ),
        "metric": workload.metric,
        "target": workload.target,
        "final_train_loss": final.get("final_train_loss", math.nan),
        "final_eval_loss": final.get("final_eval_loss", math.nan),
        "final_eval_metric": final.get("final_eval_metric", math.nan),
        "median_step_ms": median_step,
        "timer_overhead_ms": overhead,
        "timer_overhead_ratio": overhead / median_step if median_step else math.nan,
        **memory_columns(result, state or {}, status, error),
        **load.as_row(),
        "device_kind": env["device_kind"],
        "device_name": env["device_name"],
        "world_size": env.get("world_size", 1),
        "backend": env.get("backend"),
        "flush_denormal": (subnormals.flushing() if flush_denormal is None else flush_denormal),
        "tf32": cell.settings.tf32,
        "cudnn_benchmark": cell.settings.cudnn_benchmark and env["device_kind"] == "cuda",
        "amp": cell.settings.amp,
        "compile": cell.settings.compile,
        "compile_s": result.compile_s if result else math.nan,
        "cuda_graph": cell.settings.cuda_graph and env["device_kind"] == "cuda",
        "graphed_steps": result.graphed_steps if result else 0,
        "graphs_captured": result.graphs_captured if result else 0,
        "build_s": build_s,
        "eval_s": result.eval_s if result else math.nan,
        "ops_probe_s": ops_probe_s,
        "wall_s": wall_s,
        "torch_version": env["torch_version"],
        "kfacbench_version": env["kfacbench_version"],
        "git_commit": env["git_commit"],
        "host": env["host"],
        "started_at": started,
        "finished_at": now(),
    }


def phase_rows(result: TrainResult, ops: dict[str, PhaseOps] | None = None) -> list[dict[str, Any]]:
    """The ``phases`` table rows of a cell: its phase statistics, whether each phase ran
    compiled (``all``, ``part`` or ``no``) and its op counts (:func:`probe_ops`; NaN where not
    counted)."""
    ops = ops or {}
    missing = PhaseOps(math.nan, math.nan)
    return [
        {
            **vars(p),
            "compiled": phase_column(result.compiled, p.phase),
            **vars(ops.get(p.phase, missing)),
        }
        for p in result.phases
    ]


def counts_ops(cell: Cell, dist: Dist | None) -> bool:
    """Whether the runner counts the cell's ops: its ``count_ops`` setting, in a single-process
    eager cell. A data-parallel probe would need every rank in step (and its collectives are no
    local launches); a compiled cell's launches are inductor's fused kernels, which the counter
    does not see."""
    return cell.settings.count_ops and dist is None and cell.settings.compile == "off"


def probe_ops(cell: Cell, device: torch.device, data: DataCache, steps: int) -> dict[str, PhaseOps]:
    """The ops each phase of ``cell`` launches per step, counted on ``steps`` untimed probe steps
    (:mod:`kfacbench.core.opcount`).

    Counting costs a Python call per op, so it runs after the timed run, on a fresh copy of the
    cell built from its config as the profiler's pass is (:func:`prepare_cell`: the same seeded
    model, method and minibatches). The timed run's model, method state and random streams are
    never touched, and its curves, phase times, final losses and peak memory were recorded
    before the copy exists: the probe cannot change a result, only add the op columns. Counting
    on the trained state instead would save the build but not say which steps refresh: a fresh
    copy starts with a refresh (K-FAC: steps 0-2, SKFAC: step 0), so the probe sees both kinds.
    The caller passes at most as many steps as the timed run took: the probe replays steps the
    cell ran, never ones it did not reach (a diverging cell's).
    """
    gc.collect()  # the timed run's capture hooks form cycles that keep its model alive
    p = prepare_cell(cell, device, data)
    return phase_ops(count_steps(p.method, p.splits, p.config, steps))


def record_failure(
    cell: Cell, store: RunStore, status: str, message: str, started: str | None = None
) -> None:
    """Write the row of a cell that failed outside this process (a distributed job that a rank
    took down, a cluster job that died) with the run's environment from ``env.json``."""
    env_file = store.run_dir / "env.json"
    env = json.loads(env_file.read_text()) if env_file.exists() else environment(CPU)
    store.write_cell(cell_row(cell, env, started or now(), status=status, error=message), [], [])


def now() -> str:
    """UTC timestamp, ISO format to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def release_cuda(device: torch.device) -> str:
    """Free what a failed CUDA cell left (after its frames are gone, so after the handler);
    return why the CUDA context cannot be used again (a device-side assert poisons it for the
    whole process), or ``""``."""
    gc.collect()
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    except RuntimeError as exc:
        return one_line(exc)
    return ""


_SOURCE_ROOT = str(Path(__file__).resolve().parent.parent) + "/"
_SITE_PACKAGES = str(Path(sysconfig.get_paths()["purelib"]).resolve()) + "/"


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (the ``error`` column), with the machine's folders left out
    of the paths it names (``kfacbench/optim/sgd.py``, ``site-packages/torch/...``): torch's
    errors quote stack traces, and a published table must not say where someone's files were."""
    text = " ".join(str(exc).split())
    # site-packages first: a virtual environment often lies inside the source tree.
    text = text.replace(_SITE_PACKAGES, "site-packages/").replace(_SOURCE_ROOT, "")
    return text if isinstance(exc, KfacbenchError) else f"{type(exc).__name__}: {text}"


def _store_cell(
    store: RunStore,
    cell: Cell,
    row: dict[str, Any],
    curves: list[dict[str, Any]],
    phases: list[dict[str, Any]],
    env: dict[str, Any],
    console: Console,
) -> dict[str, Any]:
    """Write a cell's results; if they cannot be written, record the cell as ``error`` with the
    reason instead (its partial parts removed), so one cell never ends the suite. Returns the
    row stored."""
    try:
        store.write_cell(row, curves, phases)
        return row
    except Exception as exc:
        message = f"could not store the results: {one_line(exc)}"
        store.write_text(f"errors/{row['cell_id']}.txt", traceback.format_exc())
    failed = cell_row(cell, env, str(row["started_at"]), status="error", error=message)
    try:
        store.write_cell(failed, [], [])
    except Exception as exc:  # not even the failure row: leave the cell for --resume
        console.print(f"[red]{escape(str(row['label']))}: {escape(message)}; {one_line(exc)}")
    return failed


def run_cells(
    cells: Sequence[Cell],
    store: RunStore,
    options: RunOptions,
    console: Console | None = None,
    dist: Dist | None = None,
    *,
    other_writers: bool = False,
) -> list[dict[str, Any]]:
    """Run every cell not yet finished in ``store``; return the rows of the cells run now.

    ``other_writers``: other processes write into the same run directory at the same time
    (cluster jobs, one per cell): the temporary files in it may be theirs, live, so they are left
    alone (the launcher removed the stale ones before submitting).

    In a data-parallel run (``dist``) every rank calls this with the same cells: they train each
    cell together, rank 0 decides which cells are left, shows progress and writes the results.
    A cell that raises on a rank is reported in ``dist/failure.rank<R>.json`` and the exception
    ends the worker (torchrun then stops the others, and the launcher records the cell).

    Raises:
        KfacbenchError: a run-wide problem (e.g. CUDA requested but absent).
    """
    main = dist is None or dist.is_main
    console = console or Console(stderr=True, quiet=not main)
    if main:
        if not other_writers:
            store.remove_stale_files()

        def rerun(cell_id: str, message: str) -> None:
            console.print(
                f"[yellow]cell {cell_id}: its stored results are damaged[/]; set aside in"
                f" {store.parts / 'damaged'}, the cell runs again"
            )

        if store.reconcile(rerun):  # a kill while the tables were written: rows come back
            console.print(f"rebuilt the tables of {store.run_dir} from its parts/")
    done = store.finished_ids() if main else set()
    if dist is not None:
        done = broadcast_object(done, dist)
    todo = [c for c in cells if c.id not in done]
    if len(todo) < len(cells):
        console.print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already done")
    devices = {c.id: resolve_device(options.device or c.settings.device) for c in todo}
    if dist is not None:
        devices = {i: dist_device(d, dist) for i, d in devices.items()}
    envs: dict[str, dict[str, Any]] = {}
    for dev in {str(d) for d in devices.values()}:
        envs[dev] = environment(torch.device(dev))
        if dist is not None:
            envs[dev].update(world_size=dist.world, backend=dist.backend)
    if todo and main:  # off the clock, before the cells: what their GFLOP/s are held against
        for dev, env in envs.items():
            env["gemm_gflops"] = gemm_gflops(torch.device(dev))
    if envs and main:
        first = next(iter(envs.values()))
        store.write_text("env.json", json.dumps(first, indent=2) + "\n")
        if todo and subnormals.wanted() != first["flush_denormal"]:
            console.print(f"[yellow]warning:[/] {subnormals.mismatch()}")
    data = DataCache(options)
    if todo:
        load_compiler()
        # What the process holds now (torch's modules above all) lives as long as it does: out of
        # the collector's sight, the full collection before each cell takes ms instead of 0.15 s.
        gc.freeze()
    peers = local_peer_pids(dist) if dist is not None else ()  # ranks here are this run's work
    rows: list[dict[str, Any]] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        overall = progress.add_task("cells", total=len(cells), completed=len(cells) - len(todo))
        for cell in todo:
            device = devices[cell.id]
            env = envs[str(device)]
            steps_task = progress.add_task(f"  {cell.label}", total=cell.settings.max_steps)
            started = now()

            def show_steps(step: int, task: TaskID = steps_task) -> None:
                progress.update(task, completed=step)

            if dist is not None and main:
                write_json(
                    store.run_dir / DIST_DIR / "current.json",
                    {"cell_id": cell.id, "started_at": started},
                )
            # The capture hooks of the previous cell's method form reference cycles that keep its
            # model and gradients alive (device memory, and a peak that is not this cell's).
            gc.collect()
            # Inductor compiles in worker processes of its own: their CPU time is this cell's.
            monitor = LoadMonitor(peer_pids=peers, include_children=cell.settings.compile != "off")
            lost = ""
            clock = time.perf_counter()
            try:
                outcome = run_cell(
                    cell, device, data, on_progress=show_steps, dist=dist, monitor=monitor
                )
                ops: dict[str, PhaseOps] = {}
                probe_s = 0.0
                if counts_ops(cell, dist):
                    probe_started = time.perf_counter()
                    try:
                        steps = min(PROBE_STEPS, outcome.result.steps)
                        ops = probe_ops(cell, device, data, steps)
                    except Exception as exc:  # the timed results stand without the counts
                        console.print(
                            f"[yellow]{escape(cell.label)}: ops not counted[/]"
                            f" ({escape(one_line(exc))})"
                        )
                    probe_s = time.perf_counter() - probe_started
                row = cell_row(
                    cell,
                    env,
                    started,
                    result=outcome.result,
                    data_source=outcome.data_source,
                    method_info=outcome.method_info,
                    state=outcome.state,
                    load=monitor.record,
                    flush_denormal=outcome.flush_denormal,
                    build_s=outcome.build_s,
                    ops_probe_s=probe_s,
                    wall_s=time.perf_counter() - clock,
                )
                curves, phases = outcome.result.curves, phase_rows(outcome.result, ops)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one cell's failure must not end the suite
                status = "oom" if is_oom(exc) else "error"
                if dist is not None:  # the other ranks cannot go on without this one
                    report = {"cell_id": cell.id, "rank": dist.rank, "status": status}
                    report["error"] = one_line(exc)
                    write_json(store.run_dir / DIST_DIR / f"failure.rank{dist.rank}.json", report)
                    raise
                row = cell_row(cell, env, started, status=status, error=one_line(exc))
                curves, phases = [], []
                if status == "error" and not isinstance(exc, KfacbenchError):
                    store.write_text(f"errors/{cell.id}.txt", traceback.format_exc())
            if row["status"] != "ok" and device.type == "cuda":
                lost = release_cuda(device)
            if main:
                row = _store_cell(store, cell, row, curves, phases, env, console)
            rows.append(row)
            if lost:
                left = len(todo) - len(rows)
                raise KfacbenchError(
                    f"the CUDA context is unusable after cell {cell.id} ({lost}); its row and"
                    f" every finished cell are stored, the {left} cells left need a new process:"
                    " rerun the same command with --resume"
                )
            progress.remove_task(steps_task)
            progress.advance(overall)
            if row["status"] != "ok":
                console.print(f"[yellow]{cell.label}: {row['status']}[/] {escape(row['error'])}")
    return rows
