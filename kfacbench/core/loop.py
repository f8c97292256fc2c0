"""The training loop shared by every optimizer: one cell, from the first step to the budget.

What it guarantees, so that numbers from different optimizers are comparable:

- the whole dataset lives on the device and minibatches are drawn there from a seeded generator
  (epoch-wise permutations), so the suite times optimizers, not input pipelines;
- no host synchronisation per step: minibatch losses stay on the device and are read back every
  ``log_every`` steps together with the timer's CUDA events;
- training time is wall-clock time with eval excluded: the clock is read after a device sync at
  each read-back point, and eval runs between two such points, off the clock;
- a non-finite loss, or one above ``diverge_factor`` times the initial loss, ends the cell with
  status ``diverged`` and the reason (checked at read-back points);
- budgets in steps and/or training seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from kfacbench.core.compiling import CompileClock, PhaseCompiled
from kfacbench.core.device import synchronize, tune_convolutions, warm_up
from kfacbench.core.graphs import StepGraphs
from kfacbench.core.method import Method
from kfacbench.core.problem import Problem, per_example_loss, prediction
from kfacbench.core.timing import PhaseStats, PhaseTimer, measure_overhead, summarise
from kfacbench.data import Splits
from kfacbench.distributed import Dist, any_rank, mean_losses, shard, slowest

EVAL_CHUNK = 1024
"""Examples per forward pass during eval (bounds activation memory: a ResNet's first stage holds
about 64 KiB per example and layer)."""

EVAL_ELEMENTS = 2**24
"""At most this many input elements, and 8× as many output elements, per eval pass: fewer
examples than :data:`EVAL_CHUNK` where one is large. An ImageNet image (150,528 values) gets 111
per pass, GPT-2 small's 1,024 × 50,257 logits 2 (1,024 examples would be 210 GB of logits);
every CIFAR-sized or smaller workload keeps 1,024."""


EVAL_SEED = 0
"""Seed of the evaluation subsets: fixed, so every cell of a workload is evaluated on the same
examples whatever its own seed."""

LOGGED = ("lr", "damping", "gamma", "mu", "rho")
"""The optimizer scalars a curve row records (NaN where a method has none): the learning rate
(K-FAC with re-scaling: α), λ, and K-FAC's γ, momentum coefficient μ and last
Levenberg–Marquardt ratio ρ, so a run's adaptive rules can be traced step by step."""


@dataclass(frozen=True)
class LoopConfig:
    """How long and how often: the run settings of one cell that the loop needs."""

    batch_size: int
    seed: int
    max_steps: int | None
    max_seconds: float | None
    eval_every: int
    log_every: int
    train_eval_size: int | None
    eval_size: int | None = None  # None: the whole test set; 0 (either size): no such eval
    diverge_factor: float = 10.0
    stop_at_target: bool = False
    cuda_graph: bool = False  # replay steps from CUDA graphs (on a CUDA device; else eager)


@dataclass
class TrainResult:
    """What one cell produced.

    Attributes:
        status: ``ok`` or ``diverged``.
        reason: why the cell diverged (empty when ``ok``).
        steps: steps taken.
        train_time_s: wall-clock training time, eval excluded.
        time_to_target_s: training time at the first eval reaching the workload's target.
        time_to_target_lo_s: training time at the eval before it, which had not: the target
            was crossed in between, so evals every N steps resolve a time to target no finer
            than that interval.
        curves: rows of the ``curves`` table (without the cell id).
        phases: per-phase statistics (including ``step``).
        final: final train-subset loss, eval loss and eval metric.
        timer_overhead_ms: the timer's host cost per step.
        peak_mem_mb: peak device memory (CUDA only; NaN on CPU).
        mem_baseline_mb: device memory allocated when training began: the data on the device,
            the model and the state a method allocates when built (CUDA only). The peak minus
            it is what training adds: activations, curvature factors, inverses, workspaces.
        compile_s: seconds spent compiling (``compile`` setting) or capturing CUDA graphs
            (``cuda_graph``), kept out of ``train_time_s`` and of the phase times: the steps a
            compilation fell into are dropped from them, and a capture runs before its step's
            clock.
        compiled: the phases that ran compiled (the method's ``compiled_phases()``).
        eval_s: wall-clock seconds spent evaluating (off the training clock).
        graphed_steps: steps replayed from a CUDA graph (``cuda_graph``); their phases are
            timed as one ``step``, so the other phases' rows count the eager steps only.
        graphs_captured: CUDA graphs captured (one per key: :mod:`kfacbench.core.graphs`).
    """

    status: Literal["ok", "diverged"]
    steps: int
    train_time_s: float
    time_to_target_s: float | None
    curves: list[dict[str, Any]]
    phases: list[PhaseStats]
    final: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    timer_overhead_ms: float = math.nan
    peak_mem_mb: float = math.nan
    mem_baseline_mb: float = math.nan
    compile_s: float = 0.0
    compiled: dict[str, PhaseCompiled] = field(default_factory=dict)
    time_to_target_lo_s: float | None = None
    eval_s: float = 0.0
    graphed_steps: int = 0
    graphs_captured: int = 0


class MinibatchSampler:
    """Seeded epoch-wise sampling without replacement, entirely on the device.

    Each epoch is a fresh random permutation drawn with the cell's generator; the last incomplete
    batch of an epoch is dropped so every step sees exactly ``batch_size`` examples.
    """

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device) -> None:
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} exceeds the {n} training examples")
        self.n, self.batch_size, self.device = n, batch_size, device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._perm = self._new_perm()
        self._pos = 0

    def _new_perm(self) -> torch.Tensor:
        return torch.randperm(self.n, generator=self.generator, device=self.device)

    def next(self, batch_size: int | None = None) -> torch.Tensor:
        """Indices of the next minibatch (a device tensor); ``batch_size`` overrides the default
        (growing minibatches) and is capped at the training-set size."""
        size = min(batch_size or self.batch_size, self.n)
        if self._pos + size > self.n:
            self._perm, self._pos = self._new_perm(), 0
        idx = self._perm[self._pos : self._pos + size]
        self._pos += size
        return idx


def eval_subset(
    x: torch.Tensor, y: torch.Tensor, size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``size`` examples of a fixed random permutation (:data:`EVAL_SEED`), in their
    stored order: a subset the same for every cell, that does not depend on how the split is
    ordered (by class, person or file). ``None``, or a size of at least the split's, is the
    whole split."""
    n = x.shape[0]
    if size is None or size >= n:
        return x, y
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(EVAL_SEED))
    idx = perm[:size].sort().values.to(x.device)
    return x[idx], (x[idx] if y is x else y[idx])


@torch.no_grad()
def evaluate(
    problem: Problem, x: torch.Tensor, y: torch.Tensor, metric: str
) -> tuple[float, float]:
    """Mean loss and metric over ``(x, y)`` in eval mode (BatchNorm uses running stats).

    The metric is ``recon_error`` (mean over examples of the summed squared error of the predicted
    pixels), ``accuracy``, ``bits_per_byte`` (a byte-level language model's mean next-byte NLL
    in bits) or ``nats_per_token`` (a language model's mean next-token NLL in nats, the log of
    its perplexity). Examples are evaluated :func:`eval_chunk` at a time.
    """
    if x.shape[0] == 0:  # that evaluation is off (size 0)
        return math.nan, math.nan
    model = problem.model
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    metric_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    chunk = eval_chunk(problem, x)
    for start in range(0, x.shape[0], chunk):
        xb, yb = x[start : start + chunk], y[start : start + chunk]
        out = problem.forward(xb)
        losses = per_example_loss(problem.distribution, out, yb).sum(dtype=torch.float64)
        loss_sum += losses
        if metric in ("bits_per_byte", "nats_per_token"):  # every window is as long
            metric_sum += losses / math.log(2) if metric == "bits_per_byte" else losses
            continue
        pred = prediction(problem.distribution, out)
        if metric == "accuracy":
            metric_sum += (pred == yb).sum()
        else:
            metric_sum += (pred - yb).pow(2).flatten(1).sum(1).sum(dtype=torch.float64)
    model.train(was_training)
    n = x.shape[0]
    return float(loss_sum) / n, float(metric_sum) / n


def eval_chunk(problem: Problem, x: torch.Tensor) -> int:
    """Examples per eval pass: :data:`EVAL_CHUNK`, fewer where an example's input or output is
    large (:data:`EVAL_ELEMENTS`; the output size is read from a one-example pass)."""
    per_input = max(x[0].numel(), 1)
    per_output = max(problem.forward(x[:1]).numel(), 1)
    fit = min(EVAL_ELEMENTS // per_input, 8 * EVAL_ELEMENTS // per_output)
    return max(1, min(EVAL_CHUNK, fit))


def train(
    problem: Problem,
    method: Method,
    data: Splits,
    config: LoopConfig,
    *,
    metric: str,
    reached: Callable[[float], bool],
    on_progress: Callable[[int], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    dist: Dist | None = None,
) -> TrainResult:
    """Train one cell and return its curves, phase times and summary.

    Args:
        problem: the model (already on its device) and its loss.
        method: the optimizer under test, bound to ``problem``.
        data: the splits, already on the model's device.
        config: budgets and cadences.
        metric: the workload's eval metric (``recon_error``, ``accuracy``, ``bits_per_byte`` or
            ``nats_per_token``).
        reached: whether an eval-metric value meets the workload's target.
        on_progress: called with the step count at each read-back point (progress bars).
        on_step: called with the step count after every step, inside the timed segment (the
            profiler's ``step()``: keep it cheap).
        dist: the process group of a data-parallel run. Every rank draws the same global
            minibatch indices and trains on its own shard; losses are averaged over ranks at the
            read-back points (so divergence is decided alike everywhere), a time budget is
            checked collectively, and phase times are the slowest rank's.
    """
    if config.max_steps is None and config.max_seconds is None:
        raise ValueError("a cell needs max_steps or max_seconds")
    device = data.train_x.device
    timer = PhaseTimer(device)
    sampler = MinibatchSampler(data.train_x.shape[0], config.batch_size, config.seed, device)
    train_sub = eval_subset(data.train_x, data.train_y, config.train_eval_size)
    test = eval_subset(data.test_x, data.test_y, config.eval_size)
    problem.model.train()
    warm_up(device)
    tune_convolutions(problem, data.train_x[: config.batch_size], data.train_y[: config.batch_size])
    baseline = math.nan
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20

    graphs = StepGraphs(method, device) if config.cuda_graph and device.type == "cuda" else None
    examples = 0
    curves: list[dict[str, Any]] = []
    pending_losses: list[torch.Tensor] = []
    train_time = 0.0
    time_to_target: float | None = None
    unreached_at = 0.0  # training time of the latest eval that had not reached the target
    target_lo: float | None = None
    status: Literal["ok", "diverged"] = "ok"
    last_eval: dict[str, float] = {}
    eval_time = 0.0
    first_loss = math.nan  # the first step's minibatch loss (the model before any update)

    def record(step: int, *, with_eval: bool) -> str:
        """Read back losses (and eval); return why the run diverged, or ``""``.

        Diverged means a non-finite loss, or a mean minibatch loss (or train-subset loss) above
        ``diverge_factor`` times the initial train-subset loss: bounded losses such as a Bernoulli
        autoencoder's cross-entropy grow to 1e9 without ever overflowing. A diverged cell is
        evaluated where it stopped, so its final losses are those of the blown-up model.
        """
        nonlocal time_to_target, target_lo, unreached_at, last_eval, eval_time, first_loss
        losses = torch.stack(pending_losses).double() if pending_losses else None
        if losses is not None:
            losses = (mean_losses(losses, dist) if dist is not None else losses).cpu()
            if math.isnan(first_loss):
                first_loss = float(losses[0])
        pending_losses.clear()
        row: dict[str, Any] = {
            "step": step,
            "train_time_s": train_time,
            "examples": examples,
            "train_loss": float(losses.mean()) if losses is not None else math.nan,
            "train_eval_loss": math.nan,
            "eval_loss": math.nan,
            "eval_metric": math.nan,
            **dict.fromkeys(LOGGED, math.nan),
        }
        row.update({k: v for k, v in method.log_values().items() if k in LOGGED})
        reason = ""
        if losses is not None and not bool(torch.isfinite(losses).all()):
            reason = f"non-finite loss by step {step}"
        reason = reason or too_large(row, "train_loss")
        if (with_eval or reason) and (len(train_sub[0]) or len(test[0])):
            started = time.perf_counter()
            with method.averaged():
                train_loss, _ = evaluate(problem, *train_sub, metric)
                eval_loss, eval_metric = evaluate(problem, *test, metric)
            eval_time += time.perf_counter() - started
            row.update(train_eval_loss=train_loss, eval_loss=eval_loss, eval_metric=eval_metric)
            last_eval = {
                "final_train_loss": train_loss,
                "final_eval_loss": eval_loss,
                "final_eval_metric": eval_metric,
            }
            reason = reason or too_large(row, "train_eval_loss")
            if time_to_target is None:
                if not reason and math.isfinite(eval_metric) and reached(eval_metric):
                    time_to_target, target_lo = train_time, unreached_at
                else:
                    unreached_at = train_time
        curves.append(row)
        return reason

    def too_large(row: dict[str, Any], name: str) -> str:
        """Why ``row[name]`` counts as diverged (above ``diverge_factor`` × the initial
        train-subset loss, or without train-subset evals the first step's minibatch loss, taken
        before any update), or ``""``."""
        initial = curves[0]["train_eval_loss"] if curves else math.nan
        if not math.isfinite(initial):
            initial = first_loss
        if not (
            math.isfinite(initial) and initial > 0 and row[name] > config.diverge_factor * initial
        ):
            return ""
        return (
            f"{name} {row[name]:.4g} at step {row['step']} exceeds diverge_factor"
            f" {config.diverge_factor:g} × the initial loss {initial:.4g}"
        )

    record(0, with_eval=True)
    step = 0
    reason = ""
    with CompileClock() as clock:

        def off_clock() -> float:
            """Seconds compiling and capturing graphs so far: kept off the training time."""
            return clock.seconds + (graphs.capture_s if graphs is not None else 0.0)

        segment_start, segment_compile = time.perf_counter(), 0.0
        while True:
            idx = sampler.next(method.batch_size_at(step, config.batch_size, sampler.n))
            examples += idx.shape[0]
            if dist is not None:
                idx = shard(idx, dist)
            key = graphs.plan(step, idx.shape[0]) if graphs is not None else None
            if graphs is not None and key is not None:
                loss = graphs.step(key, data.train_x, data.train_y, idx, timer)
            else:
                mark, compiles = timer.mark(), clock.events
                with timer.step():
                    loss = method.step(data.train_x[idx], data.train_y[idx], timer)
                if clock.events != compiles:  # the step compiled: its times are the compiler's
                    timer.discard_since(mark)
            pending_losses.append(loss)
            step += 1
            if on_step is not None:
                on_step(step)
            read_back = step % config.eval_every == 0 or step % config.log_every == 0
            # Compilation is kept off the training time (the compile_s column).
            compiling = off_clock() - segment_compile
            elapsed = train_time + time.perf_counter() - segment_start - compiling
            out_of_time = config.max_seconds is not None and elapsed >= config.max_seconds
            if dist is not None and config.max_seconds is not None:
                # Every rank must stop at the same step, and agreeing costs a collective and a sync:
                # decide at read-back points only (the budget may run over by < log_every steps).
                out_of_time = read_back and any_rank(out_of_time, device)
            done = (config.max_steps is not None and step >= config.max_steps) or out_of_time
            if not (done or read_back):
                continue
            synchronize(device)
            train_time += time.perf_counter() - segment_start - compiling
            timer.flush()
            if dist is None:
                done = done or (config.max_seconds is not None and train_time >= config.max_seconds)
            reason = record(step, with_eval=done or step % config.eval_every == 0)
            if on_progress is not None:
                on_progress(step)
            if reason:
                status = "diverged"
                break
            if done or (config.stop_at_target and time_to_target is not None):
                break
            segment_start, segment_compile = time.perf_counter(), off_clock()

    durations = timer.all_durations()
    if dist is not None:
        durations = slowest({**durations, "(train time)": [train_time]}, dist)
        train_time = durations.pop("(train time)")[0]
    phases = [summarise(name, ms) for name, ms in durations.items()]
    per_step_calls = sum(s.calls for s in phases) / max(step, 1)
    overhead = measure_overhead(device, calls=500) * per_step_calls
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
    return TrainResult(
        status=status,
        steps=step,
        train_time_s=train_time,
        time_to_target_s=time_to_target,
        time_to_target_lo_s=target_lo,
        curves=curves,
        phases=phases,
        final=last_eval,
        reason=reason,
        timer_overhead_ms=overhead,
        peak_mem_mb=peak,
        mem_baseline_mb=baseline,
        compile_s=off_clock(),
        compiled=method.compiled_phases(),
        eval_s=eval_time,
        graphed_steps=graphs.replayed if graphs is not None else 0,
        graphs_captured=graphs.captured if graphs is not None else 0,
    )
