#!/usr/bin/env bash
# One call on a GPU machine that installs nothing (README, "A first run on a GPU machine").
#
#   bash examples/gpu/device-run.sh [--device cuda|cuda:N|cpu] [--out DIR] [--only PATTERN]
#                                   [--budget SECONDS] [--suites "NAME ..."] [--doctor PATTERN]
#                                   [--suite-limit SECONDS]
#
# Runs kfacbench from this working tree (PYTHONPATH, no pip) with the machine's python3 (torch
# >= 2.4; pandas, pyarrow, seaborn, rich, pytest): the environment, `kfacbench doctor`, the tests
# with CUDA-only paths, the kfac_speed, skfac_speed, peers and compile_gpu suites, and a report
# of the four runs. Every stage has its own time limit and a failed stage does not stop the next;
# on an H200 a call of the four suites took 288 s, compile_gpu's 61 s up to its crash included
# (results/gpu/nvidia-h200/2026-11-30/). Results go to DIR (default $OUT, else results/gpu/<time>):
# log.txt, doctor.parquet, cells.parquet (the four suites' cells) and device-run.tar.gz (every
# table, trace and the report), so that a machine that returns at most a few files returns all.
# `--device cpu` runs the same code path minus the CUDA checks (a dry run); `--only` restricts
# the suites' cells (a glob on labels, e.g. '*kfac-fast*'). `--budget` caps the whole script:
# each stage's limit shrinks to what is left (less 30 s to pack the results) and a stage with
# under 20 s left is skipped, so a call with a hard time limit still returns every file.
# `--suites` replaces the four suites (e.g. "kfac_gpu graph_gpu modern_speed": issue 28's
# figures). `--doctor` restricts the doctor to the checks matching a glob (e.g. 'linalg*': the
# linear-algebra probe alone, whose rows come back as linalg.parquet). `--suite-limit` is each
# suite's own time limit (default 150 s; gpu_scale's 39 big-model cells want more). The peers
# need their packages: examples/gpu/carry-peers.sh copies them to .carry/peers.
# Set KFACBENCH_COMMIT to the commit the working tree is (commit first): git in the device's copy
# reads that copy's own history, so without it the runs record some other commit or `-dirty`.
# The log names folders from the working tree and from `device-run/` on: no path of the machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
device=cuda
out="${OUT:-results/gpu/$(date +%Y%m%d-%H%M%S)}"
only=()
budget=0
suites=(kfac_speed skfac_speed compile_gpu peers)
doctor_only=()
suite_limit=150
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --only) only=(--only "$2"); shift 2 ;;
        --budget) budget="$2"; shift 2 ;;
        --suites) read -r -a suites <<< "$2"; shift 2 ;;
        --doctor) doctor_only=(--only "$2"); shift 2 ;;
        --suite-limit) suite_limit="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "device-run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${KFACBENCH_COMMIT:-}" ] || echo "device-run.sh: KFACBENCH_COMMIT is not set; the runs" \
    "record what git reads in this copy of the tree, not the commit it is" >&2
# The peers' packages are pure Python: examples/gpu/carry-peers.sh puts them in .carry/peers.
[ -d .carry/peers ] && export PYTHONPATH="$PYTHONPATH:$PWD/.carry/peers"
py="${PYTHON:-python3}"
work="$(mktemp -d)/device-run"
mkdir -p "$work" "$out"
log="$out/log.txt"
: > "$log"
failed=()

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, note a failure
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    if [ "$budget" -gt 0 ]; then
        local left=$((budget - 30 - SECONDS))
        if [ "$left" -lt 20 ]; then
            echo "=== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$log"
            failed+=("$name (skipped: budget)")
            return
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
    [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
}

stage environment 60 "$py" -c '
import torch, kfacbench, pandas, pyarrow
print("pandas", pandas.__version__, "pyarrow", pyarrow.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          "cudnn", torch.backends.cudnn.version(), "devices", torch.cuda.device_count())
print("fp32 matmul precision", torch.get_float32_matmul_precision(), "threads", torch.get_num_threads())
print("kfacbench", kfacbench.__version__, kfacbench.__file__)'
stage doctor 240 "$py" -m kfacbench doctor --device "$device" --out "$work/doctor" "${doctor_only[@]}"
cp "$work/doctor/doctor.parquet" "$work/doctor/linalg.parquet" "$out/" 2>/dev/null
# Graphed steps must follow the eager trajectory before their timings mean anything.
stage graph-tests 60 "$py" -m pytest -q -rs -p no:cacheprovider tests/core/test_graphs.py
runs=()
for suite in "${suites[@]}"; do
    stage "$suite" "$suite_limit" "$py" -m kfacbench run "$suite" --device "$device" --out "$work/runs" "${only[@]}"
    latest="$(ls -d "$work/runs/$suite"/*/ 2>/dev/null | sort | tail -n 1)"
    # A suite cut off by its limit keeps its finished cells in parts/ (read back below).
    [ -n "$latest" ] && ls "$latest"parts/* > /dev/null 2>&1 && runs+=("$latest")
done
if [ ${#runs[@]} -gt 0 ]; then
    stage report 120 "$py" -m kfacbench report "${runs[@]}" -o "$work/report"
    "$py" -c '
import sys, pandas as pd
from pathlib import Path
from kfacbench.runs.rundir import load_tables
frames = [load_tables(Path(r), {"cells": ()})["cells"] for r in sys.argv[2:]]
pd.concat(frames, ignore_index=True).to_parquet(sys.argv[1])' "$out/cells.parquet" "${runs[@]}" \
        >> "$log" 2>&1
fi
# The other tests that have CUDA-only paths (skipped on CPU; here they run), after the suites and
# their report: a call with a tight budget returns its measurements first.
mapfile -t cuda_tests < <(grep -rl "needs CUDA" tests | grep -v test_graphs.py)
stage cuda-tests 150 "$py" -m pytest -q -rs -p no:cacheprovider "${cuda_tests[@]}"
# The temporary folder and the working tree are this machine's: the log keeps what follows them.
sed -i -e "s|$(dirname "$work")/||g" -e "s|$PWD/||g" "$log"
tar -czf "$out/device-run.tar.gz" -C "$(dirname "$work")" device-run
echo "=== done: ${#failed[@]} failed stage(s)${failed[*]:+: ${failed[*]}}" | tee -a "$log"
[ ${#failed[@]} -eq 0 ]
