"""Out-of-memory failures: recognised from torch's own exceptions, with the size that did not
fit read from their messages."""

from __future__ import annotations

import math

import pytest
import torch

from kfacbench.core.device import is_oom, oom_request_mb

CUDA_MESSAGES = {
    # torch 2.x's caching allocator (as a GPU run printed it)
    "CUDA out of memory. Tried to allocate 170.00 MiB. GPU 0 has a total capacity of 31.37 GiB"
    " of which 73.81 MiB is free. Including non-PyTorch memory, this process has 31.29 GiB"
    " memory in use.": 170.0,
    # torch 1.x's
    "CUDA out of memory. Tried to allocate 1.50 GiB (GPU 0; 15.78 GiB total capacity; 12.15 GiB"
    " already allocated; 1.02 GiB free; 13.20 GiB reserved in total by PyTorch)": 1536.0,
    "CUDA out of memory. Tried to allocate 512.00 KiB. GPU 0 has a total capacity": 0.5,
    "CUDA out of memory. Tried to allocate 1024 bytes. GPU 0": 1024 / 2**20,
}


@pytest.mark.parametrize(("message", "mib"), list(CUDA_MESSAGES.items()))
def test_the_cuda_request_is_read_from_the_message(message: str, mib: float) -> None:
    assert is_oom(torch.OutOfMemoryError(message))
    assert oom_request_mb(message) == mib


def test_a_real_host_allocation_failure_is_out_of_memory_with_its_size() -> None:
    """1 EiB: beyond any machine's address space, so the CPU allocator refuses it at once."""
    with pytest.raises(RuntimeError) as failed:
        torch.empty(2**60, dtype=torch.uint8)
    assert "DefaultCPUAllocator" in str(failed.value)
    assert is_oom(failed.value)
    assert oom_request_mb(str(failed.value)) == 2**40
    old = (
        "DefaultCPUAllocator: not enough memory: you tried to allocate 3145728 bytes."  # torch 2.0
    )
    assert is_oom(RuntimeError(old)) and oom_request_mb(old) == 3.0


def test_other_failures_are_not_out_of_memory() -> None:
    assert not is_oom(ValueError("out of memory"))  # not torch's
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))  # a library's: no size
    assert math.isnan(oom_request_mb("CUDA error: out of memory"))
