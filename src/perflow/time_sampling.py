"""Distributions of the training time ``t``, all as :data:`TimeSampler` callables.

``docs/method.md``, row "one training batch" (``t ~ p(t)``).

- ``uniform``: ``t ~ U[0, 1)`` (the paper), :func:`uniform_times`.
- ``u_shaped``: pick window ``j`` with probability proportional to its length, then the
  fraction ``u`` of the way through it from a U-shaped density ``p(u) ~ cosh(a (u - 1/2))``
  on ``[0, 1]`` (more weight near both window ends, after "Improving the Training of
  Rectified Flows"): ``t = t_s + u (t_e - t_s)``. Inverse CDF:
  ``u = 1/2 + asinh((2 r - 1) sinh(a / 2)) / a`` with ``r ~ U[0, 1)``; ``a -> 0`` is uniform.
- ``logit_normal``: ``t = 1 / (1 + exp(-(m + s n)))``, ``n ~ N(0, 1)`` (SD3's training distribution,
  "Scaling Rectified Flow Transformers", ``m = 0, s = 1``): density
  ``p(t) = exp(-(logit(t) - m)^2 / (2 s^2)) / (s sqrt(2 pi) t (1 - t))``, :func:`logit_normal_times`.
- ``window_start_prob = p`` (any sampler): each time is moved, with probability ``p``, to the start
  ``t_s`` of its window (:func:`with_window_starts`). A ``K``-step sampler evaluates the student
  only there, and there the regression is deterministic (``z_t = z_s``, one target per input);
  inside a window several segments cross the same ``z_t`` and the target is their mean.

Every sampler draws on the CPU generator it is given (reproducible across devices) and returns
float64 times ``(B,)`` on the requested device.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .windows import window_bounds, window_index

TimeSampler = Callable[[int, torch.Generator | None, torch.device], torch.Tensor]
"""``sampler(batch_size, generator, device) -> t (B,)`` float64 in ``[0, 1]``."""

TIME_SAMPLINGS = ("uniform", "u_shaped", "logit_normal")


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


def logit_normal_times(mean: float = 0.0, std: float = 1.0) -> TimeSampler:
    """A sampler of ``t = sigmoid(m + s n)``, ``n ~ N(0, 1)`` (float64, ``(B,)``, in ``(0, 1)``)."""
    if not std > 0:
        raise ValueError(f"logit_normal_std must be > 0, got {std!r}")

    def sample(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        n = torch.randn(batch_size, generator=generator, dtype=torch.float64)
        return torch.sigmoid(mean + std * n).to(device)

    return sample


def with_window_starts(sampler: TimeSampler, boundaries: torch.Tensor, prob: float) -> TimeSampler:
    """``sampler``'s times, each replaced with probability ``prob`` by the start ``t_s`` of its window
    (``boundaries[j]`` for ``t`` in ``(boundaries[j + 1], boundaries[j]]``)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"window_start_prob must be in [0, 1], got {prob!r}")
    if prob == 0.0:
        return sampler
    b = boundaries.to(torch.float64).cpu()

    def sample(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        t = sampler(batch_size, generator, torch.device("cpu"))
        at_start = torch.rand(batch_size, generator=generator, dtype=torch.float64) < prob
        return torch.where(at_start, window_bounds(t, b)[0], t).to(device)

    return sample


def one_window_per_batch(sampler: TimeSampler, boundaries: torch.Tensor) -> TimeSampler:
    """``sampler``'s times moved into one window per batch: the window ``k`` of the batch's first time, and
    each time at its own relative position ``u = (t - t_e) / (t_s - t_e)`` in ``(0, 1]`` of its window,
    ``t' = t_e^k + u (t_s^k - t_e^k)`` (a window start stays a window start).

    The batch's window is drawn as ``sampler`` draws windows, so the marginal of ``t`` is unchanged when the
    positions inside a window are distributed alike in every window (``uniform`` on equal windows,
    ``u_shaped``). What it changes is the cost of the teacher's solve when the windows have different step
    counts ``n_k``: a mixed batch needs ``max_k n_k`` sequential teacher calls, a one-window batch ``n_k``.
    """
    b = boundaries.to(torch.float64).cpu()

    def sample(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        t = sampler(batch_size, generator, torch.device("cpu")).to(torch.float64)
        t_s, t_e = window_bounds(t, b)
        u = (t - t_e) / (t_s - t_e)
        k = window_index(t[:1], b)
        s_k, e_k = b[k], b[k + 1]
        moved = torch.where(u >= 1.0, s_k, e_k + u * (s_k - e_k))
        return moved.to(device)

    return sample


BATCH_WINDOWS = ("mixed", "single")


def make_time_sampler(
    name: str, boundaries: torch.Tensor, a: float = 4.0, mean: float = 0.0, std: float = 1.0,
    window_start_prob: float = 0.0, batch_windows: str = "mixed",
) -> TimeSampler:
    """``uniform``, ``u_shaped`` (parameter ``a``) or ``logit_normal`` (``mean``, ``std``), then
    :func:`with_window_starts` with ``window_start_prob``, then with ``batch_windows="single"``
    :func:`one_window_per_batch`; see the module docstring."""
    if name == "uniform":
        base = uniform_times
    elif name == "u_shaped":
        base = u_shaped_times(boundaries, a)
    elif name == "logit_normal":
        base = logit_normal_times(mean, std)
    else:
        raise ValueError(f"unknown time_sampling {name!r}; expected one of {TIME_SAMPLINGS}")
    sampler = with_window_starts(base, boundaries, window_start_prob)
    if batch_windows == "single":
        return one_window_per_batch(sampler, boundaries)
    if batch_windows != "mixed":
        raise ValueError(f"unknown batch_windows {batch_windows!r}; expected one of {BATCH_WINDOWS}")
    return sampler


__all__ = [
    "BATCH_WINDOWS",
    "one_window_per_batch",
    "TIME_SAMPLINGS",
    "TimeSampler",
    "logit_normal_times",
    "make_time_sampler",
    "u_shaped_fraction",
    "u_shaped_times",
    "uniform_times",
    "with_window_starts",
]
