"""The machine and source a run comes from: versions, device names, the git commit, helper
commands' output (``env.json`` of a run, the doctor's environment check, regress's machine kind).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kfacbench
from kfacbench.core import subnormals
from kfacbench.core.device import device_name, synchronize
from kfacbench.errors import KfacbenchError


def command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    """First line of a helper command's output, or ``None`` if it is absent or fails."""
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else None


COMMIT_ENV = "KFACBENCH_COMMIT"
"""Names the commit a run is made from where git cannot read it: a machine that gets a copy of
the working tree (a lent GPU, a cluster's staging folder) has the copy's history or none, so git
there reads some other commit, or ``-dirty`` for the carried files."""

_COMMIT = re.compile(r"[0-9a-f]{7,40}(-dirty)?")


def git_commit() -> str | None:
    """The commit of the kfacbench source tree (with ``-dirty`` if modified), if in git, or the
    one ``$KFACBENCH_COMMIT`` names.

    Raises:
        KfacbenchError: ``$KFACBENCH_COMMIT`` is set but is not 7 to 40 hex digits.
    """
    named = os.environ.get(COMMIT_ENV, "").strip()
    if named:
        if not _COMMIT.fullmatch(named):
            raise KfacbenchError(
                f"{COMMIT_ENV}={named!r}: expected a commit (7 to 40 lowercase hex digits)"
            )
        return named
    src = Path(kfacbench.__file__).resolve().parent.parent
    return command_output(["git", "describe", "--always", "--dirty", "--abbrev=12"], src)


def environment(device: torch.device) -> dict[str, Any]:
    """Metadata that makes a result interpretable later (written as ``env.json``)."""
    env: dict[str, Any] = {
        "device_kind": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "driver_version": None,
        "kfacbench_version": kfacbench.__version__,
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # This process's CPU threads flush subnormal floats (measured: core.subnormals).
        "flush_denormal": subnormals.flushing(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver_version"] = command_output(query)
    return env


GEMM_SIZE = {"cpu": 1024, "cuda": 8192}
"""n of the n×n GEMM that measures a device's rate: large enough to run near the device's peak
(on the 2-core CPU, 1024 reaches within 10% of 2048's rate in a seventh of the time), small
enough to add well under a second to a run."""
GEMM_REPEATS = 5


def gemm_gflops(
    device: torch.device,
    n: int | None = None,
    repeats: int = GEMM_REPEATS,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """The device's measured float32 matrix-product rate: 2n³ FLOPs over the median time of
    ``repeats`` n×n products after one untimed one, TF32 off (the precision of K-FAC's own
    arithmetic and of cells with ``tf32 = false``). What each phase's achieved GFLOP/s is held
    against: a phase near it runs at the hardware's limit, one far below is latency or a
    slower kernel (a factorisation). Inputs come from a private generator: the global random
    stream the cells draw from is left as it was."""
    n = n or GEMM_SIZE.get(device.type, GEMM_SIZE["cpu"])
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.rand(n, n, generator=gen, device=device) for _ in range(2))
    out = torch.empty(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = clock()
            torch.mm(a, b, out=out)
            synchronize(device)
            times.append(clock() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2.0 * n**3 / statistics.median(times) / 1e9
