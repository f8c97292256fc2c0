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

__all__ = ["__version__"]
