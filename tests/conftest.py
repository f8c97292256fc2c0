"""Fixtures shared across test modules."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from kfacbench.core import subnormals
from kfacbench.machine_load import usable_cpus

# The linear-algebra probe's cache (inverse_method = "auto") of this session, never the user's;
# the CLI tests' subprocesses inherit it.
os.environ.setdefault("KFACBENCH_CACHE", tempfile.mkdtemp(prefix="kfacbench-cache-"))

# As every kfacbench entry point does, before the session's first kernel starts the CPU threads.
subnormals.apply()

SPIN = "import sys\nsys.stdout.write('go\\n')\nsys.stdout.flush()\nwhile True: pass\n"


@pytest.fixture
def spinners() -> Iterator[int]:
    """As many busy-looping child processes as usable CPUs (at most 4), already spinning."""
    n = min(usable_cpus(), 4)
    procs = [
        subprocess.Popen([sys.executable, "-S", "-c", SPIN], stdout=subprocess.PIPE)
        for _ in range(n)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == b"go\n"
        yield n
    finally:
        for p in procs:
            p.kill()
            p.wait()
