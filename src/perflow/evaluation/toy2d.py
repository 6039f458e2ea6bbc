"""The analytic 2-D case: a Gaussian-mixture teacher, small MLP reflow students, exact metrics.

The teacher is exact (:class:`perflow.builtin.gaussian_mixture.GaussianMixture`), so the only
errors are the sampler's. Students are small MLPs trained with the project's objective,
:func:`perflow.objective.reflow_example` (K windows, ``n`` DDIM teacher steps per window),
and sampled with :class:`perflow.PeRFlowScheduler`. The distance to the data distribution is
the sliced Wasserstein distance to exact samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from perflow.builtin.gaussian_mixture import GaussianMixture, default_mixture

from . import metrics
from .harness import EvalResult, Metrics, Sampler, compare_samplers
from .samplers import BASELINE_SAMPLERS, baseline_scheduler

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def teacher_scheduler_config() -> dict:
    """The 2-D teacher's diffusers scheduler config: SD's beta schedule, epsilon prediction."""
    return dict(SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def sd_alphas_cumprod() -> torch.Tensor:
    """``abar[0..999]`` of SD's ``scaled_linear`` schedule (float64), built by diffusers."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SD_SCHEDULE).alphas_cumprod.to(torch.float64)


class MLPStudent(nn.Module):
    """``(z (B, D), timestep (B,) = t T) -> output (B, D)``: sinusoidal time features + a SiLU MLP."""

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, time_features: int = 32, num_train_timesteps: int = 1000):
        super().__init__()
        self.time_features = time_features
        self.num_train_timesteps = num_train_timesteps
        layers: list[nn.Module] = [nn.Linear(dim + time_features, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timestep, dtype=torch.float32, device=z.device).expand(z.shape[0]) / self.num_train_timesteps
        freqs = torch.exp(torch.linspace(0, math.log(1000.0), self.time_features // 2, device=z.device))
        ang = t[:, None] * freqs[None] * math.pi  # (B, F/2)
        return self.net(torch.cat([z.float(), ang.sin(), ang.cos()], dim=1))


@dataclass
class Student2D:
    model: MLPStudent
    scheduler_config: dict

    def make_scheduler(self):
        from perflow.scheduler import PeRFlowScheduler

        return PeRFlowScheduler(**self.scheduler_config)


def train_2d_student(
    gmm: GaussianMixture | None = None,
    num_time_windows: int = 4,
    max_steps: int = 600,
    batch_size: int = 1024,
    num_solver_steps: int = 8,
    prediction_type: str = "velocity",
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> Student2D:
    """Train an MLP student on the mixture with :func:`perflow.objective.reflow_example`."""
    from tqdm.auto import tqdm

    from perflow.objective import reflow_example
    from perflow.windows import equal_boundaries

    gmm = gmm or default_mixture()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    abar = sd_alphas_cumprod()
    denoiser = gmm.denoiser(abar)
    boundaries = equal_boundaries(num_time_windows)
    model = MLPStudent(gmm.dim)
    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_steps)
    bar = tqdm(range(max_steps), desc=f"2-D reflow student (K={num_time_windows})", unit="step", disable=not progress, leave=False)
    for step in bar:
        x0 = gmm.sample(batch_size, gen).float()
        ex = reflow_example(denoiser, x0, boundaries, abar, num_solver_steps, prediction_type, generator=gen)
        loss = (model(ex.z_t, ex.timestep) - ex.target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval().requires_grad_(False)
    config = dict(SD_SCHEDULE, prediction_type=prediction_type, num_time_windows=num_time_windows)
    return Student2D(model, config)


def evaluate_2d(
    students: dict[str, tuple[Student2D, str]],
    gmm: GaussianMixture | None = None,
    steps: tuple[int, ...] = (1, 2, 4, 8),
    baselines: tuple[str, ...] = BASELINE_SAMPLERS,
    num_samples: int = 2000,
    reference_steps: int = 100,
    seed: int = 0,
    keep_trajectories: int = 40,
    flow_steps: int = 32,
    progress: bool = True,
) -> EvalResult:
    """Compare 2-D students (``{name: (student, kind)}``) with the exact teacher's diffusers solvers.

    Metrics: ``sw`` (sliced Wasserstein-2 to ``num_samples`` fresh exact data samples),
    ``paired_mse`` to the teacher's ``reference_steps``-step DDIM output, and trajectory straightness.
    """
    gmm = gmm or default_mixture()
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, gmm.dim, generator=gen)
    exact = gmm.sample(num_samples, torch.Generator().manual_seed(seed + 1))
    teacher_fn = gmm.denoiser(sd_alphas_cumprod())
    sched_cfg = teacher_scheduler_config()
    samplers = [
        Sampler(name, lambda z, t, m=st.model: m(z, t), st.make_scheduler, kind) for name, (st, kind) in students.items()
    ]
    samplers += [Sampler(f"teacher {b}", teacher_fn, lambda b=b: baseline_scheduler(b, sched_cfg)) for b in baselines]
    reference = Sampler("teacher ddim", teacher_fn, lambda: baseline_scheduler("ddim", sched_cfg), "reference")
    sw = lambda x: metrics.sliced_wasserstein(x, exact, seed=seed)  # noqa: E731
    result = compare_samplers(
        samplers, reference, noise, steps, reference_steps, Metrics(decode=lambda z: z.double(), extra={"sw": sw}),
        keep_trajectories=keep_trajectories, flow_steps=flow_steps, progress=progress,
    )
    # finite-sample floor: two independent exact sample sets of the same size
    result.meta["sw_exact_vs_exact"] = metrics.sliced_wasserstein(
        gmm.sample(num_samples, torch.Generator().manual_seed(seed + 2)), exact, seed=seed
    )
    result.meta["num_samples"] = num_samples
    return result


def density_grid(gmm: GaussianMixture, extent: float = 3.2, n: int = 121) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X, Y, log p)`` of the data density on an ``n x n`` grid over ``[-extent, extent]^2``."""
    xs = torch.linspace(-extent, extent, n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="xy")
    logp = gmm.log_prob(torch.stack([X.ravel(), Y.ravel()], 1)).reshape(n, n)
    return X, Y, logp
