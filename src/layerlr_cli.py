"""The ``layerlr`` command's entry point: arguments first, Keras only when needed.

It lives outside the ``layerlr`` package on purpose: ``import layerlr`` imports
Keras, and so TensorFlow, JAX or torch (seconds, and TensorFlow's log lines),
because it registers `layerlr.LayerwiseOptimizer` for ``keras.models.load_model``.
Any module inside the package would pay that before parsing a single argument,
so ``layerlr --help`` and ``layerlr --version`` would too. Here they import
nothing but the standard library; each command imports what it runs (see
`layerlr.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

DISTRIBUTION = "layerlr"


def version() -> str:
    """The installed distribution's version, without importing the package."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        import layerlr

        return layerlr.__version__


class _Subcommand(argparse.ArgumentParser):
    """A subcommand's parser whose arguments can be added on first use.

    ``layerlr demo``'s arguments are defined in `layerlr.demo`, which imports
    Keras: listing the commands in ``layerlr --help`` must not import it.
    """

    def __init__(self, *args, add_arguments=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, args=None, namespace=None):
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


def _inspect(args: argparse.Namespace) -> int:
    from layerlr import cli

    return cli._inspect(args)


def _demo(args: argparse.Namespace) -> int:
    from layerlr import demo

    return demo.run_from_args(args)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from layerlr import demo

    demo.add_arguments(parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerlr",
        description="Per-layer learning-rate and weight-decay multipliers for Keras 3.",
    )
    parser.add_argument("--version", action="version", version=f"layerlr {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_Subcommand)

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
        add_arguments=_demo_arguments,
    )
    demo_parser.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``layerlr COMMAND ...`` and returns the exit status."""
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
