"""Training-time distributions for ``t`` (``METHOD.md`` section 7), as :data:`perflow.objective.TimeSampler`.

- ``uniform``: ``t ~ U[0, 1)`` (the paper).
- ``u_shaped``: pick window ``j`` with probability proportional to its length, then the
  fraction ``u`` of the way through it from a U-shaped density ``p(u) ~ cosh(a (u - 1/2))``
  on ``[0, 1]`` (more weight near both window ends, after "Improving the Training of
  Rectified Flows"): ``t = t_s + u (t_e - t_s)``. Inverse CDF:
  ``u = 1/2 + asinh((2 r - 1) sinh(a / 2)) / a`` with ``r ~ U[0, 1)``; ``a -> 0`` is uniform.
"""

from __future__ import annotations

import math

import torch

from ..objective import TimeSampler, uniform_times


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
