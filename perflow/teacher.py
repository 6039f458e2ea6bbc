"""The teacher's probability-flow ODE solved over one time window with DDIM.

``shared/METHOD.md`` section 2. The solver takes a *denoiser callable*
``denoiser(z, timestep) -> model_output``: ``z`` is ``(B, ...)``, ``timestep`` the
teacher's discrete index ``i(t)`` per sample ``(B,)``, and the output is in the
teacher's own prediction type (``epsilon``, ``v_prediction`` or ``sample``).
Conditioning and classifier-free guidance live in the adapter that builds the
callable (:mod:`perflow.denoisers`); the solver never knows which model it runs.
"""

from __future__ import annotations

from typing import Callable

import torch

from .parameterization import _bcast
from .windows import abar_at, timestep_index

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def x0_eps_from_output(
    output: torch.Tensor, z: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean sample and noise ``(x0, eps)`` from a teacher output at noise level ``abar``.

    With ``z = sqrt(abar) x0 + sqrt(1 - abar) eps``:
    ``epsilon``: ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)``;
    ``v_prediction`` (``v = sqrt(abar) eps - sqrt(1 - abar) x0``):
    ``x0 = sqrt(abar) z - sqrt(1 - abar) v``, ``eps = sqrt(1 - abar) z + sqrt(abar) v``;
    ``sample``: ``eps = (z - sqrt(abar) x0) / sqrt(1 - abar)``.
    """
    a = _bcast(abar, z)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (z - s1a * output) / sa, output
    if prediction_type == "v_prediction":
        return sa * z - s1a * output, s1a * z + sa * output
    if prediction_type == "sample":
        return output, (z - sa * output) / s1a
    raise ValueError(
        f"unknown teacher prediction_type {prediction_type!r}; expected one of {TEACHER_PREDICTION_TYPES}"
    )


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, abar_next: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM update to noise level ``abar_next``: ``sqrt(abar_next) x0 + sqrt(1 - abar_next) eps``."""
    a = _bcast(abar_next, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


@torch.no_grad()
def solve_window(
    denoiser: Denoiser,
    z_s: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    num_steps: int,
    alphas_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """``z_e = Phi(z_s, t_s, t_e)``: ``n`` DDIM steps on the times ``t_s + j (t_e - t_s) / n``, ``j = 0..n``.

    Each sample may sit in a different window (``t_s``, ``t_e`` are ``(B,)``). Step ``j``
    evaluates the teacher at index ``i(t_j)`` and uses ``abar(t_j)`` and ``abar(t_{j+1})``,
    the step's own start and end times (not a fixed integer stride). The update is
    computed in float32 (or ``z_s``'s dtype if wider); the denoiser casts to its own dtype.
    """
    if num_steps < 1:
        raise ValueError(f"the teacher solver needs num_steps >= 1, got {num_steps}")
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(
            f"unknown teacher prediction_type {prediction_type!r}; expected one of {TEACHER_PREDICTION_TYPES}"
        )
    work_dtype = torch.promote_types(z_s.dtype, torch.float32)
    z = z_s.to(work_dtype)
    t_s = torch.as_tensor(t_s, device=z.device, dtype=torch.float64).expand(z.shape[0])
    t_e = torch.as_tensor(t_e, device=z.device, dtype=torch.float64).expand(z.shape[0])
    ac = alphas_cumprod.to(device=z.device, dtype=work_dtype)
    T = ac.numel()
    for j in range(num_steps):
        t_a = t_s + (t_e - t_s) * (j / num_steps)
        t_b = t_s + (t_e - t_s) * ((j + 1) / num_steps)
        out = denoiser(z, timestep_index(t_a, T)).to(work_dtype)
        x0, eps = x0_eps_from_output(out, z, abar_at(t_a, ac), prediction_type)
        z = ddim_step(x0, eps, abar_at(t_b, ac))
    return z.to(z_s.dtype)
