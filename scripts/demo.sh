#!/usr/bin/env bash
# Sets up .venv and runs the fine-tuning demo (pretrained conv net + new layer,
# per-layer learning rates vs the usual alternatives). Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[tf-cpu,demo]"
TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/layerlr demo "$@"
