"""The ``layerlr`` command line.

- ``layerlr inspect MODEL.keras``: the multiplier table of a saved model that
  was compiled with a `layerlr.LayerwiseOptimizer` (``--json`` for records).
- ``layerlr demo``: the fine-tuning demo (`layerlr.demo`).

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
from collections.abc import Sequence

import keras

import layerlr
from layerlr import _summary, demo


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


def _demo(args: argparse.Namespace) -> int:
    return demo.run_from_args(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerlr",
        description="Per-layer learning-rate and weight-decay multipliers for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"layerlr {layerlr.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    inspect = commands.add_parser(
        "inspect",
        help="print which learning rate every variable of a saved model gets",
        description="Print the multiplier table of a saved model (.keras) compiled "
        "with a layerlr.LayerwiseOptimizer.",
    )
    inspect.add_argument("model", help="the saved model, e.g. model.keras")
    inspect.add_argument("--json", action="store_true", help="print the records as JSON")
    inspect.add_argument("--width", type=int, default=None,
                         help="line width (default: the terminal's)")
    inspect.add_argument("--import", dest="imports", action="append", default=[],
                         metavar="MODULE",
                         help="import MODULE first (registers custom layers); repeatable")
    inspect.add_argument("--unsafe", action="store_true",
                         help="allow loading Lambda layers (safe_mode=False); trusted files only")
    inspect.set_defaults(run=_inspect)

    demo_parser = commands.add_parser(
        "demo",
        help="run the fine-tuning demo (needs: pip install \"layerlr[demo]\")",
        description="Fine-tune a pretrained 5-conv net on a new digits task and compare "
        "one learning rate, a frozen backbone, per-layer rates and layer-wise decay.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``layerlr COMMAND ...`` and returns the exit status."""
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
