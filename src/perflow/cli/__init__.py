"""``perflow`` command line: a thin layer over the library.

Each subcommand lives in a module of this package exposing
``add_parser(subparsers)``, which registers its parser and sets ``func`` to a
callable taking the parsed arguments. Heavy imports happen inside ``func``, so
``perflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
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
    from safetensors import SafetensorError

    prog = f"perflow {args.command}"
    try:
        with _perflow_warnings_as_lines(prog):
            result = args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        # Library errors carry the problem and the fix; show them without a traceback.
        return _fail(prog, str(err))
    except SafetensorError as err:
        return _fail(prog, f"{err}; a weights file is truncated or not a safetensors file: re-download or re-export it")
    except OSError as err:
        if err.errno is None and err.filename is None:
            raise  # not an operating-system error about a file: a bug, keep its traceback
        return _fail(prog, os_error_line(err))
    except KeyboardInterrupt as err:  # Ctrl-C where the command has no handler of its own: one line, the shell's 130
        print(f"{prog}: {err if str(err) else 'interrupted'}", file=sys.stderr)
        return int(getattr(err, "exit_code", 130))
    return int(result or 0)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the file(s), the system's reason and, for a full or read-only disk, the fix."""
    import errno

    if type(err).__str__ is not OSError.__str__:  # perflow's own errors already say it all
        return str(err)
    files = " -> ".join(repr(str(f)) for f in (err.filename, err.filename2) if f is not None)
    line = f"{files}: {err.strerror or err}" if files else str(err.strerror or err)
    hints = {
        errno.ENOSPC: "free some space or write to another disk",
        errno.EROFS: "the file system is read-only; choose a writable location",
        errno.ENOTDIR: "a part of the path is a regular file, not a folder",
    }
    return f"{line}; {hints[err.errno]}" if err.errno in hints else line


@contextlib.contextmanager
def _perflow_warnings_as_lines(prog: str):
    """Show perflow's own warnings as ``perflow CMD: warning: ...`` lines; others as Python shows them."""
    import os
    import warnings

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package + os.sep):
            print(f"{prog}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = original


if __name__ == "__main__":
    sys.exit(main())
