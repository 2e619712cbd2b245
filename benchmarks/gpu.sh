#!/usr/bin/env bash
# The README's GPU column: the CUDA tests, then the three benchmarks, on one CUDA GPU.
#
#   bash benchmarks/gpu.sh [OUTDIR]      # default benchmarks/out/gpu
#
# Needs a CUDA build of torch, geoopt, geotorch, pytest and hypothesis. Each output goes to
# OUTDIR/<name>.txt; a failing step does not stop the later ones (the exit status is the
# number of failed steps).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0
step() {  # step NAME COMMAND...
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.txt" || failed=$((failed + 1))
}
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' | tee "$out/env.txt"
step tests python3 -m pytest -q -p no:cacheprovider tests/test_device.py
step orthogonal_expm python3 benchmarks/orthogonal_expm.py --device cuda --sizes 64 256 1024 4096
step rnn_step python3 benchmarks/rnn_step.py --device cuda --rounds 21 --no-uncached
step float32_drift python3 benchmarks/float32_drift.py --device cuda
exit $failed
