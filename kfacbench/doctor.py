"""``kfacbench doctor``: a short acceptance of a machine before its minutes go to measuring.

GPU time often comes in short windows, and a benchmark's first run on a new machine is where the
CUDA-only paths meet reality: the event timer, the "no host sync per step" claim, peak memory,
bf16 and TF32, the attribution of kernels to phases, the process group. The doctor runs each of
them for a few steps on synthetic data and reports pass / fail / skipped with the reason, so a
broken path costs a minute instead of a suite.

Checks, in order (:func:`plan`):

- ``environment``: versions, device, threads; every kfacbench module imports; after a training
  step every CPU thread flushes subnormal floats (:mod:`kfacbench.core.subnormals`).
- ``methods``: every registered method (peers where installed) × an MLP autoencoder (CURVES,
  Bernoulli) and ResNet-20 (CIFAR-10 shapes, categorical): a few steps on one fixed batch, every
  loss finite and the last below the first. A method that does not apply to a model (the
  block-tridiagonal inverse on a conv net) or whose package is missing is skipped with the
  builder's one-line reason.
- ``linalg``: the damped-inverse methods (eigh, Cholesky, inv, Newton-Schulz) timed and checked
  at the factor sizes and batch shapes of every workload's refresh, float32 and float64, within
  :data:`LINALG_BUDGET_S` (:mod:`kfacbench.optim.linalg_probe`); its rows are ``linalg.parquet``
  and the check names the build and flags an ``eigh`` ≥ 10× slower than Cholesky.
- ``profile``: one profiled step window of K-FAC whose kernels table has rows in forward,
  backward, curvature, inverse and precondition.
- ``memory``: K-FAC's optimizer state, recorded after a few steps on any device, is what the
  shape model predicts (:mod:`kfacbench.optim.memory`: factors, the damped inverses in their
  size buckets, padded on CUDA, and the momentum).
- ``cuda`` (skipped on CPU): no host synchronisation inside non-refresh steps
  (``torch.cuda.set_sync_debug_mode("error")``), CUDA-event step times against wall-clock over a
  block of steps, peak memory recorded by the loop, a bf16-autocast and a TF32 cell.
- ``distributed``: ``kfacbench run --nproc N`` on a tiny cell through torchrun (gloo with 2
  processes on CPU; nccl with one process per GPU, at most 2).

Size: the Doctor class is the acceptance list, about 360 lines of short checks in six groups; split
by group the list would no longer read as one.
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import math
import os
import pkgutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch

import kfacbench
from kfacbench.core import subnormals
from kfacbench.core.device import synchronize
from kfacbench.core.loop import TrainResult
from kfacbench.core.timing import STEP, PhaseTimer
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS
from kfacbench.optim.capture import find_layers
from kfacbench.optim.flops import layer_shapes
from kfacbench.optim.inverses import bucket_ratio
from kfacbench.optim.linalg_probe import (
    Shape,
    build_name,
    fastest,
    probe,
    refresh_shapes,
    slow_eigh,
)
from kfacbench.optim.memory import kfac_state_bytes
from kfacbench.profiling import kernel_rows, profile_cell
from kfacbench.runner import (
    DataCache,
    PreparedCell,
    RunOptions,
    one_line,
    prepare_cell,
    run_cell,
)
from kfacbench.runs.environment import environment
from kfacbench.runs.store import atomic_write_parquet
from kfacbench.suite import Cell, ProfileWindow, parse_suite
from kfacbench.workloads import WORKLOADS

Status = Literal["pass", "fail", "skipped"]

AUTOENCODER = "curves_ae"
"""The MLP autoencoder of the method checks: CURVES' 784-400-200-100-50-25-6 (Bernoulli)."""
RESNET = "cifar10_resnet20"
"""The conv net of the method checks: ResNet-20 on CIFAR-10 shapes (categorical)."""
STEPS = {AUTOENCODER: 8, RESNET: 5}
"""Steps per method check: enough for the first inverse refreshes and a falling loss."""
HPARAMS: dict[tuple[str, str], dict[str, Any]] = {
    (AUTOENCODER, "skfac"): {"damping": 1.0},
    (AUTOENCODER, "skfac-subsample"): {"damping": 1.0},
    (AUTOENCODER, "asdl-skfac"): {"damping": 1.0, "lr": 0.01},
    (RESNET, "skfac"): {"damping": 0.3},
    (RESNET, "skfac-subsample"): {"damping": 0.3},
}
"""Overrides of the method checks, the values the suites run (quick.toml, peers.toml,
reproduction_cpu.toml). With SKFAC's defaults (λ = 0.03, lr 0.1) the first steps on one fixed
batch overshoot: an autoencoder's loss is summed over 784 Bernoulli pixels, and on ResNet-20 the
rank-m factors leave most directions to λ alone (the loss rose within 5 steps at batch 16–64)."""
NO_SYNC_HPARAMS: dict[str, dict[str, Any]] = {
    "kfac": {"gamma_interval": 2},
    "kfac-tridiag": {"gamma_interval": 1000},
}
"""Overrides of the no-sync check: block-diagonal K-FAC searches γ every 2 steps (its candidates
reuse the refresh's eigendecompositions, so no sync); the tridiagonal inverse factorises each
candidate anew (``eigh`` has no error-code variant), a refresh's work, so its search is out of
the window."""
INV_INTERVAL = 3
"""T_inv of the method checks, so that refresh and non-refresh steps both run."""
PHASES = ("forward", "backward", "curvature", "inverse", "precondition")
"""Phases a profiled K-FAC step must attribute kernels to."""
EVENT_TOLERANCE = 0.05
"""Largest relative gap between the CUDA-event step times and wall-clock over a block of steps."""
LINALG_BUDGET_S = 30.0
"""Wall-clock budget of the linear-algebra probe (the largest shapes are cut first)."""
DIST_TIMEOUT_S = 240.0
"""How long the torchrun check may take before it counts as hung."""


@dataclass(frozen=True)
class CheckResult:
    """One row of the doctor's table.

    Attributes:
        group: ``environment``, ``methods``, ``profile``, ``cuda`` or ``distributed``.
        check: what was checked (for methods: ``<method> × <workload>``).
        status: ``pass``, ``fail`` or ``skipped``.
        detail: the measured values, the reason for a skip, or the one-line failure.
        seconds: wall-clock time the check took.
    """

    group: str
    check: str
    status: Status
    detail: str
    seconds: float


class Skip(Exception):
    """Raised inside a check that does not apply here; the message says why."""


class Failed(Exception):
    """Raised inside a check whose result is wrong; the message says what was measured."""


@dataclass(frozen=True)
class Check:
    """A named check: ``run()`` returns the detail of a pass, or raises :class:`Skip` /
    :class:`Failed` (any other exception is a failure too)."""

    group: str
    name: str
    run: Callable[[], str]


def doctor_cell(
    workload: str,
    optimizer: str,
    device: torch.device,
    *,
    batch_size: int,
    steps: int,
    inv_interval: int = INV_INTERVAL,
    hparams: dict[str, Any] | None = None,
    **settings: Any,
) -> Cell:
    """One cell on synthetic data, validated like a suite's (so the doctor runs what users run)."""
    data = {
        "name": "doctor",
        "defaults": {
            "device": str(device),
            "data": "synthetic",
            "max_steps": steps,
            "eval_every": steps,
            "log_every": steps,
            "train_eval_size": 256,
            "eval_size": 256,
            **settings,
        },
        "sweep": {
            "workload": [workload],
            "batch_size": [batch_size],
            "inv_interval": [inv_interval],
            "seed": [0],
        },
        "optimizers": {optimizer: hparams or {}},
    }
    suite = parse_suite(
        data, source="<doctor>", workloads=WORKLOADS, methods=METHODS, name_default="doctor"
    )
    (cell,) = suite.cells
    return cell


class Doctor:
    """Builds and runs the checks for one device; see the module docstring for the list.

    Args:
        device: where the checks run.
        out: folder for the table, the environment and the profiler trace.
        data: the data cache (synthetic data, shared between checks).
        methods: the methods to check (default: every registered one).
    """

    def __init__(
        self, device: torch.device, out: Path, methods: Sequence[str] | None = None
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.out = out
        self.data = DataCache(RunOptions(device=str(device)))
        self.methods = list(methods) if methods is not None else list(METHODS)
        self.batch = {AUTOENCODER: 128 if self.cuda else 64, RESNET: 128 if self.cuda else 32}

    def plan(self) -> list[Check]:
        """Every check, in the order they run."""
        checks = [
            Check("environment", "versions and device", self.versions),
            Check("environment", "kfacbench modules import", imports),
            Check("environment", "subnormal floats flushed", self.subnormals_flushed),
        ]
        for workload in (AUTOENCODER, RESNET):
            checks += [
                Check("methods", f"{m} × {workload}", partial(self.method_falls, m, workload))
                for m in self.methods
            ]
        checks.append(Check("linalg", "damped inverses timed per size bucket", self.linalg))
        checks.append(Check("profile", "kernels attributed to K-FAC's phases", self.kernels))
        checks.append(Check("memory", "K-FAC's state as the shape model predicts", self.state))
        cuda_checks: list[tuple[str, Callable[[], str]]] = [
            ("no host sync in non-refresh steps", self.no_sync),
            ("CUDA-event step times match wall-clock", self.events_match_wall),
            ("peak memory recorded", self.peak_memory),
            ("bf16 autocast cell", self.bf16),
            ("TF32 cell", self.tf32),
        ]
        checks += [Check("cuda", name, self.cuda_only(fn)) for name, fn in cuda_checks]
        checks.append(Check("distributed", self.dist_name(), self.distributed))
        return checks

    def cuda_only(self, fn: Callable[[], str]) -> Callable[[], str]:
        """``fn``, or a skip on a CPU device."""

        def run() -> str:
            if not self.cuda:
                raise Skip(f"device {self.device} is not CUDA")
            return fn()

        return run

    def versions(self) -> str:
        env = environment(self.device)
        parts = [f"torch {env['torch_version']}", f"{env['device_name']}"]
        if self.cuda:
            major, minor = torch.cuda.get_device_capability(self.device)
            parts += [
                f"CUDA {env['cuda_version']}",
                f"driver {env['driver_version']}",
                f"cuDNN {env['cudnn_version']}",
                f"sm_{major}{minor}",
                f"{torch.cuda.device_count()} GPU(s)",
            ]
        parts.append(f"{env['torch_threads']} threads of {env['cpu_count']} CPUs")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
        return ", ".join(parts)

    def prepared(self, cell: Cell) -> PreparedCell:
        """The cell built as ``run`` builds it; a configuration the method rejects is a skip."""
        try:
            return prepare_cell(cell, self.device, self.data)
        except KfacbenchError as exc:
            raise Skip(str(exc)) from None

    def fixed_batch(self, p: PreparedCell, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return p.splits.train_x[:size], p.splits.train_y[:size]

    def method_falls(self, method: str, workload: str) -> str:
        """A few steps on one fixed batch: every loss finite, the last below the first."""
        steps = STEPS[workload]
        cell = doctor_cell(
            workload,
            method,
            self.device,
            batch_size=self.batch[workload],
            steps=steps,
            hparams=HPARAMS.get((workload, method)),
        )
        p = self.prepared(cell)
        x, y = self.fixed_batch(p, cell.batch_size)
        timer = PhaseTimer(self.device)
        losses = []
        for _ in range(steps):
            with timer.step():
                losses.append(p.method.step(x, y, timer))
        values = torch.stack(losses).double().cpu().tolist()
        step_ms = statistics.median(timer.all_durations()[STEP])
        shown = f"loss {values[0]:.4g} → {values[-1]:.4g} in {steps} steps"
        if not all(math.isfinite(v) for v in values):
            bad = next(i for i, v in enumerate(values) if not math.isfinite(v))
            raise Failed(f"non-finite loss at step {bad + 1} ({values[bad]}): {shown}")
        if not values[-1] < values[0]:
            raise Failed(f"loss did not fall: {shown}")
        return f"{shown}; median step {step_ms:.1f} ms"

    def linalg(self) -> str:
        """The probe at every workload's refresh shapes; writes ``linalg.parquet``."""
        rows = probe(workload_shapes(self.device), self.device, budget_s=LINALG_BUDGET_S)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_parquet(self.out / "linalg.parquet", pd.DataFrame(rows))
        measured = [r for r in rows if r.get("status") == "measured"]
        if not measured:
            raise Failed(f"no shape measured in {LINALG_BUDGET_S:.0f} s")
        failed = sorted({f"{r['method']} at {r['size']}" for r in rows if "failed" in r["status"]})
        cut = sorted({r["size"] for r in rows if r["status"] == "budget"})
        shapes = {Shape(r["size"], r["batch"]) for r in measured}
        wins = Counter(fastest(measured, shape, "float32") for shape in shapes)
        wins.pop(None, None)
        parts = [
            build_name(self.device),
            f"{len(shapes)} shapes",
            "fastest agreeing (float32): " + ", ".join(f"{m} {n}×" for m, n in wins.most_common()),
        ]
        parts += slow_eigh(measured)
        if cut:
            parts.append(f"not reached in the budget: n = {', '.join(map(str, cut))}")
        if failed:
            parts.append(f"failed: {', '.join(failed)}")
        return "; ".join(parts)

    def kernels(self) -> str:
        """One profiled window of K-FAC (every step a refresh): the kernels table has rows in each
        of :data:`PHASES`."""
        cell = doctor_cell(
            AUTOENCODER,
            "kfac-fast",
            self.device,
            batch_size=self.batch[AUTOENCODER],
            steps=4,
            inv_interval=1,
        )
        window = ProfileWindow(wait=1, warmup=1, active=2)
        trace = profile_cell(cell, self.device, self.data, self.out / "traces", window)
        rows = kernel_rows(trace, cell.id)
        seen = {row["phase"] for row in rows}
        missing = [phase for phase in PHASES if phase not in seen]
        if missing:
            raise Failed(
                f"no kernels attributed to {', '.join(missing)} (phases seen: "
                f"{', '.join(sorted(seen)) or 'none'}; trace {trace})"
            )
        share = sum(row["share"] for row in rows)
        kind = "kernels" if self.cuda else "operators"
        return f"{len(rows)} rows ({kind}) over {len(seen)} phases, shares sum to {share:.3f}"

    def no_sync(self) -> str:
        """Steps between inverse refreshes make no host synchronisation, for every method of the
        K-FAC and SKFAC families (LM every 5 steps included; γ search: :data:`NO_SYNC_HPARAMS`)."""
        checked = []
        for workload in (AUTOENCODER, RESNET):
            for method in ("sgd", "kfac", "kfac-tridiag", "kfac-fast", "skfac", "skfac-subsample"):
                if method not in self.methods:
                    continue
                cell = doctor_cell(
                    workload,
                    method,
                    self.device,
                    batch_size=self.batch[workload],
                    steps=14,
                    inv_interval=1000,
                    hparams=NO_SYNC_HPARAMS.get(method, {}),
                )
                try:
                    p = prepare_cell(cell, self.device, self.data)
                except KfacbenchError:
                    continue  # not applicable (e.g. tridiag on a conv net): method checks say so
                x, y = self.fixed_batch(p, cell.batch_size)
                timer = PhaseTimer(self.device)
                for _ in range(4):  # the first steps refresh the inverses
                    p.method.step(x, y, timer)
                synchronize(self.device)
                for step in range(4, 14):
                    try:
                        with sync_debug("error"):
                            p.method.step(x, y, timer)
                    except RuntimeError as exc:
                        where = kfacbench_frame(exc)
                        raise Failed(
                            f"{method} × {workload}, step {step + 1}: {one_line(exc)[:160]}"
                            f" (at {where})"
                        ) from None
                timer.flush()
                checked.append(f"{method}×{workload.split('_')[0]}")
        return f"10 steps each, none synchronised: {', '.join(checked)}"

    def events_match_wall(self) -> str:
        """Over a block of steps, the sum of the CUDA-event step times is within
        :data:`EVENT_TOLERANCE` of the wall-clock time (the loop's steps are back to back)."""
        lines = []
        for method in ("sgd", "kfac-fast"):
            cell = doctor_cell(RESNET, method, self.device, batch_size=128, steps=40)
            p = self.prepared(cell)
            x, y = self.fixed_batch(p, cell.batch_size)
            timer = PhaseTimer(self.device)
            for _ in range(5):  # warm-up: cuDNN autotuning, allocator, the first refreshes
                with timer.step():
                    p.method.step(x, y, timer)
            timer.flush()
            before = len(timer.durations(STEP))
            synchronize(self.device)
            t0 = time.perf_counter()
            for _ in range(30):
                with timer.step():
                    p.method.step(x, y, timer)
            synchronize(self.device)
            wall_ms = (time.perf_counter() - t0) * 1e3
            events_ms = sum(timer.all_durations()[STEP][before:])
            gap = abs(events_ms - wall_ms) / wall_ms
            line = f"{method}: events {events_ms:.1f} ms vs wall {wall_ms:.1f} ms ({gap:.1%})"
            if gap > EVENT_TOLERANCE:
                raise Failed(f"{line}, above {EVENT_TOLERANCE:.0%}")
            lines.append(line)
        return "; ".join(lines) + " over 30 ResNet-20 steps"

    def state(self) -> str:
        """kfac-fast's state after a few steps (``state_mb``'s bytes) against the shape model."""
        cell = doctor_cell(
            AUTOENCODER,
            "kfac-fast",
            self.device,
            batch_size=self.batch[AUTOENCODER],
            steps=4,
            hparams={"inverse_method": "cholesky"},  # no linear-algebra probe
        )
        try:
            state = run_cell(cell, self.device, self.data).state
        except KfacbenchError as exc:
            raise Skip(str(exc)) from None
        workload = WORKLOADS[AUTOENCODER]
        model = workload.build_model(torch.Generator().manual_seed(0))
        params = sum(p.numel() for p in model.parameters())
        shapes = layer_shapes(model, workload.input_shape)
        ratio = bucket_ratio(self.device)
        expected = kfac_state_bytes(shapes, params, inverses="damped", bucket_ratio=ratio)
        got = {k: state.get(k, 0) for k in expected}
        if got != expected:
            raise Failed(f"kfac-fast × {AUTOENCODER}: state {got} bytes, the model says {expected}")
        mib = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in got.items())
        return f"kfac-fast × {AUTOENCODER}: {mib} MiB, as the shape model predicts"

    def peak_memory(self) -> str:
        """A cell trained by the loop records its peak device memory."""
        cell = doctor_cell(AUTOENCODER, "kfac", self.device, batch_size=128, steps=10)
        result = self.train(cell)
        if not (math.isfinite(result.peak_mem_mb) and result.peak_mem_mb > 0):
            raise Failed(f"peak_mem_mb is {result.peak_mem_mb}")
        added = result.peak_mem_mb - result.mem_baseline_mb
        if not (math.isfinite(added) and added > 0):
            raise Failed(f"peak {result.peak_mem_mb} MiB, baseline {result.mem_baseline_mb} MiB")
        return (
            f"kfac × {AUTOENCODER}: peak {result.peak_mem_mb:.1f} MiB, of which training added"
            f" {added:.1f} MiB over the {result.mem_baseline_mb:.1f} MiB of data, model and state"
        )

    def bf16(self) -> str:
        """K-FAC with a bf16-autocast forward trains a few steps with finite losses."""
        cell = doctor_cell(AUTOENCODER, "kfac", self.device, batch_size=128, steps=20, amp="bf16")
        return self.finite_cell(cell)

    def tf32(self) -> str:
        """SKFAC on ResNet-20 with TF32 matmuls and convolutions trains with finite losses, as
        the same cell does without TF32 (at the method checks' λ: with SKFAC's default λ = 0.03
        this cell diverges on synthetic labels in full float32 too, which would test nothing)."""
        lines = []
        for tf32 in (False, True):
            cell = doctor_cell(
                RESNET,
                "skfac",
                self.device,
                batch_size=128,
                steps=20,
                hparams=HPARAMS[(RESNET, "skfac")],
                tf32=tf32,
            )
            try:
                lines.append(f"tf32={tf32}: {self.finite_cell(cell)}")
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
        return "; ".join(lines)

    def train(self, cell: Cell) -> TrainResult:
        """The cell trained as ``run`` trains it; a configuration the method rejects is a skip."""
        try:
            return run_cell(cell, self.device, self.data).result
        except KfacbenchError as exc:
            raise Skip(str(exc)) from None

    def finite_cell(self, cell: Cell) -> str:
        result = self.train(cell)
        if result.status != "ok":
            raise Failed(f"{cell.label}: {result.status}: {result.reason}")
        losses = [row["train_loss"] for row in result.curves if math.isfinite(row["train_loss"])]
        return f"{cell.label}: {result.steps} steps, last loss {losses[-1]:.4g}"

    def dist_processes(self) -> int:
        return min(2, torch.cuda.device_count()) if self.cuda else 2

    def dist_name(self) -> str:
        backend = "nccl" if self.cuda else "gloo"
        n = self.dist_processes()
        return f"{backend} group of {n} process{'es' if n > 1 else ''} (kfacbench run --nproc)"

    def distributed(self) -> str:
        """``kfacbench run --nproc N`` on a tiny data-parallel cell, through torchrun."""
        n = self.dist_processes()
        suite = self.out / "dist_suite.toml"
        self.out.mkdir(parents=True, exist_ok=True)
        suite.write_text(
            'name = "doctor_dist"\n[defaults]\ndata = "synthetic"\nmax_steps = 6\n'
            "eval_every = 6\nlog_every = 3\ntrain_eval_size = 256\neval_size = 256\n"
            f'[sweep]\nworkload = "{AUTOENCODER}"\nbatch_size = 64\ninv_interval = 3\n'
            "seed = 0\n[optimizers.kfac-fast]\n"
        )
        command = [sys.executable, "-m", "kfacbench", "run", str(suite), "--nproc", str(n)]
        command += ["--device", str(self.device), "--out", str(self.out / "dist")]
        env = {**os.environ, "PYTHONPATH": pythonpath()}
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=DIST_TIMEOUT_S, env=env
            )
        except subprocess.TimeoutExpired:
            raise Failed(f"no result after {DIST_TIMEOUT_S:.0f} s: {' '.join(command)}") from None
        tables = sorted((self.out / "dist" / "doctor_dist").glob("*/cells.parquet"))
        if done.returncode != 0 or not tables:
            tail = " ".join((done.stderr or done.stdout).split())[-300:]
            raise Failed(f"exit {done.returncode}: {tail}")
        row = pd.read_parquet(tables[-1]).iloc[0]
        if row["status"] != "ok":
            raise Failed(f"cell {row['status']}: {row['error']}")
        if bool(row["flush_denormal"]) != subnormals.wanted():
            raise Failed(f"the workers' cell recorded flush_denormal = {row['flush_denormal']}")
        return (
            f"{row['world_size']} × {row['backend']}: {row['steps']} steps,"
            f" median step {row['median_step_ms']:.1f} ms"
        )

    def subnormals_flushed(self) -> str:
        """A cell built as ``run`` builds it takes a step; then every CPU thread of this process
        flushes subnormal floats (or keeps them, with ``$KFACBENCH_FLUSH_DENORMAL=0``)."""
        cell = doctor_cell(
            AUTOENCODER, "sgd", self.device, batch_size=self.batch[AUTOENCODER], steps=1
        )
        p = self.prepared(cell)
        p.method.step(*self.fixed_batch(p, cell.batch_size), PhaseTimer(self.device))
        want, now = subnormals.wanted(), subnormals.flushing()
        threads = f"{torch.get_num_threads()} CPU threads"
        if now != want:
            raise Failed(subnormals.mismatch())
        where = " (the host's; the GPU handles subnormals at full speed)" if self.cuda else ""
        if not want:
            return f"kept on {threads}{where}: {subnormals.ENV}=0, step times include their stalls"
        return f"flushed on {threads}{where}"


def workload_shapes(device: torch.device) -> list[Shape]:
    """The refresh shapes (size buckets of Ā and G) of every registered workload's model."""
    shapes: set[Shape] = set()
    for workload in WORKLOADS.values():
        layers, _ = find_layers(workload.build_model(torch.Generator().manual_seed(0)))
        sizes = [d for layer in layers for d in (layer.in_dim, layer.out_dim)]
        shapes.update(refresh_shapes(sizes, bucket_ratio(device)))
    return sorted(shapes, key=lambda s: (s.size, s.batch))


def pythonpath() -> str:
    """``PYTHONPATH`` for child processes that must import this kfacbench (a working tree run
    with ``PYTHONPATH=.`` included)."""
    root = str(Path(kfacbench.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (root, rest) if p)


def imports() -> str:
    """Every module of the package imports (optional extras are imported lazily inside;
    ``__main__`` is the command itself, already running)."""
    names = [kfacbench.__name__]
    failed = []
    for info in pkgutil.walk_packages(kfacbench.__path__, prefix=f"{kfacbench.__name__}."):
        if info.name.endswith(".__main__"):
            continue
        names.append(info.name)
        try:
            importlib.import_module(info.name)
        except Exception as exc:
            failed.append(f"{info.name} ({one_line(exc)[:120]})")
    if failed:
        raise Failed(f"cannot import {'; '.join(failed)}")
    return f"{len(names)} modules"


@contextmanager
def sync_debug(mode: Literal["error", "warn"]) -> Iterator[None]:
    """``torch.cuda.set_sync_debug_mode`` for the enclosed block only."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def kfacbench_frame(exc: BaseException) -> str:
    """``file:line in function`` of the innermost kfacbench frame of ``exc``'s traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "kfacbench" in f.filename]
    if not frames:
        return "outside kfacbench"
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"


def run_check(check: Check) -> CheckResult:
    """Run one check; its exception becomes a failure (or a skip), never the doctor's end."""
    t0 = time.perf_counter()
    status: Status = "pass"
    try:
        detail = check.run()
    except Skip as exc:
        status, detail = "skipped", str(exc)
    except Failed as exc:
        status, detail = "fail", str(exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        status, detail = "fail", f"{one_line(exc)[:300]} (at {kfacbench_frame(exc)})"
    return CheckResult(check.group, check.name, status, detail, time.perf_counter() - t0)


def results_frame(results: Sequence[CheckResult]) -> pd.DataFrame:
    """The doctor's table (one row per check)."""
    frame = pd.DataFrame([asdict(r) for r in results])
    frame["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return frame


def write_results(out: Path, results: Sequence[CheckResult]) -> Path:
    """``doctor.parquet`` in ``out``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "doctor.parquet"
    atomic_write_parquet(path, results_frame(results))
    return path


__all__ = [
    "Check",
    "CheckResult",
    "Doctor",
    "Failed",
    "Skip",
    "doctor_cell",
    "results_frame",
    "run_check",
    "write_results",
]
