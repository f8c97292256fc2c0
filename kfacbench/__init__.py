"""kfacbench: benchmarking and profiling suite for second-order optimizers.

SGD with momentum, K-FAC and SKFAC run on one common training core (``kfacbench.core``); a suite
runner sweeps workloads, batch sizes, inversion intervals, hyperparameters and seeds and records
wall-clock time, loss curves and per-phase step times into parquet tables.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kfacbench")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

# The public contract, for plugins (docs/plugins.md): imported on first use, so that reading the
# version does not import torch.
_PUBLIC = {
    "Method": "kfacbench.core.method",
    "MethodContext": "kfacbench.core.method",
    "MethodSpec": "kfacbench.core.method",
    "HParam": "kfacbench.core.method",
    "Param": "kfacbench.core.method",
    "hparams_from": "kfacbench.core.method",
    "method_spec": "kfacbench.core.method",
    "PhaseTimer": "kfacbench.core.timing",
    "Problem": "kfacbench.core.problem",
    "Splits": "kfacbench.data",
    "Workload": "kfacbench.workloads",
    "count_bytes": "kfacbench.core.memory",
    "STATE_KINDS": "kfacbench.core.memory",
}


def __getattr__(name: str) -> object:
    if name in _PUBLIC:
        from importlib import import_module

        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kfacbench' has no attribute {name!r}")


__all__ = ["__version__", *_PUBLIC]
