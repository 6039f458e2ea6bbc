"""Closed-form references for flow-matching tests, written from the formulas (``docs/method.md``, section 7).

Gaussian data ``x0 ~ N(mu, s^2 I)`` on the path ``z = (1 - t) x0 + t eps``: with
``v(t) = (1 - t)^2 s^2 + t^2``, ``E[x0 | z] = mu + (1 - t) s^2 (z - (1 - t) mu) / v`` and
``E[eps | z] = t (z - (1 - t) mu) / v``; the teacher's velocity is ``E[eps | z] - E[x0 | z]`` and its
exact flow from ``t_a`` to ``t_b`` is ``(1 - t_b) mu + sqrt(v(t_b) / v(t_a)) (z - (1 - t_a) mu)``.
"""

from __future__ import annotations

import math

import torch

T = 1000
MU, S = 0.7, 0.3


def variance(t):
    return (1 - t) ** 2 * S**2 + t**2


def gaussian_velocity(z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The exact flow-matching teacher (``flow_prediction``) at timestep ``sigma T``, float64."""
    t = (torch.as_tensor(timestep, dtype=torch.float64) / T).reshape(-1, *[1] * (z.dim() - 1))
    d = z.double() - (1 - t) * MU
    v = variance(t)
    x0 = MU + (1 - t) * S**2 * d / v
    eps = t * d / v
    return (eps - x0).to(z.dtype)


def exact_flow(z: torch.Tensor, t_a: float, t_b: float) -> torch.Tensor:
    return (1 - t_b) * MU + math.sqrt(variance(t_b) / variance(t_a)) * (z - (1 - t_a) * MU)


def shifted(u: float, s: float) -> float:
    """``sigma = s u / (1 + (s - 1) u)``, written independently of perflow."""
    return s * u / (1 + (s - 1) * u)


def unshifted(sigma: float, s: float) -> float:
    return sigma / (s - (s - 1) * sigma)


def euler(z: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Euler steps of the exact teacher over ``sigmas`` (diffusers' FlowMatchEuler step ``z + (s' - s) v``)."""
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        z = z + (b - a) * gaussian_velocity(z, torch.full((z.shape[0],), a * T, dtype=torch.float64))
    return z


def window_solve_sigmas(t_s: float, t_e: float, n: int, s: float) -> list[float]:
    """The teacher's ``n`` points in window ``(t_s, t_e)``: even in ``u = unshift(t)``, mapped through the shift."""
    u_s, u_e = unshifted(t_s, s), unshifted(t_e, s)
    return [t_s] + [shifted(u_s + (u_e - u_s) * j / n, s) for j in range(1, n)] + [t_e]
