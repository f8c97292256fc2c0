#!/usr/bin/env bash
# Copy the peers' pure-Python packages (ASDL, SINGD with einops and einconv, pytorch-optimizer:
# the `peers` extra; KAISA from ../shared/peers) into .carry/peers, with their dist-info
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
# KAISA (kfac-pytorch) is not on the package index: carry the unmodified source beside this
# repository (../shared/peers/kfac-pytorch) with its dist-info, where it is.
kaisa=../shared/peers/kfac-pytorch
if [ -d "$kaisa/kfac" ]; then
    cp -r "$kaisa/kfac" "$kaisa"/kfac_pytorch-*.dist-info .carry/peers/
    find .carry/peers/kfac -name __pycache__ -prune -exec rm -rf {} +
    echo "kfac-pytorch (KAISA): kfac"
else
    echo "kfac-pytorch (KAISA) not found at $kaisa: the peers suite's kaisa-kfac cells will" \
        "end as errors" >&2
fi
du -sh .carry/peers
