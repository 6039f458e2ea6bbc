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
