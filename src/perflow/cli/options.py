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
