"""How much a few kernels pay for subnormal inputs on this CPU, one thread, flush on and off.

    python results/cpu/amd-epyc/2026-12-07/subnormal_ops.py

Each mode runs in a fresh process (the flag must be set before the first kernel: see
``kfacbench.core.subnormals``). Prints one Markdown row per kernel: ms per call on normal inputs
(1.0) and on subnormal ones (1e-39; for matmul, inputs whose products are subnormal), median of
5 repeats of 20 calls on 4M elements (matmul: 512 × 512).
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import statistics, sys, time, torch
torch.set_num_threads(1)
torch.set_flush_denormal(sys.argv[1] == "1")
n = 1 << 22
def ms(f, x):
    f(x)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(20):
            f(x)
        runs.append((time.perf_counter() - t) / 20 * 1e3)
    return statistics.median(runs)
normal, tiny = torch.full((n,), 1.0), torch.full((n,), 1e-39)
b = torch.full((512, 512), 1e-20)
kernels = {
    "x * 0.5": (lambda x: x * 0.5, normal, tiny),
    "x + x": (lambda x: x + x, normal, tiny),
    "exp": (torch.exp, normal, tiny),
    "sigmoid": (torch.sigmoid, normal, tiny),
    "matmul 512": (lambda x: x @ x, torch.ones(512, 512), b),
}
for name, (f, a, s) in kernels.items():
    print(f"{name}\\t{ms(f, a):.2f}\\t{ms(f, s):.2f}")
"""


def measure(flush: bool) -> dict[str, tuple[str, str]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if flush else "0"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = (line.split("\t") for line in out.strip().splitlines())
    return {name: (normal, tiny) for name, normal, tiny in rows}


if __name__ == "__main__":
    kept, flushed = measure(False), measure(True)
    print("| kernel | normal, kept (ms) | subnormal, kept | normal, flushed | subnormal, flushed |")
    print("|---|---|---|---|---|")
    for name in kept:
        print(f"| {name} | {' | '.join(kept[name])} | {' | '.join(flushed[name])} |")
