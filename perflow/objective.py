"""One piecewise-reflow training example, model-agnostic.

``shared/METHOD.md`` sections 2-3, in the order a training step needs them:

1. draw ``t`` (uniform on ``[0, 1]`` by default) and look up its window ``(t_s, t_e)``;
2. noise a real sample to the window start: ``z_s = sqrt(abar(t_s)) x0 + sqrt(1 - abar(t_s)) noise``;
3. solve the teacher's ODE to the window end with ``n`` DDIM steps: ``z_e = Phi(z_s, t_s, t_e)``;
4. the student input is the segment point ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``
   at student timestep ``t T``, and the regression target is given by the parameterization.

The trainer (:mod:`perflow.training`) and the small analytic examples call the same
function, so there is one implementation of the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .parameterization import _bcast, interpolate, target_from_window
from .teacher import Denoiser, solve_window
from .windows import abar_at, window_bounds, window_coefficients

TimeSampler = Callable[[int, torch.Generator | None, torch.device], torch.Tensor]


def uniform_times(batch_size: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``t ~ U[0, 1)`` per sample, float64 (drawn on the CPU generator, then moved)."""
    return torch.rand(batch_size, generator=generator, dtype=torch.float64).to(device)


def forward_marginal(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``z_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) noise`` (the teacher's forward process at time ``t``)."""
    a = _bcast(abar_at(t, alphas_cumprod), x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@dataclass
class ReflowExample:
    """A batch of training examples. Shapes: latents ``(B, ...)``, times ``(B,)`` float64."""

    z_t: torch.Tensor  # student input
    timestep: torch.Tensor  # student timestep t * T, float32
    target: torch.Tensor  # regression target in the student's parameterization
    t: torch.Tensor
    t_s: torch.Tensor
    t_e: torch.Tensor
    z_s: torch.Tensor
    z_e: torch.Tensor


def reflow_example(
    denoiser: Denoiser,
    x0: torch.Tensor,
    boundaries: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_solver_steps: int,
    prediction_type: str,
    teacher_prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    t: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    time_sampler: TimeSampler = uniform_times,
) -> ReflowExample:
    """Build one piecewise-reflow batch from clean samples ``x0`` (B, ...) and a teacher denoiser.

    ``noise`` and ``t`` may be given (for exact reproducibility); otherwise they are drawn
    from ``generator`` (``t`` through ``time_sampler``). ``prediction_type`` is the
    student's (``diff_eps``, ``ddim_eps`` or ``velocity``).
    """
    batch = x0.shape[0]
    if t is None:
        t = time_sampler(batch, generator, x0.device)
    t = t.to(device=x0.device, dtype=torch.float64)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    t_s, t_e = window_bounds(t, boundaries)
    z_s = forward_marginal(x0, noise, t_s, alphas_cumprod)
    z_e = solve_window(denoiser, z_s, t_s, t_e, num_solver_steps, alphas_cumprod, teacher_prediction_type)
    lam, eta = window_coefficients(t_s, t_e, alphas_cumprod.to(torch.float64), prediction_type)
    work = torch.promote_types(x0.dtype, torch.float32)
    z_s32, z_e32 = z_s.to(work), z_e.to(work)
    target = target_from_window(z_s32, z_e32, t_s, t_e, lam, eta, prediction_type)
    z_t = interpolate(z_s32, z_e32, t, t_s, t_e)
    T = alphas_cumprod.numel()
    return ReflowExample(
        z_t=z_t, timestep=(t * T).float(), target=target, t=t, t_s=t_s, t_e=t_e, z_s=z_s, z_e=z_e
    )
