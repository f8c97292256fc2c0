"""Everything about devices in one place: which device a cell runs on, the CUDA libraries' warm-up
and cuDNN's tuning off the clock, synchronisation, out-of-memory failures and the device's name.

The core times work on CPUs and CUDA GPUs alike; what differs between them (lazy CUDA
initialisation, asynchronous kernels, cuDNN's autotuner, one GPU per process in a data-parallel
run) is handled here, so that the loop, the runner and the run records do not each carry a
branch of their own.
"""

from __future__ import annotations

import math
import platform
import re
from pathlib import Path

import torch
from torch.func import functional_call, jvp

from kfacbench.core.problem import Problem
from kfacbench.distributed import Dist
from kfacbench.errors import KfacbenchError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KfacbenchError(f"device {spec!r} requested but CUDA is not available here")
    return device


def dist_device(device: torch.device, dist: Dist) -> torch.device:
    """This rank's device: ``cuda:<local rank>`` for a CUDA cell (one GPU per process)."""
    if device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_WARM: set[torch.device] = set()


def warm_up(device: torch.device) -> None:
    """Initialise the CUDA libraries once per process and device, off the clock.

    The first cell of a process would otherwise time CUDA's lazy module loading and the creation
    of the cuBLAS, cuSOLVER and cuDNN handles (and torch.func's first JVP) in its first steps: its
    time-to-target would depend on where it stands in the suite. Tiny calls of each library are
    enough; nothing of the cell is touched (its trajectory stays the same). A no-op on CPU.
    """
    if device.type != "cuda" or device in _WARM:
        return
    # Fixed values, no random draws: the global RNG streams stay as they were.
    a = torch.linspace(-1.0, 1.0, 256, device=device).reshape(16, 16)
    spd = a @ a.T + 16 * torch.eye(16, device=device)
    torch.linalg.eigh(spd)
    torch.linalg.cholesky_ex(spd)
    torch.linalg.solve_ex(spd, a)
    torch.linalg.inv_ex(spd)
    image = torch.linspace(0.0, 1.0, 384, device=device).reshape(2, 3, 8, 8)
    torch.nn.functional.conv2d(image, image[:1].expand(4, 3, 8, 8)[..., :3, :3], padding=1)
    jvp(lambda t: t.tanh() @ a, (a,), (a,))
    torch.cuda.synchronize(device)
    _WARM.add(device)


def tune_convolutions(problem: Problem, x: torch.Tensor, y: torch.Tensor) -> None:
    """With ``cudnn.benchmark`` on, let cuDNN pick its algorithms for the cell's shapes off the
    clock: one forward and backward pass of the training batch's shape on copies of the
    parameters and buffers (the cell's state, BatchNorm statistics included, is untouched;
    capture hooks record nothing outside a K-FAC step). Otherwise the first timed steps would
    carry the tuning. A no-op without a convolution, off CUDA or with the setting off.
    """
    model = problem.model
    if x.device.type != "cuda" or not torch.backends.cudnn.benchmark:
        return
    if not any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules()):
        return
    params = {
        n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()
    }
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with problem.precision(x.device):
        output = functional_call(model, (params, buffers), (x,))
    loss = problem.loss(output.float(), y)
    torch.autograd.grad(loss, [p for p in params.values() if p.requires_grad])
    torch.cuda.synchronize(x.device)


_OOM_TEXTS = ("out of memory", "can't allocate memory", "not enough memory")
"""How torch's allocators say it: CUDA's ``torch.OutOfMemoryError`` ("CUDA out of memory"; cuBLAS
and cuDNN say "out of memory" too), and the CPU allocator's plain ``RuntimeError``
("DefaultCPUAllocator: can't allocate memory", before torch 2.1 "not enough memory")."""

_REQUEST = re.compile(
    r"tried to allocate (\d+(?:\.\d+)?) ?(bytes|KiB|MiB|GiB|TiB)", flags=re.IGNORECASE
)
_UNITS = {"bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def is_oom(exc: BaseException) -> bool:
    """Whether a failed cell ran out of memory, on the device or the host (its status is
    ``oom``)."""
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(t in text for t in _OOM_TEXTS)
    )


def oom_request_mb(message: str) -> float:
    """The allocation that did not fit, in MiB, read from torch's out-of-memory message: CUDA's
    caching allocator's "Tried to allocate 1.50 GiB" (two decimals), the CPU allocator's "you
    tried to allocate 123456 bytes". NaN where the message names no size (a library's own "out of
    memory")."""
    match = _REQUEST.search(message)
    if match is None:
        return math.nan
    return float(match.group(1)) * _UNITS[match.group(2).lower()] / 2**20


def device_name(device: torch.device) -> str:
    """A human name for the device (GPU model, or the CPU model from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
