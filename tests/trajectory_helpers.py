"""A test-only measure of training: the student's distance to the teacher's own ODE solution
(formerly ``perflow.training.validation.trajectory_error``, used only by tests)."""

from __future__ import annotations

import torch

from perflow.denoisers import Condition, unet_denoiser
from perflow.training.validation import sample_student


@torch.no_grad()
def trajectory_error(
    student: torch.nn.Module,
    teacher,
    scheduler,
    cond: Condition,
    shape: tuple[int, ...],
    num_steps: int,
    solver_steps: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """Mean squared distance between the student's ``num_steps``-step PeRFlow sample and the teacher's
    own ODE solution from the same noise ``z_1`` (window by window, ``solver_steps`` DDIM steps each,
    guidance 1 on ``cond``): ``mean |z_0^student - Phi(z_1, 1, 0)|^2``. What piecewise reflow minimises."""
    from perflow.solver import solve_window

    device = next(student.parameters()).device
    gen_state = generator.get_state() if generator is not None else None
    z_student = sample_student(student, scheduler, cond, None, shape, num_steps, 1.0, generator)
    if generator is not None:
        generator.set_state(gen_state)  # the same initial noise for the teacher
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    den = unet_denoiser(teacher.unet, cond)
    b = scheduler.boundaries.to(torch.float64).cpu()
    for j in range(b.numel() - 1):
        t_s = torch.full((shape[0],), float(b[j]), dtype=torch.float64)
        t_e = torch.full((shape[0],), float(b[j + 1]), dtype=torch.float64)
        z = solve_window(den, z, t_s, t_e, solver_steps, teacher.schedule, teacher.prediction_type)
    return (z_student.float() - z.float()).square().mean().item()
