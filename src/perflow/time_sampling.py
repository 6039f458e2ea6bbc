"""Distributions of the training time ``t``, all as :data:`TimeSampler` callables.

``docs/method.md``, row "one training batch" (``t ~ p(t)``).

- ``uniform``: ``t ~ U[0, 1)`` (the paper), :func:`uniform_times`.
- ``u_shaped``: pick window ``j`` with probability proportional to its length, then the
  fraction ``u`` of the way through it from a U-shaped density ``p(u) ~ cosh(a (u - 1/2))``
  on ``[0, 1]`` (more weight near both window ends, after "Improving the Training of
  Rectified Flows"): ``t = t_s + u (t_e - t_s)``. Inverse CDF:
  ``u = 1/2 + asinh((2 r - 1) sinh(a / 2)) / a`` with ``r ~ U[0, 1)``; ``a -> 0`` is uniform.

Every sampler draws on the CPU generator it is given (reproducible across devices) and returns
float64 times ``(B,)`` on the requested device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

TimeSampler = Callable[[int, torch.Generator | None, torch.device], torch.Tensor]
"""``sampler(batch_size, generator, device) -> t (B,)`` float64 in ``[0, 1]``."""

TIME_SAMPLINGS = ("uniform", "u_shaped")


def uniform_times(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``t ~ U[0, 1)`` per sample, float64 (drawn on the CPU generator, then moved)."""
    return torch.rand(batch_size, generator=generator, dtype=torch.float64).to(device)


def u_shaped_fraction(r: torch.Tensor, a: float) -> torch.Tensor:
    """Inverse CDF of ``p(u) ~ cosh(a (u - 1/2))`` on ``[0, 1]`` at ``r`` in ``[0, 1]``."""
    if a <= 0:
        return r
    return 0.5 + torch.asinh((2 * r - 1) * math.sinh(a / 2)) / a


def u_shaped_times(boundaries: torch.Tensor, a: float = 4.0) -> TimeSampler:
    """A sampler of ``t``: window by length, then a U-shaped position inside it (float64, ``(B,)``)."""
    b = boundaries.to(torch.float64).cpu()
    lengths = b[:-1] - b[1:]  # (K,)

    def sample(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        j = torch.multinomial(lengths, batch_size, replacement=True, generator=generator)
        r = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        u = u_shaped_fraction(r, a)
        return (b[j] + u * (b[j + 1] - b[j])).to(device)

    return sample


def make_time_sampler(name: str, boundaries: torch.Tensor, a: float = 4.0) -> TimeSampler:
    """``uniform`` or ``u_shaped`` (see the module docstring)."""
    if name == "uniform":
        return uniform_times
    if name == "u_shaped":
        return u_shaped_times(boundaries, a)
    raise ValueError(f"unknown time_sampling {name!r}; expected 'uniform' or 'u_shaped'")


__all__ = ["TIME_SAMPLINGS", "TimeSampler", "make_time_sampler", "u_shaped_fraction", "u_shaped_times", "uniform_times"]
