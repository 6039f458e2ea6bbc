"""The teacher's probability-flow ODE solved over one time window: the window solver.

``docs/method.md``, row "teacher window solve". The solver takes a *denoiser callable*
``denoiser(z, timestep) -> model_output`` (:data:`Denoiser`): ``z`` is ``(B, ...)``,
``timestep`` the teacher's own timestep per sample ``(B,)`` (for a discrete diffusion teacher
its index ``i(t)``, :meth:`perflow.schedule.NoiseSchedule.timestep`), and the output is in
the teacher's prediction type (:data:`TEACHER_PREDICTION_TYPES`). Conditioning and
classifier-free guidance live in the adapter that builds the callable
(:mod:`perflow.denoisers`); the solver never knows which model it runs. The noise schedule
is a :class:`perflow.schedule.NoiseSchedule`: each step turns the output into ``(x0, eps)``
and moves to the next time on the schedule's forward process (DDIM).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, as_schedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoiser(z (B, ...), timestep (B,)) -> model output (B, ...)``: a teacher, a student, any model."""

TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
"""What a teacher's output predicts (diffusers' ``prediction_type``; ``flow_prediction``: the velocity
``dz/dsigma = eps - x0`` of a flow-matching teacher, :class:`perflow.schedule.FlowMatchSchedule`)."""


def x0_eps_from_output(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean sample and noise ``(x0, eps)`` from a teacher output at ``z = alpha x0 + sigma eps``.

    ``epsilon``: ``x0 = (z - sigma eps) / alpha``;
    ``v_prediction`` (``v = alpha eps - sigma x0``, variance preserving: ``alpha^2 + sigma^2 = 1``):
    ``x0 = alpha z - sigma v``, ``eps = sigma z + alpha v``;
    ``sample``: ``eps = (z - alpha x0) / sigma``;
    ``flow_prediction`` (``v = eps - x0`` on the flow-matching path, ``alpha + sigma = 1``):
    ``x0 = z - sigma v``, ``eps = z + alpha v`` (so the DDIM step to ``sigma'`` is the Euler step
    ``z + (sigma' - sigma) v``).
    ``alpha``, ``sigma`` broadcast against ``z`` (:meth:`perflow.schedule.NoiseSchedule.alpha_sigma`).
    """
    if prediction_type == "epsilon":
        return (z - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * z - sigma * output, sigma * z + alpha * output
    if prediction_type == "sample":
        return output, (z - alpha * output) / sigma
    if prediction_type == "flow_prediction":
        return z - sigma * output, z + alpha * output
    raise ValueError(
        f"unknown teacher prediction_type {prediction_type!r}; expected one of {TEACHER_PREDICTION_TYPES}"
    )


@torch.no_grad()
def solve_window(
    denoiser: Denoiser,
    z_s: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    num_steps: int | torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    prediction_type: str = "epsilon",
    clip_sample: float | None = None,
) -> torch.Tensor:
    """``z_e = Phi(z_s, t_s, t_e)``: ``n`` DDIM steps on the times ``t_j = schedule.solver_time(t_s, t_e, j, n)``.

    For a VP teacher ``t_j = t_s + j (t_e - t_s) / n``, ``j = 0..n``; a shifted flow-matching teacher
    places them on its own shifted grid (:meth:`perflow.schedule.FlowMatchSchedule.solver_time`), where
    each DDIM step of its ``flow_prediction`` output is an Euler step ``z + (t_{j+1} - t_j) v``.

    Step ``j`` evaluates the teacher at ``schedule.timestep(t_j)`` (index ``i(t_j)`` for a
    discrete teacher), turns its output into ``(x0, eps)`` at ``t_j`` and moves to
    ``z_{j+1} = alpha(t_{j+1}) x0 + sigma(t_{j+1}) eps``: the step's own start and end times,
    not a fixed integer stride. Each sample may sit in a different window (``t_s``, ``t_e``
    are ``(B,)``). ``schedule`` is the teacher's :class:`~perflow.schedule.NoiseSchedule` (or
    its raw ``alphas_cumprod``). The update is computed in float32 (or ``z_s``'s dtype if
    wider); the denoiser casts to its own dtype.

    ``clip_sample = r`` (a teacher whose scheduler config has ``clip_sample: true`` and
    ``clip_sample_range: r``) clips the predicted clean sample in every step, as diffusers'
    DDIM/DDPM step does: ``z_{j+1} = alpha(t_{j+1}) clip(x0, -r, r) + sigma(t_{j+1}) eps`` with the
    model's own ``eps``. ``None`` (default): no clipping.

    ``num_steps`` may differ per sample (an integer tensor ``(B,)``, e.g. each window's own ``n_k``,
    ``perflow.num_solver_steps`` as a list): the rows advance in lockstep, step ``j`` evaluating those
    with ``n_b > j`` in one call on ``denoiser.rows(index)`` (:func:`perflow.denoisers.unet_denoiser`)
    when the denoiser has it, else on the whole batch, keeping those rows (the same result, at more
    teacher evaluations).
    """
    if isinstance(num_steps, torch.Tensor) and num_steps.dim() > 0:
        return _solve_by_steps(denoiser, z_s, t_s, t_e, num_steps, schedule, prediction_type, clip_sample)
    num_steps = int(num_steps)
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
    schedule = as_schedule(schedule).to(device=z.device, dtype=work_dtype)
    for j in range(num_steps):
        t_a = schedule.solver_time(t_s, t_e, j, num_steps)
        t_b = schedule.solver_time(t_s, t_e, j + 1, num_steps)
        out = denoiser(z, schedule.timestep(t_a)).to(work_dtype)
        x0, eps = x0_eps_from_output(out, z, *schedule.alpha_sigma(t_a, z), prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        z = schedule.marginal(x0, eps, t_b)
    return z.to(z_s.dtype)


def _solve_by_steps(denoiser, z_s, t_s, t_e, num_steps, schedule, prediction_type, clip_sample) -> torch.Tensor:
    """:func:`solve_window` with ``n`` per sample ``(B,)``, in lockstep: step ``j`` evaluates the rows with
    ``n_b > j`` in one call (``denoiser.rows``; a denoiser without it is called on the whole batch and the
    finished rows are kept), each on its own grid ``schedule.solver_time(t_s, t_e, j, n_b)``. The teacher
    evaluations are ``sum_b n_b`` in ``max_b n_b`` calls; each row's result is its own ``n_b``-step solve."""
    batch = z_s.shape[0]
    steps = num_steps.to("cpu", torch.long).expand(batch)
    values = steps.unique().tolist()
    if len(values) == 1:
        return solve_window(denoiser, z_s, t_s, t_e, values[0], schedule, prediction_type, clip_sample)
    if min(values) < 1:
        raise ValueError(f"the teacher solver needs num_steps >= 1, got {min(values)}")
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(
            f"unknown teacher prediction_type {prediction_type!r}; expected one of {TEACHER_PREDICTION_TYPES}"
        )
    work_dtype = torch.promote_types(z_s.dtype, torch.float32)
    z = z_s.to(work_dtype).clone()
    t_s = torch.as_tensor(t_s, device=z.device, dtype=torch.float64).expand(batch)
    t_e = torch.as_tensor(t_e, device=z.device, dtype=torch.float64).expand(batch)
    n = steps.to(device=z.device, dtype=torch.float64)
    schedule = as_schedule(schedule).to(device=z.device, dtype=work_dtype)
    rows_of = getattr(denoiser, "rows", None)
    for j in range(max(values)):
        active = (steps > j).nonzero().squeeze(1)
        on_z = active.to(z.device)
        ts, te, nb = t_s[on_z], t_e[on_z], n[on_z]
        t_a, t_b = schedule.solver_time(ts, te, j, nb), schedule.solver_time(ts, te, j + 1, nb)
        za = z[on_z]
        if rows_of is not None:
            out = rows_of(active)(za, schedule.timestep(t_a)).to(work_dtype)
        else:
            every = torch.zeros(batch, dtype=t_a.dtype, device=z.device)
            every[on_z] = t_a
            out = denoiser(z, schedule.timestep(every)).to(work_dtype)[on_z]
        x0, eps = x0_eps_from_output(out, za, *schedule.alpha_sigma(t_a, za), prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        z[on_z] = schedule.marginal(x0, eps, t_b)
    return z.to(z_s.dtype)


__all__ = ["Denoiser", "TEACHER_PREDICTION_TYPES", "solve_window", "x0_eps_from_output"]
