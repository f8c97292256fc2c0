"""Suite files: schema, validation with the file and key in every error, sweep expansion.

A suite is a TOML file that sweeps workloads × batch sizes × inversion intervals × seeds ×
optimizers × per-optimizer hyperparameter lists; every point of the sweep is a :class:`Cell`, one
training run. The schema (``suites/quick.toml`` is a working example)::

    name = "quick"                   # optional, defaults to the file stem
    description = "..."              # optional
    [defaults]                       # Settings shared by every cell (see Settings)
    max_steps = 300
    [workloads.curves_ae]            # optional per-workload overrides of [defaults]
    max_seconds = 60.0
    [sweep]
    workload = ["curves_ae"]         # required
    batch_size = [100, 500]          # required
    seed = [0]                       # default [0]
    inv_interval = [20]              # default [20]; only for methods with uses_inv_interval
    compile = ["off", "default"]     # optional: the compile setting as a sweep axis
    cuda_graph = [false, true]       # optional: the cuda_graph setting as a sweep axis
    [optimizers.sgd]                 # one table per registered method, at least one
    lr = [0.01, 0.1]                 # a value or a list of values per hyperparameter
    [[exclude]]                      # drop the cells matching every key given
    batch_size = 500                 # (a list matches any of its values)
    lr = 0.1
    [profile]                        # optional: profile each cell after the timed runs
    wait = 1                         # (kfacbench.profiling; not part of any cell's config)
    warmup = 2
    active = 5
    [diagnose]                       # optional: checkpoints of `kfacbench diagnose`
    at = [0, 50, 200]

Validation is strict because a typo in a suite would otherwise silently run, and time, the wrong
configuration: an unknown key, an ill-typed value or a sweep that expands to nothing raises a
:class:`~kfacbench.errors.SuiteError` whose one-line message names the file, the key path and the
bad value. Cells are named by a hash of their resolved config, so the same run in two suites, or in
an interrupted and resumed run, has the same id.

Size: one file format end to end: the settings schema, the reader that names the file and key in
every error, and the sweep expansion with its exclusions.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from kfacbench import plugins
from kfacbench.core.compiling import COMPILE_MODES
from kfacbench.core.method import Bounds, HParam, HParamValue, MethodSpec
from kfacbench.errors import KfacbenchError, SuiteError

T = TypeVar("T")

AXES = ("workload", "optimizer", "batch_size", "inv_interval", "seed", "compile", "cuda_graph")
"""The sweep axes of a cell; with hyperparameter names, the keys an ``[[exclude]]`` table takes."""

_TOP_KEYS = (
    "name",
    "description",
    "defaults",
    "workloads",
    "sweep",
    "optimizers",
    "exclude",
    "profile",
    "diagnose",
    "plugins",
)
_PROFILE_KEYS = ("wait", "warmup", "active")
SETTING_AXES = ("compile", "cuda_graph")
"""Run settings that are also sweep axes, so their cells run side by side in one suite."""
_SWEEP_KEYS = ("workload", "batch_size", "seed", "inv_interval", *SETTING_AXES)
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
"""The device specs a suite and ``--device`` take."""
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # names a results directory
MAX_SUITE_BYTES = 1 << 20
"""Largest suite file read (1 MiB; real suites are a few KiB)."""
MAX_PROFILE_STEPS = 100_000
"""Most steps of each part of a ``[profile]`` window (real windows are a few steps)."""
MAX_CELLS = 100_000
"""Most cells a suite may expand to (checked before expanding: a few long lists would otherwise
build billions of cells). Real suites have up to a few hundred."""
MAX_SECONDS = 30 * 24 * 3600
"""The longest time budget a cell may have (30 days): a budget must be able to end."""


@dataclass(frozen=True)
class Settings:
    """How a cell runs: device, data, budget and measurement cadence.

    Attributes:
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        data: ``real`` data, or ``synthetic`` tensors of the same shapes for timing-only runs.
        max_steps: step budget; ``None`` for none.
        max_seconds: training-time budget (eval excluded); ``None`` for none. A suite must set at
            least one of the two budgets.
        eval_every: steps between evals (off the clock).
        log_every: steps between loss read-backs and divergence checks (each one syncs the device).
        train_eval_size: training examples of the train-set eval: a fixed random subset, the
            same for every cell (``core.loop.eval_subset``); ``None`` (``"all"`` in a suite) for
            the whole training set, ``0`` for no train-set eval.
        eval_size: test examples of each eval, chosen the same way; ``None`` (``"all"``) for the
            whole test set, ``0`` for none. Evaluation is off the training clock but not off
            the wall clock: 1,024 each keeps it a few percent of a cell on the workloads here,
            where whole splits made a short run mostly evaluation (a 10-step text_gpt cell:
            7 s of training in 3 minutes). On synthetic data, both default to 0: the data are
            random, there is no metric to reach, and divergence is still checked on the
            minibatch losses (:data:`SYNTHETIC_EVAL`).
        tf32: allow TF32 matmuls and convolutions on CUDA, in the forward and backward passes
            (K-FAC's and SKFAC's own arithmetic stays float32: ``optim.base.fp32_matmuls``).
        amp: autocast mode of the forward pass: ``off`` or ``bf16`` (fp16 would need loss
            scaling, which the core does not do, so it is not offered).
        diverge_factor: a read-back loss above this many times the cell's initial loss ends the
            cell as ``diverged`` (as a non-finite loss does). Bounded losses (a Bernoulli
            autoencoder's cross-entropy) never overflow, so without this bound a blown-up run
            would finish ``ok`` with a loss of 1e9 and corrupt every table built on it.
        stop_at_target: end the cell at the first eval that reaches the workload's target (as
            AlgoPerf does): a time-to-target comparison then costs each cell only its own time
            to target, and the budget bounds the cells that never get there.
        compile: ``off`` (eager), or the torch.compile mode of the regions of the step that can
            be compiled: ``default``, ``max-autotune`` or ``reduce-overhead`` (CUDA graphs on a
            GPU); see :mod:`kfacbench.core.compiling`. Also a sweep axis (``sweep.compile``), so
            eager and compiled cells run side by side.
        cuda_graph: replay each step a method allows (not its refreshes) from a whole-step CUDA
            graph (:mod:`kfacbench.core.graphs`): SGD, K-FAC with fixed damping (kfac-fast) and
            SKFAC. Capturing is kept off the clock, like compiling; the ``graphed_steps`` column
            counts the replayed steps. On a CPU the cells run eagerly (``graphed_steps`` 0). Also
            a sweep axis (``sweep.cuda_graph``), so graphed and eager cells run side by side.
        cudnn_benchmark: let cuDNN time its convolution algorithms and keep the fastest (CUDA
            only; on by default there, as a user tuning a conv net would run it). The tuning
            happens in an untimed pass before the clock starts (:func:`kfacbench.core.loop.train`)
            and the setting is a column of the cells table.
        count_ops: after the timed run, count the ops (kernel launches on a GPU) of each phase on
            a few untimed probe steps of a fresh copy of the cell: the ``ops_per_step`` and
            ``refresh_ops`` columns of the phases table (:mod:`kfacbench.core.opcount`). NaN
            when off, and in data-parallel and compiled cells (whose ops are not the launches).
            Never part of the cell id (:data:`MEASUREMENT_ONLY`).
    """

    device: str = "auto"
    data: str = "real"
    max_steps: int | None = None
    max_seconds: float | None = None
    eval_every: int = 50
    log_every: int = 25
    train_eval_size: int | None = 1024
    eval_size: int | None = 1024
    tf32: bool = False
    amp: str = "off"
    diverge_factor: float = 10.0
    stop_at_target: bool = False
    compile: str = "off"
    cudnn_benchmark: bool = True
    count_ops: bool = True
    cuda_graph: bool = False


SYNTHETIC_EVAL: dict[str, Any] = {"train_eval_size": 0, "eval_size": 0}
"""The evaluation sizes of a workload on synthetic data whose suite does not set them: none (a
timing-only run measures steps; its evals would measure nothing but wall time)."""

LATER_SETTINGS = {
    "diverge_factor": Settings.diverge_factor,
    "stop_at_target": Settings.stop_at_target,
    "compile": Settings.compile,
    "cudnn_benchmark": Settings.cudnn_benchmark,
    "cuda_graph": Settings.cuda_graph,
}
"""Settings that cell ids include only when not at their default (see :attr:`Cell.id`)."""

MEASUREMENT_ONLY = ("count_ops",)
"""Settings that change what is measured beside a cell, never its timed run: cell ids leave them
out, so a run without them still compares (and resumes) cell by cell with one with them."""


@dataclass(frozen=True)
class ProfileWindow:
    """The profiler schedule of a cell's profiling pass: skip ``wait`` steps, warm up for
    ``warmup`` (recorded and thrown away: first-call allocations, cuDNN autotuning), record
    ``active``. A suite's ``profile = { wait, warmup, active }``; not part of any cell's config,
    since the profiling pass never changes the timed results."""

    wait: int = 1
    warmup: int = 2
    active: int = 5

    def __post_init__(self) -> None:
        if self.wait < 1 or self.warmup < 0 or self.active < 1:
            raise SuiteError(
                "profile window needs wait >= 1 (the step-0 eval runs there), warmup >= 0 and"
                f" active >= 1; got wait={self.wait}, warmup={self.warmup}, active={self.active}"
            )

    @property
    def steps(self) -> int:
        """Training steps the profiling pass runs."""
        return self.wait + self.warmup + self.active


class _FrozenDict(Mapping[str, HParamValue]):
    """A read-only mapping with sorted keys: hashable (cells go in sets) and picklable."""

    __slots__ = ("_data",)

    def __init__(self, items: Mapping[str, HParamValue]) -> None:
        self._data = dict(sorted(items.items()))

    def __getitem__(self, key: str) -> HParamValue:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(tuple(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)


@dataclass(frozen=True)
class Cell:
    """One training run of a suite: a point of its sweep with every setting resolved.

    Attributes:
        suite: name of the suite the cell comes from (not part of its config or id).
        workload: workload registry name.
        optimizer: method registry name.
        batch_size: minibatch size.
        inv_interval: steps between curvature inversions; ``None`` for a method that has none.
        seed: seed of the model initialisation, the minibatch order and the method's randomness.
        hparams: every hyperparameter of the method, defaults filled in, keys sorted (read-only).
        settings: run settings after ``[defaults]`` and ``[workloads.<name>]``.
        label_keys: hyperparameters that :attr:`label` shows: those that vary within the suite for
            this optimizer (set by the suite; not part of the config).
    """

    suite: str
    workload: str
    optimizer: str
    batch_size: int
    inv_interval: int | None
    seed: int
    hparams: Mapping[str, HParamValue]
    settings: Settings
    label_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hparams", _FrozenDict(self.hparams))

    def config(self) -> dict[str, Any]:
        """The resolved config as JSON-able data: everything but the suite name."""
        return {
            "workload": self.workload,
            "optimizer": self.optimizer,
            "batch_size": self.batch_size,
            "inv_interval": self.inv_interval,
            "seed": self.seed,
            "hparams": dict(self.hparams),
            "settings": asdict(self.settings),
        }

    @property
    def id(self) -> str:
        """First 12 hex digits of the SHA-256 of the canonical JSON of :meth:`config`.

        Settings added after ids were first published (:data:`LATER_SETTINGS`) are hashed only
        when they differ from their default, so a cell keeps its id across kfacbench versions and
        ``compare`` and ``--resume`` still match runs recorded before the setting existed.
        Measurement-only settings (:data:`MEASUREMENT_ONLY`) are never hashed.
        """
        config = self.config()
        for key, default in LATER_SETTINGS.items():
            if config["settings"][key] == default:
                del config["settings"][key]
        for key in MEASUREMENT_ONLY:
            del config["settings"][key]
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """Short human name, e.g. ``curves_ae sgd bs=100 lr=0.1 seed=0``."""
        parts = [self.workload, self.optimizer, f"bs={self.batch_size}"]
        if self.inv_interval is not None:
            parts.append(f"inv={self.inv_interval}")
        parts += [f"{key}={self.hparams[key]}" for key in self.label_keys]
        if self.settings.compile != "off":
            parts.append(f"compile={self.settings.compile}")
        if self.settings.cuda_graph:
            parts.append("cuda_graph")
        parts.append(f"seed={self.seed}")
        return " ".join(parts)


@dataclass(frozen=True)
class Suite:
    """A validated suite: its cells in a stable order, and the TOML they came from.

    Attributes:
        name: suite name (the results directory under ``results/runs/``).
        description: one line for ``kfacbench list``.
        path: the file it was loaded from; ``None`` for a suite parsed from data.
        cells: the expanded sweep after ``[[exclude]]``, ordered by workload, optimizer,
            hyperparameters, batch size, inversion interval and seed.
        raw: the parsed TOML, to be kept next to the results.
        profile: when set, ``kfacbench run`` also profiles every cell, in a separate pass after
            the timed runs (:mod:`kfacbench.profiling`).
        diagnose_at: the steps ``kfacbench diagnose`` measures curvature quality at, when the
            suite sets them (:mod:`kfacbench.diagnostics.quality`).
    """

    name: str
    description: str
    path: Path | None
    cells: tuple[Cell, ...]
    raw: dict[str, Any] = field(compare=False, repr=False)
    profile: ProfileWindow | None = None
    diagnose_at: tuple[int, ...] | None = None

    def select(self, pattern: str | None) -> tuple[Cell, ...]:
        """The cells whose label or id contains ``pattern`` or matches it as a glob (``--only``).

        ``None`` selects every cell. Globs are case-sensitive (``fnmatch.fnmatchcase``), e.g.
        ``"*sgd*lr=0.1 *"``.
        """
        if pattern is None:
            return self.cells
        return tuple(c for c in self.cells if _matches(pattern, c.label) or _matches(pattern, c.id))


def load_suite(
    path: Path, *, workloads: Collection[str], methods: Mapping[str, MethodSpec]
) -> Suite:
    """Read, validate and expand the suite file ``path``.

    Args:
        path: the TOML file; errors name it as given.
        workloads: registered workload names.
        methods: registered methods by name.

    Raises:
        SuiteError: missing or unreadable file, TOML syntax error, or any invalid content.
    """
    source = str(path)
    plugins.load_entry_points()  # installed packages' methods and workloads (once per process)
    try:
        # A FIFO or a device would block the read (or never end): only regular files are read.
        if path.exists() and not path.is_file():
            raise SuiteError(_line(f"{source}: not a regular file (a directory, FIFO or device?)"))
        if path.exists() and path.stat().st_size > MAX_SUITE_BYTES:
            raise SuiteError(
                _line(f"{source}: {path.stat().st_size} bytes; a suite is at most 1 MiB of TOML")
            )
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(_line(f"{source}: no such file")) from None
    except OSError as exc:
        raise SuiteError(_line(f"{source}: cannot read: {exc.strerror}")) from None
    except UnicodeDecodeError as exc:
        raise SuiteError(_line(f"{source}: not UTF-8 text (byte {exc.start})")) from None
    except ValueError as exc:  # TOMLDecodeError, or an integer of more than 4,300 digits
        raise SuiteError(_line(f"{source}: invalid TOML: {exc}")) from None
    except RecursionError:
        raise SuiteError(_line(f"{source}: invalid TOML: nested too deeply")) from None
    try:
        suite = parse_suite(
            data,
            source=source,
            workloads=workloads,
            methods=methods,
            name_default=path.stem,
            base_dir=path.parent,
        )
    except RecursionError:  # comparing or printing a value nested hundreds of levels deep
        raise SuiteError(_line(f"{source}: a value is nested too deeply")) from None
    return replace(suite, path=path)


def parse_suite(
    data: Mapping[str, Any],
    *,
    source: str,
    workloads: Collection[str],
    methods: Mapping[str, MethodSpec],
    name_default: str,
    base_dir: Path | None = None,
) -> Suite:
    """Validate and expand a parsed suite (tests, embedded suites).

    Args:
        data: the parsed TOML.
        source: what error messages name as the file (a path, or ``"<string>"``).
        workloads: registered workload names.
        methods: registered methods by name.
        name_default: the suite name when ``data`` sets none (the file stem).
        base_dir: what the suite's plugin files and ``file.py:Class`` import paths are relative
            to (the suite file's folder; ``None``: the working directory).

    Raises:
        SuiteError: any invalid content; the message names ``source``, the key path and the value.
    """
    r = _Reader(source)
    _check_magnitudes(r, data, "")
    r.check_keys(data, "", _TOP_KEYS)
    methods, workloads = _plugins(r, data, methods, workloads, base_dir)
    name = data.get("name", name_default)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        r.fail("name", f"expected up to 100 letters, digits, '_', '-' or '.', got {_show(name)}")
    description = r.string(data.get("description", ""), "description")

    if "sweep" not in data:
        r.fail("sweep", "missing table; a suite needs [sweep] with workload and batch_size")
    sweep = r.table(data["sweep"], "sweep", _SWEEP_KEYS)
    for key in ("workload", "batch_size"):
        if key not in sweep:
            r.fail(f"sweep.{key}", "missing (required)")
    names = r.values(sweep["workload"], "sweep.workload", lambda v, p: r.workload(v, p, workloads))
    batch_sizes = r.values(
        sweep["batch_size"], "sweep.batch_size", lambda v, p: r.integer(v, p, "[1, inf)")
    )
    seeds = r.values(sweep.get("seed", [0]), "sweep.seed", lambda v, p: r.integer(v, p, "[0, inf)"))
    inv_intervals = r.values(
        sweep.get("inv_interval", [20]),
        "sweep.inv_interval",
        lambda v, p: r.integer(v, p, "[1, inf)"),
    )

    settings = _resolve_settings(r, names, data)
    # Per setting axis its values; {} (no override): each workload's own setting.
    axes = [
        [{key: v} for v in r.values(sweep[key], f"sweep.{key}", partial(_SETTINGS[key], r))]
        for key in SETTING_AXES
        if key in sweep
    ]
    overrides = [
        dict(kv for one in combo for kv in one.items()) for combo in itertools.product(*axes)
    ]
    grids = _grids(r, data, methods)
    profile = None
    if "profile" in data:
        table = r.table(data["profile"], "profile", _PROFILE_KEYS)
        counts = {
            key: r.integer(value, f"profile.{key}", f"[0, {MAX_PROFILE_STEPS}]")
            for key, value in table.items()
        }
        try:
            profile = ProfileWindow(**counts)
        except SuiteError as exc:
            r.fail("profile", str(exc))
    diagnose_at = None
    if "diagnose" in data:
        table = r.table(data["diagnose"], "diagnose", ("at",))
        if "at" in table:
            steps = r.values(table["at"], "diagnose.at", lambda v, p: r.integer(v, p, "[0, inf)"))
            diagnose_at = tuple(sorted(steps))

    per_workload = sum(
        len(combos)
        * len(batch_sizes)
        * (len(inv_intervals) if methods[optimizer].uses_inv_interval else 1)
        * len(seeds)
        * len(overrides)
        for optimizer, combos in grids.items()
    )
    if len(names) * per_workload > MAX_CELLS:
        r.fail("sweep", f"{len(names) * per_workload} cells; a suite has at most {MAX_CELLS}")
    cells: list[Cell] = []
    for workload, (optimizer, combos) in itertools.product(names, grids.items()):
        invs: list[int | None] = (
            [*inv_intervals] if methods[optimizer].uses_inv_interval else [None]
        )
        for hparams, batch_size, inv, seed, override in itertools.product(
            combos, batch_sizes, invs, seeds, overrides
        ):
            run = replace(settings[workload], **override)
            cells.append(Cell(name, workload, optimizer, batch_size, inv, seed, hparams, run))

    kept = _exclude(r, data.get("exclude", []), cells, [methods[o] for o in grids])
    varying = {
        optimizer: tuple(
            key
            for key in sorted(methods[optimizer].hparams)
            if len({c.hparams[key] for c in kept if c.optimizer == optimizer}) > 1
        )
        for optimizer in grids
    }
    return Suite(
        name=name,
        description=description,
        path=None,
        cells=tuple(replace(c, label_keys=varying[c.optimizer]) for c in kept),
        raw=dict(data),
        profile=profile,
        diagnose_at=diagnose_at,
    )


def _resolve_settings(
    r: _Reader, names: Sequence[str], data: Mapping[str, Any]
) -> dict[str, Settings]:
    """Settings per workload: ``[defaults]`` then ``[workloads.<name>]``, each with a budget."""
    defaults = data.get("defaults", {})
    base = r.settings(defaults, "defaults", Settings())
    resolved = dict.fromkeys(names, base)
    given = dict.fromkeys(names, set(defaults) if isinstance(defaults, dict) else set())
    for workload, table in r.table(data.get("workloads", {}), "workloads").items():
        path = f"workloads.{workload}"
        if workload not in names:
            r.fail(path, f"workload {workload!r} is not in sweep.workload ({', '.join(names)})")
        resolved[workload] = r.settings(table, path, base)
        given[workload] = given[workload] | set(table)
    for workload, s in resolved.items():
        if s.data == "synthetic":
            unset = {k: v for k, v in SYNTHETIC_EVAL.items() if k not in given[workload]}
            resolved[workload] = s = replace(s, **unset)
        if s.max_steps is None and s.max_seconds is None:
            r.fail(
                "defaults",
                f"neither max_steps nor max_seconds is set for workload {workload!r}; "
                f"set one in [defaults] or [workloads.{workload}]",
            )
    return resolved


def _plugins(
    r: _Reader,
    data: Mapping[str, Any],
    methods: Mapping[str, MethodSpec],
    workloads: Collection[str],
    base_dir: Path | None,
) -> tuple[dict[str, MethodSpec], set[str]]:
    """The methods and workload names with the suite's own plugins registered: the files of
    ``plugins = [...]`` and the ``class = "module:Optimizer"`` of ``[optimizers.<name>]`` tables
    (:mod:`kfacbench.plugins`; the runner builds cells from the same registries)."""
    methods, names = dict(methods), set(workloads)
    if "plugins" in data:
        files = r.values(data["plugins"], "plugins", lambda v, p: r.string(v, p))
        for i, file in enumerate(files):
            try:
                items = plugins.load_file(Path(file) if base_dir is None else base_dir / file)
            except KfacbenchError as exc:
                r.fail(f"plugins[{i}]", str(exc))
            methods |= {m.name: m for m in items if isinstance(m, MethodSpec)}
            names |= {w.name for w in items if not isinstance(w, MethodSpec)}
    tables = data.get("optimizers")
    for name, table in tables.items() if isinstance(tables, dict) else []:
        if not isinstance(table, dict) or "class" not in table:
            continue
        key = f"optimizers.{name}.class"
        target = r.string(table["class"], key)
        try:
            spec = plugins.optimizer_spec(name, target, base_dir, f"suite {r.source}: {target}")
            plugins.register(spec)
        except (ValueError, KfacbenchError) as exc:
            r.fail(key, str(exc))
        methods[name] = spec
    return methods, names


def _grids(
    r: _Reader, data: Mapping[str, Any], methods: Mapping[str, MethodSpec]
) -> dict[str, list[dict[str, HParamValue]]]:
    """Per optimizer (in file order), the product of its hyperparameter lists, defaults filled."""
    hint = f"add at least one [optimizers.<name>] table (known: {', '.join(methods)})"
    if "optimizers" not in data:
        r.fail("optimizers", f"missing; {hint}")
    tables = r.table(data["optimizers"], "optimizers")
    if not tables:
        r.fail("optimizers", f"empty; {hint}")
    grids: dict[str, list[dict[str, HParamValue]]] = {}
    for optimizer, value in tables.items():
        path = f"optimizers.{optimizer}"
        if optimizer not in methods:
            r.unknown(path, "optimizer", optimizer, list(methods))
        specs = methods[optimizer].hparams
        if isinstance(value, dict):  # a class import path (read by _plugins): no hyperparameter
            value = {k: v for k, v in value.items() if k != "class"}
        table = r.table(value, path, list(specs), what=f"{optimizer} hyperparameter")
        keys = sorted(specs)
        lists = [
            r.values(table[key], f"{path}.{key}", partial(r.hparam, spec=specs[key]))
            if key in table
            else [specs[key].default]
            for key in keys
        ]
        size = math.prod(len(values) for values in lists)
        if size > MAX_CELLS:
            r.fail(
                path, f"{size} hyperparameter combinations; a suite has at most {MAX_CELLS} cells"
            )
        grids[optimizer] = [
            dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)
        ]
    return grids


def _exclude(
    r: _Reader, rules: object, cells: list[Cell], specs: Sequence[MethodSpec]
) -> list[Cell]:
    """``cells`` without those matching an ``[[exclude]]`` rule.

    A rule, or one of its values, that matches no cell of the full sweep is an error: it is a typo
    or a leftover from an edited sweep, and ignoring it would run cells the author meant to drop.
    """
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules):
        r.fail("exclude", f"expected [[exclude]] tables, got {_show(rules)}")
    known = [*AXES, *sorted({key for spec in specs for key in spec.hparams} - set(AXES))]
    for i, rule in enumerate(rules):
        path = f"exclude[{i}]"
        r.check_keys(rule, path, known)
        if not rule:
            r.fail(path, "empty table; give at least one key to match")
        for key, value in rule.items():
            present = [v for v in dict.fromkeys(_value(c, key) for c in cells) if v is not None]
            if isinstance(value, list) and not value:
                r.fail(f"{path}.{key}", "empty list; give the values to match")
            for one in _alternatives(value):
                if not any(_same(one, v) for v in present):
                    listed = ", ".join(repr(v) for v in present)
                    r.fail(
                        f"{path}.{key}",
                        f"no cell has {key}={_show(one)}; values in this suite: {listed}",
                    )
        if not any(_excluded(c, rule) for c in cells):
            r.fail(path, "matches no cell: each value occurs in the sweep, but never together")
    kept = [c for c in cells if not any(_excluded(c, rule) for rule in rules)]
    if not kept:
        r.fail("exclude", f"removes all {len(cells)} cells of the sweep")
    return kept


def _value(cell: Cell, key: str) -> object:
    """The cell's value for an exclude key; ``None`` (which TOML cannot write) where it has none."""
    if key in SETTING_AXES:
        return getattr(cell.settings, key)
    return getattr(cell, key) if key in AXES else cell.hparams.get(key)


def _same(a: object, b: object) -> bool:
    """``==`` that keeps ``true`` apart from ``1`` (TOML has both) but matches ``1`` to ``1.0``."""
    return isinstance(a, bool) is isinstance(b, bool) and a == b


def _alternatives(value: object) -> list[object]:
    """An exclude value as the list of values it matches (a list matches any of its items)."""
    return value if isinstance(value, list) else [value]


def _excluded(cell: Cell, rule: Mapping[str, object]) -> bool:
    return all(
        any(_same(one, _value(cell, key)) for one in _alternatives(value))
        for key, value in rule.items()
    )


def _matches(pattern: str, text: str) -> bool:
    return pattern in text or fnmatch.fnmatchcase(text, pattern)


def _line(message: str) -> str:
    """``message`` on one line (a quoted TOML key may hold a newline)."""
    return " ".join(message.splitlines())


def _show(value: object) -> str:
    """A value for an error message, shortened (a fuzzed suite can hold a megabyte string)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _check_magnitudes(r: _Reader, value: object, path: str) -> None:
    """Reject integers far outside int64 wherever they are, before anything prints or hashes
    them: TOML's hex literals have no length limit, and Python refuses to turn an integer of
    more than 4,300 digits into text (so even the error message about it would fail)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_magnitudes(r, item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_magnitudes(r, item, f"{path}[{i}]")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**64:
        r.fail(path, f"an integer of {value.bit_length()} bits is out of range (int64)")


class _Reader:
    """Typed reads of parsed TOML that fail with the file, the key path and the value."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> NoReturn:
        raise SuiteError(_line(f"{self.source}: {path}: {message}"))

    def unknown(self, path: str, what: str, name: str, known: Sequence[str]) -> NoReturn:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(path, f"unknown {what} {_show(name)}{hint}; known: {', '.join(known)}")

    def check_keys(
        self, table: Mapping[str, Any], path: str, known: Sequence[str], what: str = "key"
    ) -> None:
        for key in table:
            if key not in known:
                self.unknown(f"{path}.{key}" if path else key, what, key, known)

    def table(
        self, value: object, path: str, known: Sequence[str] | None = None, what: str = "key"
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, f"expected a table, got {_show(value)}")
        if known is not None:
            self.check_keys(value, path, known, what)
        return value

    def values(self, value: object, path: str, convert: Callable[[object, str], T]) -> list[T]:
        """A value, or a non-empty list of distinct values (a repeat would duplicate cells)."""
        if not isinstance(value, list):
            return [convert(value, path)]
        if not value:
            self.fail(path, "expected a value or a non-empty list, got []")
        if len(value) > MAX_CELLS:
            self.fail(path, f"{len(value)} values; a suite has at most {MAX_CELLS} cells")
        out: list[T] = []
        seen: set[T] = set()  # converted values are scalars of one type: hashable
        for i, item in enumerate(value):
            converted = convert(item, f"{path}[{i}]")
            if converted in seen:
                self.fail(
                    f"{path}[{i}]", f"repeats the value {_show(item)} (it would duplicate cells)"
                )
            seen.add(converted)
            out.append(converted)
        return out

    def integer(self, value: object, path: str, bounds: str = "(-inf, inf)") -> int:
        """An integer in ``bounds`` (:class:`~kfacbench.optim.base.Bounds` notation), which is
        always capped to int64: a larger seed or size passes a plain ``>= 1`` check and then
        fails inside torch, outside the cell's failure isolation."""
        interval = Bounds.parse(bounds).integral()
        if isinstance(value, bool) or not isinstance(value, int) or value not in interval:
            self.fail(path, f"expected an integer in {interval}, got {_show(value)}")
        return value

    def size(self, value: object, path: str) -> int | None:
        """A number of examples (``0`` for none), or ``"all"`` (``None``: the whole split)."""
        if value == "all":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self.fail(path, f"expected a number of examples >= 0 or 'all', got {_show(value)}")
        return self.integer(value, path, "[0, inf)")

    def number(self, value: object, path: str, bounds: str = "(-inf, inf)") -> float:
        """A finite float in ``bounds``; an integer is accepted and converted (``lr = 1`` means
        ``1.0``). ``inf`` and ``nan`` never are: an infinite damping or learning rate would run
        and train nothing, an infinite time budget would never end."""
        interval = Bounds.parse(bounds)
        if isinstance(value, bool) or not isinstance(value, int | float) or value not in interval:
            self.fail(path, f"expected a finite number in {interval}, got {_show(value)}")
        return float(value)  # an integer beyond float's range was refused by _check_magnitudes

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_show(value)}")
        return value

    def string(self, value: object, path: str, choices: Sequence[str] | None = None) -> str:
        if choices is not None and value not in choices:
            self.fail(path, f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}")
        if not isinstance(value, str):
            self.fail(path, f"expected a string, got {_show(value)}")
        return value

    def workload(self, value: object, path: str, known: Collection[str]) -> str:
        name = self.string(value, path)
        if name not in known:
            self.unknown(path, "workload", name, sorted(known))
        return name

    def hparam(self, value: object, path: str, spec: HParam) -> HParamValue:
        """``value`` checked against the type of ``spec.default``, its choices and bounds."""
        if spec.kind is bool:
            return self.boolean(value, path)
        if spec.kind is int:
            return self.integer(value, path, spec.bounds)
        if spec.kind is float:
            return self.number(value, path, spec.bounds)
        return self.string(value, path, spec.choices)

    def settings(self, value: object, path: str, base: Settings) -> Settings:
        """``base`` with the keys of the table ``value`` replaced."""
        table = self.table(value, path, list(_SETTINGS))
        return replace(base, **{k: _SETTINGS[k](self, v, f"{path}.{k}") for k, v in table.items()})

    def device(self, value: object, path: str) -> str:
        if not isinstance(value, str) or not DEVICE.fullmatch(value):
            self.fail(path, f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {_show(value)}")
        return value


_SETTINGS: dict[str, Callable[[_Reader, object, str], Any]] = {
    "device": _Reader.device,
    "data": lambda r, v, p: r.string(v, p, ("real", "synthetic")),
    "max_steps": lambda r, v, p: r.integer(v, p, "[1, inf)"),
    "max_seconds": lambda r, v, p: r.number(v, p, f"(0, {MAX_SECONDS}]"),
    "eval_every": lambda r, v, p: r.integer(v, p, "[1, inf)"),
    "log_every": lambda r, v, p: r.integer(v, p, "[1, inf)"),
    "train_eval_size": lambda r, v, p: r.size(v, p),
    "eval_size": lambda r, v, p: r.size(v, p),
    "diverge_factor": lambda r, v, p: r.number(v, p, "(1, inf)"),
    "stop_at_target": _Reader.boolean,
    "tf32": _Reader.boolean,
    "amp": lambda r, v, p: r.string(v, p, ("off", "bf16")),
    "compile": lambda r, v, p: r.string(v, p, COMPILE_MODES),
    "cudnn_benchmark": _Reader.boolean,
    "count_ops": _Reader.boolean,
    "cuda_graph": _Reader.boolean,
}
"""Converter per :class:`Settings` field: the keys ``[defaults]`` and ``[workloads.*]`` take."""
