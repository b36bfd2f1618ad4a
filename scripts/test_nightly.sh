#!/usr/bin/env bash
# Keras upgrade safety: runs layerlr against the newest keras-nightly from PyPI.
# keras-nightly goes into its own --target folder (.nightly/, the .venv keeps
# its keras), prepended on PYTHONPATH; TF, JAX and torch come from .venv. Then,
# on each backend:
#   1. python -m layerlr.core._keras_internals: every private Keras internal layerlr
#      relies on, checked by name (src/layerlr/core/_keras_internals.py);
#   2. the backend-sensitive tests (numerics, saving, hooks; not in QUICK=1 mode);
#   3. Keras' own optimizer tests through the wrapper (scripts/keras_suite.sh).
#      keras-nightly ships no test files, so these are the released keras' (in
#      .venv), run first unwrapped: a test that fails unwrapped too is a Keras
#      change the old test does not know, not ours, and only reported.
#   bash scripts/test_nightly.sh                    # everything, all backends (~15 min)
#   QUICK=1 bash scripts/test_nightly.sh            # 1 and 3 only: what CI runs (~2 min)
#   KERAS_SPEC="keras-nightly==3.16.0.dev2026102704" bash scripts/test_nightly.sh
# A failure names the internal (1) or the test (2, 3) that broke.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
TARGET=${NIGHTLY_DIR:-.nightly}
SPEC=${KERAS_SPEC:-keras-nightly}

# The released keras' test files, found before keras-nightly goes first on the path.
KERAS_TESTS=${KERAS_TESTS:-$("$PYTHON" -c \
    "import keras, os; print(os.path.join(os.path.dirname(keras.__file__), 'src'))" 2>/dev/null)}
tests_version=$("$PYTHON" -c "import keras; print(keras.__version__)" 2>/dev/null)
rm -rf "$TARGET"
# --no-deps: its dependencies (numpy, h5py, optree, ...) are the .venv's, as
# for the released keras; only keras itself is swapped.
if ! "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps \
        --upgrade --pre --target "$TARGET" "$SPEC"; then
    echo "test_nightly: could not install $SPEC from the package index" >&2
    exit 2
fi
export PYTHONPATH="$PWD/$TARGET:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3
version=$("$PYTHON" -c "import keras; print(keras.__version__)" 2>/dev/null)
location=$("$PYTHON" -c "import keras, os; print(os.path.dirname(keras.__file__))" 2>/dev/null)
echo "=== testing against keras $version ($location)"
case "$location" in
    "$PWD/$TARGET"/*) ;;
    *) echo "test_nightly: keras was not imported from $TARGET" >&2; exit 2 ;;
esac

BACKEND_SENSITIVE="tests/test_keras_internals.py tests/test_drop_in.py tests/test_equivalence.py
    tests/test_training.py tests/test_saving.py tests/test_schedules.py tests/test_unfreezing.py
    tests/test_numerics.py tests/test_jax_backend.py tests/test_torch_backend.py"
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend: private internals"
    KERAS_BACKEND=$backend "$PYTHON" -m layerlr.core._keras_internals || status=1
    if [ -z "${QUICK:-}" ]; then
        echo "=== KERAS_BACKEND=$backend: backend-sensitive tests"
        read -r -a targets <<< "$(echo $BACKEND_SENSITIVE)"
        KERAS_BACKEND=$backend "$PYTHON" -m pytest -q -m "not slow" -p no:randomly "${targets[@]}" || status=1
    fi
done
files="${NIGHTLY_SUITE_FILES:-optimizers/*_test.py optimizers/schedules/*_test.py}"
for backend in ${NIGHTLY_SUITE_BACKENDS:-${BACKENDS:-tensorflow jax torch}}; do
    known="$TARGET/unwrapped_failures_$backend.txt"
    echo "=== KERAS_BACKEND=$backend: keras $tests_version's optimizer tests on keras $version, unwrapped"
    PYTHON="$PYTHON" FILES="$files" BACKENDS=$backend KERAS_TESTS="$KERAS_TESTS" \
        bash scripts/keras_suite.sh --layerlr-mode=plain --layerlr-known-failures="$known" -rf --tb=no || true
    echo "=== KERAS_BACKEND=$backend: the same tests through LayerwiseOptimizer"
    PYTHON="$PYTHON" FILES="$files" BACKENDS=$backend KERAS_TESTS="$KERAS_TESTS" \
        bash scripts/keras_suite.sh --layerlr-known-failures="$known" -rf --tb=short || status=1
done
echo "=== keras $version: $([ $status = 0 ] && echo passed || echo FAILED)"
exit $status
