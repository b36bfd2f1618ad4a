#!/usr/bin/env bash
# The device checks for issue 13, as one short script (about 8 minutes on one GPU):
# the torch fused-path tests on the GPU, then the optimizer-step benchmark for the
# many-groups and few-groups models on torch and JAX, and torch's native AdamW.
# Results land in ${OUT:-benchmarks/results/gpu}. Not run yet: no GPU in this task.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export TF_CPP_MIN_LOG_LEVEL=3
KERAS_BACKEND=torch timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider \
    tests/test_torch_backend.py -k "one_fused_update or lr_mult_zero or scheduled_multiplier or bit_identical" \
    2>&1 | tail -5 | tee "$OUT_DIR/tests.txt"
timeout 300 "$PY" -m benchmarks.run --backends torch jax --quick --models tfm_pv conv \
    --contenders plain layerlr multi torch_native --output-dir "$OUT_DIR" \
    --note "GPU check, issue 13" 2>&1 | tail -40 | tee "$OUT_DIR/summary.txt"
