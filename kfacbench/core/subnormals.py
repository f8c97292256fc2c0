"""Subnormal floats on the CPU: flush them to zero in the processes that train, and read whether
they are flushed.

Why: an x86 core takes a microcode assist, tens to hundreds of cycles, for every float32 operand
or result below 2**-126 in magnitude. Training makes such values: saturated logistic units of an
autoencoder give tiny activations and back-propagated errors, and momentum buffers decay towards
zero. A CPU step time then measures how many of them a run happens to produce, not the optimizer:
curves_ae at batch 500, four SGD settings with the same shapes, took 134-243 ms a step; with the
flush, 14.2-14.6 ms, with the same losses to four digits. The stall differs per method (its own
matrices hold subnormals too), so every CPU ratio between methods moved, not only the absolute
times. GPUs process subnormals at full speed, and TensorFlow's CPU runtime flushes them by
default; PyTorch does not, so every kfacbench process that trains or times does, unless
``$KFACBENCH_FLUSH_DENORMAL`` is ``0`` (to measure the stall itself).

It is a process setting, not a cell's: ``torch.set_flush_denormal`` sets the flush-to-zero and
denormals-are-zero bits of the calling thread only, and the intra-op (OpenMP) threads copy them
from it when they are created, at the first parallel kernel, and never again. So each entry point
(the command line, a submitit job, the test session) calls :func:`apply` before any torch work,
and each cell records what :func:`flushing` measures on every thread, which is ``False`` on a CPU
that cannot flush or in a process whose threads started before the setting.
"""

from __future__ import annotations

import os

import torch

from kfacbench.errors import KfacbenchError

ENV = "KFACBENCH_FLUSH_DENORMAL"
"""``1`` (the default) flushes subnormal floats in kfacbench's processes, ``0`` keeps them;
child processes (torchrun workers, A/B passes, cluster jobs) inherit it."""

SMALLEST_NORMAL = 2.0**-126
"""The smallest normal float32: half of it is subnormal."""

_GRAIN = 32_768
"""Elements per thread below which ATen runs an elementwise kernel on one thread (its
``at::internal::GRAIN_SIZE``): the probe gives every intra-op thread at least twice this."""


def set_flush(enabled: bool) -> bool:
    """Flush subnormal floats to zero in this process's CPU arithmetic (or stop flushing).

    Returns whether this CPU supports the setting (x86 with SSE3's DAZ bit, or Arm's FZ).
    """
    return bool(torch.set_flush_denormal(enabled))


def flushing() -> bool:
    """Whether CPU arithmetic in this process flushes subnormal float32 values to zero now.

    Measured, not remembered: halves the smallest normal float32 on every intra-op thread (a
    kernel of ``2 × grain × threads`` elements) and checks that every result is zero. A few
    milliseconds; call it outside timed regions.
    """
    n = 2 * _GRAIN * max(torch.get_num_threads(), 1)
    with torch.no_grad():
        halves = torch.full((n,), SMALLEST_NORMAL, dtype=torch.float32) * 0.5
        return bool((halves == 0).all())


def wanted() -> bool:
    """The flush setting of ``$KFACBENCH_FLUSH_DENORMAL`` (on when unset).

    Raises:
        KfacbenchError: a value other than 1/0, true/false, yes/no, on/off.
    """
    value = os.environ.get(ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise KfacbenchError(f"{ENV}={value!r}: expected 1 (flush subnormal floats) or 0 (keep them)")


def apply() -> bool:
    """Apply :func:`wanted` to this process; return whether this CPU supports the setting.

    Call it before the process's first parallel kernel (see the module docstring).
    """
    return set_flush(wanted())


def mismatch() -> str:
    """Why this process does not follow :func:`wanted` (for a warning when it does not)."""
    if wanted():
        return (
            "subnormal floats are not flushed on every CPU thread of this process (the CPU"
            " cannot, or its threads started before the setting: call"
            " kfacbench.core.subnormals.apply() before any torch work); its step times include"
            " their stalls, and its cells record flush_denormal = False"
        )
    return (
        f"subnormal floats are flushed although {ENV}=0 (this process's threads started while"
        " flushing); its cells record flush_denormal = True"
    )
