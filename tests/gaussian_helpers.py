"""Closed forms for Gaussian data ``x0 ~ N(mu, s^2 I)``: the exact teacher and its exact flow map.

Test references (moved out of the library: only tests use them). Written from the forward
process ``z = sqrt(abar) x0 + sqrt(1 - abar) eps``, independently of the solver they check.
"""

from __future__ import annotations

import torch

from perflow.solver import Denoiser
from perflow.tensors import expand_like


def gaussian_denoiser(
    mu: torch.Tensor | float,
    s: float,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> Denoiser:
    """Exact teacher of Gaussian data ``x0 ~ N(mu, s^2 I)`` at the discrete noise levels ``abar[i]``.

    ``eps(z) = sqrt(1 - abar) (z - sqrt(abar) mu) / (abar s^2 + 1 - abar)``; for ``v_prediction``
    ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` with ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``.
    Computed in float64, returned in ``z``'s dtype.
    """
    ac = alphas_cumprod.to(torch.float64)

    def denoiser(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        z64 = z.to(torch.float64)
        a = expand_like(ac.to(z.device)[i.to(z.device)], z64)
        m = torch.as_tensor(mu, dtype=torch.float64, device=z.device)
        eps = (1 - a).sqrt() * (z64 - a.sqrt() * m) / (a * s**2 + 1 - a)
        if prediction_type == "epsilon":
            return eps.to(z.dtype)
        if prediction_type == "v_prediction":
            x0 = (z64 - (1 - a).sqrt() * eps) / a.sqrt()
            return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(z.dtype)
        raise ValueError(f"gaussian_denoiser supports 'epsilon' and 'v_prediction', got {prediction_type!r}")

    return denoiser


def gaussian_flow(z: torch.Tensor, abar_a: torch.Tensor, abar_b: torch.Tensor, mu: torch.Tensor | float, s: float) -> torch.Tensor:
    """Exact probability-flow map of ``N(mu, s^2 I)`` data from noise level ``abar_a`` to ``abar_b``:
    ``z -> sqrt(abar_b) mu + sqrt((abar_b s^2 + 1 - abar_b) / (abar_a s^2 + 1 - abar_a)) (z - sqrt(abar_a) mu)``."""
    z64 = z.to(torch.float64)
    a, b = expand_like(abar_a, z64), expand_like(abar_b, z64)
    m = torch.as_tensor(mu, dtype=torch.float64, device=z.device)
    ratio = ((b * s**2 + 1 - b) / (a * s**2 + 1 - a)).sqrt()
    return b.sqrt() * m + ratio * (z64 - a.sqrt() * m)
