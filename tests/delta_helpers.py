"""Shared helpers of the delta, LoRA and released-format tests."""

from __future__ import annotations

import argparse

import torch

from perflow.tiny import tiny_sd15_unet


def perturbed(unet, seed: int = 1, size: float = 1e-3):
    """A 'student': the teacher after a small change of every weight (some small weights change sign)."""
    student = tiny_sd15_unet(0)
    student.load_state_dict(unet.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(size * torch.randn(p.shape, generator=g))
    return student


def run_cli(argv: list[str]) -> int:
    """Run ``perflow delta ...`` through its own parser (independent of the other subcommands)."""
    import perflow.cli.delta as delta_cli

    parser = argparse.ArgumentParser()
    delta_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)
