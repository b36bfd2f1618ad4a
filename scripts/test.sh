#!/usr/bin/env bash
# Sets up .venv and runs the test suite once per Keras backend (each backend
# needs its own process: KERAS_BACKEND is fixed at import time).
#   bash scripts/test.sh                 # tensorflow, jax and torch
#   BACKENDS=tensorflow bash scripts/test.sh -k saving   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# torch is pinned: 2.13.0 is the CPU wheel available offline on our machines.
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -e ".[tf-cpu,jax,test]" "torch==2.13.0"

export TF_CPP_MIN_LOG_LEVEL=3
status=0
for backend in ${BACKENDS:-tensorflow jax torch}; do
    echo "=== KERAS_BACKEND=$backend"
    KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -m "not slow" "$@" || status=1
done
exit $status
