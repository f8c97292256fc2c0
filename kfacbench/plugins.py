"""Methods and workloads from outside the package: a user benchmarks their own without forking.

Three ways in, each registered with its origin (``kfacbench list`` shows it):

- **any torch.optim.Optimizer by import path**, in a suite: ``[optimizers.lion]`` with
  ``class = "lion_pytorch:Lion"`` (or ``"my_opt.py:MyOpt"``, a file beside the suite). Its scalar
  keyword arguments (bool, int, float, str defaults) are its hyperparameters, validated against its
  signature; it runs on the same core and is timed by the same clock (forward, backward, update).
- **plugin files**: a Python file that defines ``METHODS`` (a list of
  :class:`~kfacbench.core.method.MethodSpec`, e.g. from :func:`~kfacbench.core.method.method_spec`)
  and/or ``WORKLOADS`` (a list of :class:`~kfacbench.workloads.Workload`), named by
  ``kfacbench run --plugin FILE`` or by a suite's ``plugins = ["file.py"]`` (paths relative to the
  suite).
- **entry points** of installed packages, in the groups ``kfacbench.methods`` and
  ``kfacbench.workloads``: each names a spec, a workload, a list of them, or a function returning
  one of those (``examples/plugin/`` is such a package).

A name already registered by another origin is an error naming both; so is any failure inside a
plugin, in one line that names the plugin.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kfacbench.core.method import HParam, HParamValue, MethodContext, MethodSpec
from kfacbench.core.problem import Problem
from kfacbench.errors import KfacbenchError
from kfacbench.optim import METHODS
from kfacbench.optim.peers.torch_optimizer import TorchOptimizer
from kfacbench.workloads import WORKLOADS, Workload

GROUPS = {"methods": "kfacbench.methods", "workloads": "kfacbench.workloads"}
"""The entry-point groups installed packages register in."""

_LOADED: set[str] = set()  # plugin origins already loaded (loading is idempotent)


def register(item: MethodSpec | Workload) -> None:
    """Add a method or workload to its registry; the same object again is a no-op.

    Raises:
        KfacbenchError: the name is taken by another origin.
    """
    registry: dict[str, Any] = METHODS if isinstance(item, MethodSpec) else WORKLOADS
    kind = "optimizer" if isinstance(item, MethodSpec) else "workload"
    taken = registry.get(item.name)
    if taken is not None and taken is not item and taken.origin != item.origin:
        raise KfacbenchError(
            f"{kind} {item.name!r} from {item.origin} is already registered by {taken.origin}"
        )
    registry[item.name] = item


def _items(value: object, origin: str) -> list[MethodSpec | Workload]:
    """What a plugin exported: a spec, a workload, a list of them, or a function returning one."""
    if callable(value) and not isinstance(value, MethodSpec | Workload | type):
        value = value()
    values = [value] if isinstance(value, MethodSpec | Workload) else value
    if not isinstance(values, Iterable) or isinstance(values, str | bytes):
        raise KfacbenchError(
            f"plugin {origin}: expected MethodSpec or Workload objects, got {value!r}"
        )
    items = list(values)
    for item in items:
        if not isinstance(item, MethodSpec | Workload):
            raise KfacbenchError(
                f"plugin {origin}: {item!r} is neither a MethodSpec nor a Workload"
            )
    return items


def _stamped(item: MethodSpec | Workload, origin: str) -> MethodSpec | Workload:
    """``item`` with its origin set (a plugin's own objects say ``kfacbench`` by default)."""
    return item if item.origin != "kfacbench" else replace(item, origin=origin)


def load_entry_points() -> None:
    """Register the methods and workloads of every installed package's entry points (once)."""
    for group in GROUPS.values():
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist
            origin = f"entry point {ep.name} ({dist.name} {dist.version})" if dist else ep.value
            if origin in _LOADED:
                continue
            try:
                exported = ep.load()
                items = _items(exported, origin)
            except KfacbenchError:
                raise
            except Exception as exc:  # a plugin's own failure: one line naming it
                raise KfacbenchError(f"plugin {origin}: {type(exc).__name__}: {exc}") from None
            for item in items:
                register(_stamped(item, origin))
            _LOADED.add(origin)


def load_file(path: Path) -> list[MethodSpec | Workload]:
    """Import the plugin file ``path`` and register its ``METHODS`` and ``WORKLOADS``.

    Raises:
        KfacbenchError: a missing file, an error while importing it, or neither list defined.
    """
    origin = f"plugin {path}"
    try:
        module = load_module(path)
    except ValueError as exc:
        raise KfacbenchError(f"{origin}: {exc}") from None
    found = [getattr(module, key) for key in ("METHODS", "WORKLOADS") if hasattr(module, key)]
    if not found:
        raise KfacbenchError(f"{origin}: defines neither METHODS nor WORKLOADS")
    items = [item for value in found for item in _items(value, origin)]
    for item in items:
        register(_stamped(item, origin))
    return items


# ------------------------------------------------------------------ torch.optim by import path


def _provenance(cls: type, path: str) -> dict[str, str]:
    """The ``method_info`` of an optimizer named by import path: it and its package's version."""
    top = cls.__module__.split(".")[0]
    try:
        version = importlib.metadata.version(top)
    except importlib.metadata.PackageNotFoundError:
        version = str(getattr(sys.modules.get(top), "__version__", ""))
    return {"class": path, "version": version}


def import_object(path: str, base_dir: Path | None) -> Any:
    """``"module:attr"`` or ``"file.py:attr"`` (relative to ``base_dir``) → the object.

    Raises:
        ValueError: a malformed path, or the module or attribute cannot be imported (the
            message says which; callers prefix the key path).
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:Class' or 'file.py:Class', got {path!r}")
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file
        module = load_module(file)
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ValueError(
                f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
            ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_module(file: Path) -> Any:
    """Import a Python file as a module (once per path)."""
    if not file.is_file():
        raise ValueError(f"no such file: {file}")
    name = f"kfacbench_user_{abs(hash(str(file.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ValueError(f"not a Python file: {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ValueError(f"importing {file}: {type(exc).__name__}: {exc}") from None
    return module


def _scalar_default(arg: inspect.Parameter) -> HParamValue | None:
    """A keyword argument's default as a hyperparameter value (None: not a scalar one). An int
    default of an argument annotated float (``momentum: float = 0``) is a float: a suite's 0.9
    must pass."""
    default = arg.default
    if isinstance(default, bool | str | float):
        return default
    if isinstance(default, int):
        return float(default) if "float" in str(arg.annotation) else default
    return None


def optimizer_spec(name: str, path: str, base_dir: Path | None, origin: str) -> MethodSpec:
    """The registry entry of the torch.optim.Optimizer at import path ``path``: its scalar
    keyword arguments are the hyperparameters (their defaults from its signature).

    Raises:
        ValueError: it cannot be imported, or is not a torch.optim.Optimizer subclass.
    """
    cls = import_object(path, base_dir)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"{path!r} is not a torch.optim.Optimizer subclass")
    hparams: dict[str, HParam] = {}
    for arg in list(inspect.signature(cls).parameters.values())[1:]:  # after params
        if arg.kind not in (arg.POSITIONAL_OR_KEYWORD, arg.KEYWORD_ONLY):
            continue
        default = _scalar_default(arg)
        if default is not None:
            hparams[arg.name] = HParam(default, f"{cls.__name__}({arg.name}=...)")

    def build(problem: Problem, hp: Mapping[str, Any], ctx: MethodContext) -> TorchOptimizer:
        if ctx.dist is not None:
            raise KfacbenchError(f"{path} runs on one process (no --nproc)")
        return TorchOptimizer(problem, lambda params: cls(params, **hp), _provenance(cls, path))

    summary = (inspect.getdoc(cls) or cls.__name__).splitlines()[0]
    return MethodSpec(name, summary, hparams, False, build, origin=origin)
