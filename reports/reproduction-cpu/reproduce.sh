#!/usr/bin/env bash
# Re-measures reports/reproduction-cpu/ on a 2-core CPU, alone (about 75 min for the suite and
# 20 min for the diagnostics), from the repository root, at a clean commit:
#   bash reports/reproduction-cpu/reproduce.sh MACHINE [DATA_DIR]
# MACHINE names the folder the runs are published in, results/cpu/MACHINE/<today>/ (e.g.
# amd-epyc). DATA_DIR (relative, default ../shared/data) holds olivetti/olivettifaces.mat
# (FACES); Fashion-MNIST is found in Debian's dataset-fashion-mnist package; CURVES is
# generated. Commit the new run folders, then the report: its header records the command that
# rebuilds it from them (`kfacbench rebuild reports/reproduction-cpu`).
set -euo pipefail
machine="${1:?usage: reproduce.sh MACHINE [DATA_DIR]}"
data="${2:-../shared/data}"
out="results/cpu/$machine/$(date -u +%F)"
suite="suites/reproduction_cpu.toml"
[ -z "$(git status --porcelain --untracked-files=no)" ] || {
    echo "reproduce.sh: the tree has uncommitted changes; a published run needs a clean commit" >&2
    exit 2
}

latest() { ls -d "$1"/*/ | sort | tail -n 1 | sed 's:/$::'; }

# 1. The timed cells: every cell stops at the target or at its budget.
kfacbench run "$suite" --data-dir "$data" --out "$out"
run="$(latest "$out/reproduction_cpu")"

# 2. Curvature diagnostics along the paper preset's CURVES cells and ResNet-20's K-FAC cells,
#    3 seeds each (each trained again to its checkpoints: the same core, seeds and data).
diags=()
for only in "curves_ae kfac bs=500 inv=20 seed=*" "fashion_mnist_resnet20 kfac-fast bs=128 inv=10 seed=*"; do
    kfacbench diagnose "$suite" --only "$only" --data-dir "$data" --out "$out/diagnose"
    diags+=("$(latest "$out/diagnose/reproduction_cpu")")
done

# 3. The report, opened by the claims table.
kfacbench report "$run" "${diags[@]}" --claims -o reports/reproduction-cpu
