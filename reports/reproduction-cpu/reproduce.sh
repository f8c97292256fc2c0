#!/usr/bin/env bash
# Reproduces reports/reproduction-cpu/ on a 2-core CPU in about an hour:
#   bash reports/reproduction-cpu/reproduce.sh [DATA_DIR] [OUT_ROOT]
# DATA_DIR holds olivetti/olivettifaces.mat (FACES) and, where you have them, mnist/ and
# fashion_mnist/ IDX files (Fashion-MNIST is also found in Debian's dataset-fashion-mnist
# package); CURVES is generated. Cells whose files are missing are recorded as errors, and the
# claims table says "not run" with the reason.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
data="${1:-${KFACBENCH_DATA:-$here/../../../shared/data}}"
out="${2:-results/runs}"
suite="$here/../../suites/reproduction_cpu.toml"

# 1. The timed cells (exit 1 when a cell ended in error, e.g. MNIST's missing training files).
kfacbench run "$suite" --data-dir "$data" --out "$out"
rc=$?
[ $rc -le 1 ] || exit $rc
run="$(ls -d "$out"/reproduction_cpu/*/ | sort | tail -n 1)"

# 2. Curvature diagnostics along the paper preset's CURVES run and ResNet-20's K-FAC run
#    (each trained again to its checkpoints: the same core, seed and data as in step 1).
diags=()
for only in "curves_ae kfac bs=500 inv=20 seed=0" "fashion_mnist_resnet20 kfac-fast bs=128 inv=10 seed=0"; do
    kfacbench diagnose "$suite" --only "$only" --data-dir "$data" --out "$out/diagnose" || exit $?
    diags+=("$(ls -d "$out"/diagnose/reproduction_cpu/*/ | sort | tail -n 1)")
done

# 3. The report, opened by the claims table.
kfacbench report "$run" "${diags[@]}" --claims -o "$here"
