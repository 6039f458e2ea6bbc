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
    ``perflow.num_solver_steps`` as a list): the rows advance in lockstep on their own grids
    ``solver_time(t_s, t_e, j, n_b)``, step ``j`` evaluating those with ``n_b > j`` in one call on
    ``denoiser.rows(index)`` (:func:`perflow.denoisers.unet_denoiser`) when the denoiser has it, else on
    the whole batch, keeping those rows (the same result, at more teacher evaluations): ``sum_b n_b``
    evaluations in ``max_b n_b`` calls.
    """
    batch = z_s.shape[0]
    per_sample = None  # (B,) int64 on the CPU when the rows' n differ
    if isinstance(num_steps, torch.Tensor) and num_steps.dim() > 0:
        per_sample = num_steps.to("cpu", torch.long).expand(batch)
        if bool((per_sample == per_sample[0]).all()):
            num_steps, per_sample = int(per_sample[0]), None
    fewest, most = (int(num_steps),) * 2 if per_sample is None else (int(per_sample.min()), int(per_sample.max()))
    if fewest < 1:
        raise ValueError(f"the teacher solver needs num_steps >= 1, got {fewest}")
    if prediction_type not in TEACHER_PREDICTION_TYPES:
        raise ValueError(
            f"unknown teacher prediction_type {prediction_type!r}; expected one of {TEACHER_PREDICTION_TYPES}"
        )
    work_dtype = torch.promote_types(z_s.dtype, torch.float32)
    z = z_s.to(work_dtype)
    t_s = torch.as_tensor(t_s, device=z.device, dtype=torch.float64).expand(batch)
    t_e = torch.as_tensor(t_e, device=z.device, dtype=torch.float64).expand(batch)
    n = most if per_sample is None else per_sample.to(device=z.device, dtype=torch.float64)
    schedule = as_schedule(schedule).to(device=z.device, dtype=work_dtype)
    rows_of = getattr(denoiser, "rows", None)
    for j in range(most):
        # the rows still solving (None: all of them); with n per sample, rows whose n_b <= j are done
        active = None if per_sample is None or fewest > j else (per_sample > j).nonzero().squeeze(1).to(z.device)
        ts, te, nb, za = (t_s, t_e, n, z) if active is None else (t_s[active], t_e[active], n[active], z[active])
        t_a, t_b = schedule.solver_time(ts, te, j, nb), schedule.solver_time(ts, te, j + 1, nb)
        if active is None:
            out = denoiser(za, schedule.timestep(t_a))
        elif rows_of is not None:
            out = rows_of(active)(za, schedule.timestep(t_a))
        else:  # the whole batch (the finished rows at t = 0), keeping the active rows
            every = torch.zeros(batch, dtype=t_a.dtype, device=z.device).index_copy(0, active, t_a)
            out = denoiser(z, schedule.timestep(every))[active]
        x0, eps = x0_eps_from_output(out.to(work_dtype), za, *schedule.alpha_sigma(t_a, za), prediction_type)
        if clip_sample is not None:
            x0 = x0.clamp(-clip_sample, clip_sample)
        z_b = schedule.marginal(x0, eps, t_b)
        z = z_b if active is None else z.index_put((active,), z_b)
    return z.to(z_s.dtype)


__all__ = ["Denoiser", "TEACHER_PREDICTION_TYPES", "solve_window", "x0_eps_from_output"]
