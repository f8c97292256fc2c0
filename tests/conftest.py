"""Fixtures shared across test modules."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from kfacbench.core import subnormals
from kfacbench.machine_load import usable_cpus
from kfacbench.optim.peers import kaisa as peers_kaisa

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


KAISA_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "peers" / "kfac-pytorch"
"""KAISA's source next to the repository (repo/../shared), as on CI's fresh clone."""


@pytest.fixture(scope="module")
def kaisa() -> Iterator[ModuleType]:
    """KAISA's ``kfac.preconditioner``, imported as the adapter imports it: installed, or from
    :data:`KAISA_SOURCE` for the requesting module's tests only (the path and the imported
    modules are removed afterwards, so that other tests see the environment as it is)."""
    if importlib.util.find_spec("kfac") is not None:
        yield peers_kaisa._kaisa()
        return
    if not KAISA_SOURCE.is_dir():
        pytest.skip(f"KAISA is not installed and {KAISA_SOURCE} is absent: {peers_kaisa.INSTALL}")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(KAISA_SOURCE))
        try:
            yield peers_kaisa._kaisa()
        finally:
            for name in [n for n in sys.modules if n == "kfac" or n.startswith("kfac.")]:
                del sys.modules[name]
