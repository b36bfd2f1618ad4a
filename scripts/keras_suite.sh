#!/usr/bin/env bash
# Runs the installed Keras' own optimizer tests with every optimizer wrapped in
# layerlr.LayerwiseOptimizer (tests/keras_suite/keras_suite_plugin.py), on each
# backend in its own process. The test files come from the installed keras
# (found from keras.__file__); nothing is copied.
#   bash scripts/keras_suite.sh                          # all, on tensorflow jax torch
#   BACKENDS=jax bash scripts/keras_suite.sh             # one backend
#   bash scripts/keras_suite.sh --layerlr-mode=rules     # explicit 1.0 rules
#   bash scripts/keras_suite.sh --layerlr-wrong          # every multiplier 0.5: must fail
#   FILES="optimizers/sgd_test.py" bash scripts/keras_suite.sh -k single_step
# PYTHON picks the interpreter (default .venv/bin/python); extra args go to pytest.
# KERAS_TESTS=<folder> takes the test files from another keras/src folder (the
# keras-nightly wheel ships none; see scripts/test_nightly.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SUITE=tests/keras_suite
export TF_CPP_MIN_LOG_LEVEL=3
export PYTHONPATH="$PWD/$SUITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    src=${KERAS_TESTS:-$(KERAS_BACKEND=$backend "$PYTHON" -c \
        "import keras, os; print(os.path.join(os.path.dirname(keras.__file__), 'src'))" 2>/dev/null)}
    targets=()
    for f in ${FILES:-optimizers/*_test.py optimizers/schedules/*_test.py}; do
        for path in "$src"/$f; do targets+=("$path"); done
    done
    # rootdir = keras/src: test ids read optimizers/sgd_test.py::SGDTest::test_config.
    KERAS_BACKEND=$backend "$PYTHON" -m pytest -c "$SUITE/pytest.ini" --rootdir "$src" \
        -q "${targets[@]}" "$@" || status=1
done
exit $status
