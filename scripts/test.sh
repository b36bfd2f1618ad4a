#!/usr/bin/env bash
# Sets up .venv and runs the tests: everything on TensorFlow (the default
# backend), and the backend-sensitive files on JAX and torch, each backend in
# its own process (KERAS_BACKEND is fixed at import time).
#   bash scripts/test.sh                        # what CI runs
#   FULL=1 bash scripts/test.sh                 # every file on every backend, slow tests too
#   BACKENDS=jax bash scripts/test.sh -k saving # extra args go to pytest
#   WORKERS=1 bash scripts/test.sh              # one pytest process (default: one per core)
# Then Keras' own optimizer tests through the wrapper: all of them on
# TensorFlow (tests/test_keras_suite.py), a slice on JAX and torch here (all
# with FULL=1; scripts/keras_suite.sh runs all of them everywhere; skipped
# with extra args or KERAS_SUITE=0).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch is pinned: 2.13.0 is the CPU wheel available offline on our machines.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -e ".[tf-cpu,jax,test]" "torch==2.13.0"
# keras-hub without its dependencies: it requires tensorflow-text, which pulls
# the full tensorflow wheel next to tensorflow-cpu. The backbones the tests
# build from configs need only these two at import.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
    "keras-hub==0.32.0" "regex>=2023" "tokenizers>=0.20"

# Files whose behaviour depends on the backend; the rest (rule resolution,
# reporting, interop, doctests) is backend-neutral and runs on TensorFlow.
BACKEND_SENSITIVE="tests/test_drop_in.py tests/test_keras_internals.py
    tests/test_equivalence.py tests/test_training.py tests/test_saving.py
    tests/test_schedules.py tests/test_unfreezing.py tests/test_wrapper_errors.py
    tests/test_numerics.py tests/test_crash_resume.py tests/test_cross_backend.py
    tests/test_distribution.py tests/test_jax_backend.py tests/test_torch_backend.py
    tests/test_late_start.py tests/test_updates.py"

export TF_CPP_MIN_LOG_LEVEL=3
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    if [ -n "${FULL:-}" ]; then
        targets=() marker=()
    elif [ "$backend" = tensorflow ]; then
        targets=() marker=(-m "not slow")
    else
        read -r -a targets <<< "$(echo $BACKEND_SENSITIVE)"
        marker=(-m "not slow")
    fi
    # Tests run in parallel processes (pytest-xdist), one per core: most of
    # their time is single-threaded Python (tracing, Keras' bookkeeping).
    KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -n "${WORKERS:-auto}" "${marker[@]}" "${targets[@]}" "$@" || status=1
done

if [ $# -eq 0 ] && [ "${KERAS_SUITE:-1}" != 0 ]; then
    all="optimizers/*_test.py optimizers/schedules/*_test.py"
    for backend in ${BACKENDS:-tensorflow jax torch}; do
        case "$backend" in
            tensorflow) [ -n "${FULL:-}" ] || continue; files=$all ;;
            jax) files=${FULL:+$all}
                 files=${files:-"optimizers/sgd_test.py optimizers/adam_test.py optimizers/loss_scale_optimizer_test.py"} ;;
            *) files=${FULL:+$all}
               files=${files:-"optimizers/sgd_test.py optimizers/adam_test.py optimizers/nadam_test.py optimizers/lamb_test.py optimizers/loss_scale_optimizer_test.py"} ;;
        esac
        echo "=== Keras' optimizer tests through LayerwiseOptimizer, KERAS_BACKEND=$backend"
        PYTHON=.venv/bin/python BACKENDS=$backend FILES="$files" bash scripts/keras_suite.sh || status=1
    done
fi
exit $status
