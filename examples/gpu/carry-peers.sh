#!/usr/bin/env bash
# Copy the peers' pure-Python packages (ASDL, SINGD with einops and einconv, pytorch-optimizer:
# the `peers` extra) from this machine's environment into .carry/peers, with their dist-info
# (kfacbench records their versions), for a GPU machine that installs nothing:
# examples/gpu/device-run.sh puts .carry/peers on PYTHONPATH when it exists. Send the folder
# with the run (the device tool's carry: [".carry"]; .gitignore keeps it out of commits).
#
#   bash examples/gpu/carry-peers.sh        # PYTHON=... to read another environment
set -euo pipefail
cd "$(dirname "$0")/../.."
py="${PYTHON:-.venv/bin/python}"
rm -rf .carry/peers
"$py" - .carry/peers <<'PY'
import importlib.metadata as md
import shutil
import sys
from pathlib import Path

dest = Path(sys.argv[1])
for name in ("asdfghjkl", "singd", "einops", "einconv", "pytorch_optimizer"):
    dist = md.distribution(name)
    tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
    for top in sorted(tops):
        src = Path(str(dist.locate_file(top)))
        if src.is_dir():
            shutil.copytree(src, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.suffix == ".py":
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / top)
    print(f"{name} {dist.version}: {', '.join(sorted(tops))}")
PY
du -sh .carry/peers
