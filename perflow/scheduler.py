"""``PeRFlowScheduler``: the diffusers adapter for sampling a PeRFlow model.

``shared/METHOD.md`` section 4. The scheduler holds no maths of its own: the
window look-up, ``abar``, ``lam``/``eta`` and the output-to-velocity conversion come
from :mod:`perflow.windows` and :mod:`perflow.parameterization`; this module only
follows diffusers' scheduler contract (``ConfigMixin``, ``set_timesteps``, ``step``,
``add_noise``, an output dataclass).

A step at time ``t_c = timestep / T`` in window ``(t_s, t_e)`` turns the model
output into the velocity ``v`` (``velocity``: ``v = out``; epsilon-type:
``v = (z_e_hat - z) / (t_e - t_c)``) and takes one Euler step to the next scheduled
time: ``z_next = z + (t_next - t_c) v``; ``pred_original_sample`` is the
extrapolation to ``t = 0``: ``x0_hat = z + (0 - t_c) v``.

It loads the released PeRFlow checkpoints' ``scheduler_config.json`` unchanged and
reproduces their timesteps (``t T`` truncated to int64) and latents.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging

from .objective import forward_marginal
from .parameterization import _bcast, velocity_from_output
from .windows import (
    PREDICTION_TYPES,
    check_boundaries,
    check_prediction_type,
    equal_boundaries,
    inference_times,
    window_bounds,
    window_coefficients,
)

logger = logging.get_logger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_TEACHER_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class PeRFlowSchedulerOutput(BaseOutput):
    """Output of :meth:`PeRFlowScheduler.step`.

    Args:
        prev_sample: ``z_next = z + (t_next - t_c) v``, the sample at the next scheduled time
            (B, C, H, W), in the input sample's dtype.
        pred_original_sample: ``x0_hat = z + (0 - t_c) v``, the current velocity extrapolated
            to ``t = 0`` (a preview of the clean sample), in the input sample's dtype.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None,
) -> torch.Tensor:
    """``abar[0..T-1]`` (float32) built by diffusers' own ``DDIMScheduler`` from the same beta config."""
    from diffusers import DDIMScheduler

    if trained_betas is None and beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES} "
            "or pass trained_betas"
        )
    if trained_betas is not None and len(trained_betas) != num_train_timesteps:
        raise ValueError(
            f"trained_betas has {len(trained_betas)} values but num_train_timesteps={num_train_timesteps}; "
            "pass one beta per training timestep"
        )
    ddim = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        trained_betas=trained_betas,
    )
    return ddim.alphas_cumprod


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Piecewise rectified flow sampler (PeRFlow, arXiv 2405.07510), a drop-in diffusers scheduler.

    Use it in any Stable Diffusion pipeline (SD1.5, SD2.1, SDXL, ControlNet, ...)::

        pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps")

    Args:
        num_train_timesteps: ``T``, the teacher's number of training timesteps.
        beta_start, beta_end, beta_schedule, trained_betas: the teacher's noise schedule, turned
            into ``alphas_cumprod`` exactly as ``DDIMScheduler`` does.
        set_alpha_to_one: kept for compatibility with released configs; unused (the sampler
            ends at ``t = 0``, whose ``abar`` is ``abar[0]``).
        prediction_type: the student's parameterization: ``diff_eps``, ``ddim_eps`` or ``velocity``.
        t_noise, t_clean: first and last boundary of the equal windows.
        num_time_windows: ``K``, the number of equal windows (ignored, and updated, when
            ``window_boundaries`` is given).
        window_boundaries: explicit boundaries ``[1, ..., 0]``, strictly decreasing; ``None``
            for ``K`` equal windows.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = False,
        prediction_type: str = "diff_eps",
        t_noise: float = 1.0,
        t_clean: float = 0.0,
        num_time_windows: int = 4,
        window_boundaries: list[float] | None = None,
    ):
        if prediction_type in _TEACHER_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is a teacher's (diffusion) prediction type; a PeRFlow "
                f"model uses one of {PREDICTION_TYPES}: pass it explicitly, e.g. "
                "PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type='diff_eps')"
            )
        check_prediction_type(prediction_type)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        if window_boundaries is not None:
            if (t_noise, t_clean) != (1.0, 0.0):
                raise ValueError(
                    "window_boundaries already fix the first and last boundary (1 and 0); "
                    f"leave t_noise=1.0 and t_clean=0.0 (got {t_noise}, {t_clean})"
                )
            boundaries = check_boundaries(window_boundaries)
            # the explicit boundaries define K; keep the config consistent and JSON-serialisable
            self.register_to_config(
                window_boundaries=boundaries.tolist(), num_time_windows=boundaries.numel() - 1
            )
        else:
            boundaries = equal_boundaries(num_time_windows, t_noise, t_clean)

        self.alphas_cumprod = _alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )  # (T,) float32, as DDIMScheduler
        self.boundaries = boundaries  # (K + 1,) float64, decreasing: [t_K, ..., t_0]
        self._abar64 = self.alphas_cumprod.to(torch.float64)  # the same values, for lam/eta
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None

    @property
    def num_windows(self) -> int:
        """``K``, the number of time windows."""
        return self.boundaries.numel() - 1

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity (a PeRFlow model takes the latent as it is); present for interchangeability."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set the ``N`` sampling timesteps ``t T`` (truncated to int64), on ``device``.

        Step start times come from :func:`perflow.windows.inference_times`: with ``N >= K``
        each window gets ``N // K`` steps (the first ``N % K`` one more), evenly spaced from
        its start; with ``N < K`` a step crosses windows (a warning is logged).
        """
        try:
            num_inference_steps = operator.index(num_inference_steps)
        except TypeError:
            raise ValueError(
                f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}"
            ) from None
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        K = self.num_windows
        if num_inference_steps < K:
            logger.warning(
                f"num_inference_steps={num_inference_steps} is below the number of time windows K={K}: "
                "a step crosses windows using the velocity of the window it starts in, which is exact "
                "only for a flow that is straight across them; use at least K steps for full quality."
            )
        T = self.config.num_train_timesteps
        times = inference_times(num_inference_steps, self.boundaries)  # (N,) float64
        timesteps = (times * T).to(torch.int64)  # truncation, as the released scheduler
        if not bool((timesteps[1:] < timesteps[:-1]).all()) or int(timesteps[-1]) < 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too large for T={T} and these windows: "
                f"the integer timesteps t*T repeat or reach 0 ({timesteps.tolist()}); use fewer steps"
            )
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device)
        self._to_device(self.timesteps.device)

    def _to_device(self, device: torch.device) -> None:
        """Keep the look-up tables on the sampling device, so ``step`` copies nothing host-to-device."""
        if self.boundaries.device != device:
            self.boundaries = self.boundaries.to(device)
            self._abar64 = self._abar64.to(device)

    def _timestep_tensor(self, timestep: int | float | torch.Tensor, device: torch.device) -> torch.Tensor:
        """The timestep as a float64 tensor on ``device``: 0-d or per sample (B,)."""
        if isinstance(timestep, torch.Tensor):
            return timestep.to(device=device, dtype=torch.float64)
        return torch.full((), float(timestep), dtype=torch.float64, device=device)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> PeRFlowSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step of the piecewise linear flow from ``t_c = timestep / T``.

        ``v`` is the velocity of the window holding ``t_c`` (a time on a boundary belongs to
        the window that starts there, within ``0.1 / T`` as released);
        ``prev_sample = z + (t_next - t_c) v`` where ``t_next`` is the largest scheduled time
        strictly below ``t_c`` (0 after the last), and ``pred_original_sample = z - t_c v``.
        ``timestep`` may be a number or a tensor, 0-d or per sample ``(B,)``, and need not be
        one of :attr:`timesteps`. Computed in float32 (or the sample's dtype if wider); no
        host-device synchronisation, so the loop can be captured or compiled.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        work = torch.promote_types(sample.dtype, torch.float32)
        z = sample.to(work)  # (B, C, H, W)
        out = model_output.to(work)
        device = z.device
        self._to_device(device)
        T = self.config.num_train_timesteps
        step_t = self._timestep_tensor(timestep, device)  # () or (B,)
        t_c = step_t / T
        # the released look-up's tolerance: a time within 0.1/T above a boundary starts that window
        t_s, t_e = window_bounds(t_c - 0.1 / T, self.boundaries)
        lam, eta = window_coefficients(t_s, t_e, self._abar64, self.config.prediction_type)
        v = velocity_from_output(out, z, t_c, t_s, t_e, lam, eta, self.config.prediction_type)
        # at or below t = 0 the flow has arrived: no velocity (avoids 0/0 at the last window's end)
        v = torch.where(_bcast(t_c, z) > 0, v, torch.zeros((), dtype=work, device=device))
        scheduled = self.timesteps.to(device=device, dtype=torch.float64)  # (N,)
        below = scheduled < step_t.unsqueeze(-1)  # (..., N)
        next_t = torch.where(below, scheduled, torch.zeros((), dtype=torch.float64, device=device)).amax(-1)
        dt = (next_t - step_t) / T
        prev = z + _bcast(dt, z) * v
        x0 = z - _bcast(t_c, z) * v
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return PeRFlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: int | torch.Tensor
    ) -> torch.Tensor:
        """The teacher's forward process at ``t = timesteps / T``:
        ``sqrt(abar(t)) x0 + sqrt(1 - abar(t)) noise`` with ``abar(t) = abar[clamp(round(t T) - 1, 0, T - 1)]``
        (so timestep 0 uses ``abar[0]``, no wrap-around)."""
        T = self.config.num_train_timesteps
        t = self._timestep_tensor(timesteps, original_samples.device) / T
        return forward_marginal(original_samples, noise, t, self.alphas_cumprod)
