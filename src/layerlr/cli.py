"""The ``layerlr`` command line.

- ``layerlr inspect MODEL.keras``: the multiplier table of a saved model that
  was compiled with a `layerlr.LayerwiseOptimizer` (``--json`` for records).
- ``layerlr demo``: the fine-tuning demo (`layerlr.demo`).

The command's entry point and argument parsing are in the top-level module
`layerlr_cli`, so that ``layerlr --help`` does not import Keras; this module
runs the commands (``python -m layerlr.cli`` works too).

Example:

>>> import os, tempfile, keras, layerlr
>>> from layerlr.cli import main
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")], name="net")
>>> model.compile(layerlr.LayerwiseOptimizer("sgd", lr_mult={"*bias": 0.0}), loss="mse")
>>> path = os.path.join(tempfile.mkdtemp(), "net.keras")
>>> model.save(path)
>>> main(["inspect", path, "--width", "100"])
LayerwiseOptimizer(SGD) at step 0
base learning rate 0.01, no weight decay
Layer         Variable     Shape   Params  lr_mult  LR now  Rule
-----------------------------------------------------------------------
head (Dense)  head/kernel  (3, 2)       6        1    0.01  default
              head/bias    (2,)         2        0       0  lr: '*bias'
-----------------------------------------------------------------------
Parameters per multiplier (lr_mult):
  1: 6 params in 1 variable, learning rate 0.01
  0: 2 params in 1 variable, learning rate 0 (NOT UPDATED: lr_mult 0)
Trainable: 8 params in 2 variables.
0
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import keras

from layerlr.report import _summary
from layerlr_cli import main

__all__ = ["main"]


def _inspect(args: argparse.Namespace) -> int:
    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            print(f"layerlr inspect: cannot import {module}: {error}", file=sys.stderr)
            return 2
    path = args.model
    if not os.path.exists(path):
        print(f"layerlr inspect: no such file: {path}", file=sys.stderr)
        return 2
    try:
        model = keras.saving.load_model(path, safe_mode=not args.unsafe)
    except Exception as error:  # reported, with what usually fixes it
        print(
            f"layerlr inspect: could not load {path}: {type(error).__name__}: {error}\n"
            "If the model uses custom layers or functions, import the module that "
            "registers them with --import MODULE (repeatable); a model with Lambda "
            "layers needs --unsafe (only for files you trust).",
            file=sys.stderr,
        )
        return 1
    try:
        optimizer = _summary.layerwise_optimizer_of(model)
    except ValueError as error:
        print(f"layerlr inspect: {path}: {error}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(_summary.summary_records(model, optimizer), sys.stdout, indent=2)
        print()
    else:
        _summary.summary(model, optimizer, width=args.width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
