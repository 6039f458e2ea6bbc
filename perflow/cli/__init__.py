"""``perflow`` command line: a thin layer over the library.

Each subcommand lives in a module of this package exposing
``add_parser(subparsers)``, which registers its parser and sets ``func`` to a
callable taking the parsed arguments. Heavy imports happen inside ``func``, so
``perflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("demo", "train", "eval", "delta")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perflow",
        description=(
            "Piecewise Rectified Flow (PeRFlow): accelerate a diffusion model to 1-8 steps by "
            "piecewise reflow, evaluate it, and ship the weight delta as a plug-and-play accelerator."
        ),
    )
    from perflow import __version__

    parser.add_argument("--version", action="version", version=f"perflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"perflow.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as typed, for reports
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Library errors carry the problem and the fix; show them without a traceback.
        print(f"perflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
