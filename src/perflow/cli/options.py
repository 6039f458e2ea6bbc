"""Options shared by several ``perflow`` subcommands."""

from __future__ import annotations

import argparse


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: torch's CPU threads for the command (``perflow demo``, ``train``, ``eval``)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is faster on a machine other jobs keep busy)")


def apply_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (refusing values below 1) before any work starts."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def finite_float(text: str) -> float:
    """argparse ``type``: a finite number (a NaN or inf scale would give a NaN model or report)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def read_prompts(values: list[str] | None) -> list[str] | None:
    """``--prompts``: the prompts as given, or the lines of the one text file given.

    One value ending in ``.txt`` that is not a file is refused (a mistyped path would otherwise be
    sampled as the prompt ``"prompts.txt"``), as is a file without a prompt."""
    from pathlib import Path

    if not values or len(values) != 1:
        return values
    path = Path(values[0])
    if path.is_file():
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        except UnicodeDecodeError:
            raise ValueError(f"--prompts: {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
        if not lines:
            raise ValueError(f"--prompts: {str(path)!r} holds no prompt; write one prompt per line")
        return lines
    if path.suffix.lower() == ".txt":
        raise ValueError(f"--prompts: no file {str(path)!r}; give an existing text file (one prompt per line) or the prompts themselves")
    return values
