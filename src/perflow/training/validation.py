"""Validation previews: sample the student with :class:`perflow.PeRFlowScheduler`, save a grid PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..denoisers import Condition, unet_denoiser
from ..io import atomic_path


@torch.no_grad()
def sample_student(
    unet: torch.nn.Module,
    scheduler,
    cond: Condition,
    uncond: Condition | None,
    shape: tuple[int, ...],
    num_steps: int,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latents ``(B, C, h, w)`` from noise by the PeRFlow sampler:
    ``z <- scheduler.step(out, t, z)`` over ``scheduler.timesteps``, ``out = uncond + w (cond - uncond)``."""
    device = next(unet.parameters()).device
    scheduler.set_timesteps(num_steps, device=device)
    z = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    use_cfg = guidance_scale != 1.0 and uncond is not None
    den = unet_denoiser(unet, cond, uncond if use_cfg else None, guidance_scale)
    for t in scheduler.timesteps:
        out = den(z, t.expand(shape[0]).float())
        z = scheduler.step(out.float(), t, z).prev_sample
    return z


def image_grid(images: torch.Tensor, nrow: int | None = None, min_size: int = 64) -> np.ndarray:
    """``(B, C, H, W)`` in ``[-1, 1]`` -> uint8 ``(rows H', cols W', 3)`` grid (small images upscaled, nearest)."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    b, _, h, w = images.shape
    factor = max(1, -(-min_size // max(h, w)))
    if factor > 1:
        images = images.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
        h, w = h * factor, w * factor
    nrow = nrow or int(np.ceil(np.sqrt(b)))
    ncol = int(np.ceil(b / nrow))
    pad = 2
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = (
            images[i].permute(1, 2, 0).numpy()
        )
    return grid


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
    guidance 1 on ``cond``, with the teacher's ``clip_sample`` as in training): ``mean |z_0^student - Phi(z_1, 1, 0)|^2``. What piecewise reflow minimises."""
    from ..solver import solve_window

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
        z = solve_window(den, z, t_s, t_e, solver_steps, teacher.schedule, teacher.prediction_type,
                         getattr(teacher, "clip_sample", None))
    return (z_student.float() - z.float()).square().mean().item()


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write an RGB uint8 array as PNG atomically (:func:`perflow.io.atomic_path`; permissions from the umask)."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)
