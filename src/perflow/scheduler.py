"""``PeRFlowScheduler``: the diffusers adapter for sampling a PeRFlow model.

``docs/method.md``, row "sampler". The scheduler holds no maths of its own: the teacher's
noise schedule (:class:`perflow.schedule.DiscreteVPSchedule`), the window look-up and its
``lam``/``eta`` (:func:`perflow.windows.window_of`), the boundaries
(:func:`perflow.windows.resolve_boundaries`) and the output-to-velocity conversion
(:mod:`perflow.parameterization`) come from the maths modules; this module only
follows diffusers' scheduler contract (``ConfigMixin``, ``set_timesteps``, ``step``,
``add_noise``, an output dataclass).

A step at time ``t_c`` in window ``(t_s, t_e)`` turns the model output into the
velocity ``v`` (``velocity``: ``v = out``; epsilon-type: ``v = (z_e_hat - z) / (t_e - t_c)``)
and takes one Euler step to the next scheduled time: ``z_next = z + (t_next - t_c) v``;
``pred_original_sample`` is the extrapolation to ``t = 0``: ``x0_hat = z + (0 - t_c) v``.
``t_c = timestep / T``, except that a step starting a window off the ``1/T`` grid starts
on the boundary exactly (:meth:`PeRFlowScheduler.set_timesteps`).

It loads the released PeRFlow checkpoints' ``scheduler_config.json`` unchanged and
reproduces their timesteps (``t T`` truncated to int64) and latents (bit for bit for
boundaries on the grid, e.g. every released ``K = 4`` model).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging

from .parameterization import check_model_output_type, clipped_epsilon, epsilon_from_output, velocity_from_output
from .schedule import DiscreteVPSchedule
from .solver import TEACHER_PREDICTION_TYPES
from .tensors import expand_like
from .windows import PREDICTION_TYPES, check_prediction_type, inference_times, resolve_boundaries, window_of

logger = logging.get_logger(__name__)


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


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Piecewise rectified flow sampler (PeRFlow, arXiv 2405.07510), a drop-in diffusers scheduler.

    Use it in any Stable Diffusion pipeline (SD1.5, SD2.1, SDXL, ControlNet, ...)::

        pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="diff_eps")

    Args:
        num_train_timesteps: ``T``, the teacher's number of training timesteps.
        beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the teacher's
            noise schedule, turned into ``alphas_cumprod`` exactly as ``DDIMScheduler`` does
            (:func:`perflow.schedule.alphas_cumprod_from_config`); with zero terminal SNR only the
            ``velocity`` parameterization is accepted.
        set_alpha_to_one: kept for compatibility with released configs; unused (the sampler
            ends at ``t = 0``, whose ``abar`` is ``abar[0]``).
        prediction_type: the student's parameterization: ``diff_eps``, ``ddim_eps`` or ``velocity``.
        t_noise, t_clean: first and last boundary of the equal windows.
        num_time_windows: ``K``, the number of equal windows (ignored, and updated, when
            ``window_boundaries`` is given).
        window_boundaries: explicit boundaries ``[1, ..., 0]``, strictly decreasing, each window's
            ends at distinct teacher indices ``round(t T) - 1``; ``None`` for ``K`` equal windows.
        model_output_type: what the model's raw output predicts, in diffusers' words: ``epsilon``
            (the released checkpoints), ``v_prediction`` or ``sample``; with an epsilon-type
            ``prediction_type`` it is turned into the window's epsilon at ``(z, t_c)``
            (:func:`perflow.parameterization.epsilon_from_output`), so a student that keeps its
            v-prediction teacher's output type samples, untrained, as the teacher's DDIM.
        clip_sample, clip_sample_range: the teacher's clean-sample clipping (a pixel-space DDPM's
            config has ``clip_sample: true``); a ``ddim_eps`` student of such a teacher was trained
            to clip as its teacher does (:func:`perflow.parameterization.clipped_epsilon`) and is
            sampled the same way. Ignored by the other parameterizations.
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
        rescale_betas_zero_snr: bool = False,
        model_output_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ):
        if prediction_type in TEACHER_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is a teacher's (diffusion) prediction type; a PeRFlow "
                f"model uses one of {PREDICTION_TYPES}: pass it explicitly, e.g. "
                "PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type='diff_eps')"
            )
        check_prediction_type(prediction_type)
        check_model_output_type(model_output_type, prediction_type)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        schedule = DiscreteVPSchedule.from_config(self.config)  # abar (T,) float32, as DDIMScheduler
        boundaries = resolve_boundaries(
            num_time_windows, window_boundaries, schedule, prediction_type=prediction_type,
            t_noise=t_noise, t_clean=t_clean,
        )  # (K + 1,) float64, decreasing: [t_K, ..., t_0]
        if window_boundaries is not None:
            # the explicit boundaries define K; keep the config consistent and JSON-serialisable
            self.register_to_config(
                window_boundaries=boundaries.tolist(), num_time_windows=boundaries.numel() - 1
            )
        self.alphas_cumprod = schedule.alphas_cumprod  # (T,) float32
        self.schedule = schedule.to(dtype=torch.float64)  # the same values; lam/eta are computed in float64
        self.boundaries = boundaries
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        self._clip = float(clip_sample_range) if (clip_sample and prediction_type == "ddim_eps") else None
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        # set by set_timesteps, on the sampling device: (N,) float64 each
        self._scheduled: torch.Tensor | None = None  # the timesteps
        self._times: torch.Tensor | None = None  # exact step start times t_j
        self._step_ts: torch.Tensor | None = None  # tau_j T, the times step integrates between

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

        Step start times ``t_j`` come from :func:`perflow.windows.inference_times`: with ``N >= K``
        each window gets ``N // K`` steps (the first ``N % K`` one more), evenly spaced from
        its start; with ``N < K`` a step crosses windows (a warning is logged).

        The pipeline sees the released integer timesteps ``floor(t_j T)``. :meth:`step` integrates
        between the times ``tau_j``: a step starting a window starts on its boundary exactly,
        ``tau_j = t_j`` (so the previous window's last step ends on it and no Euler step crosses a
        boundary with the wrong window's velocity), any other step at ``tau_j = floor(t_j T) / T``,
        the time the model is told (the released behaviour). For boundaries on the ``1/T`` grid
        (every ``K`` dividing ``T``, all released models) ``tau_j = timestep_j / T`` throughout.
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
        boundaries = self.boundaries.cpu()
        times = inference_times(num_inference_steps, boundaries)  # (N,) float64
        timesteps = (times * T).to(torch.int64)  # truncation, as the released scheduler
        if not bool((timesteps[1:] < timesteps[:-1]).all()) or int(timesteps[-1]) < 1:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too large for T={T} and these windows: "
                f"the integer timesteps t*T repeat or reach 0 ({timesteps.tolist()}); use fewer steps"
            )
        starts_window = (times.unsqueeze(-1) == boundaries).any(-1)  # (N,)
        step_ts = torch.where(starts_window, times * T, timesteps.to(torch.float64))  # tau_j T
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device)
        self._scheduled, self._times, self._step_ts = (
            x.to(self.timesteps.device) for x in (timesteps.to(torch.float64), times, step_ts)
        )
        self._to_device(self.timesteps.device)

    def _to_device(self, device: torch.device) -> None:
        """Keep the look-up tables on the sampling device, so ``step`` copies nothing host-to-device."""
        if self.boundaries.device != device:
            self.boundaries = self.boundaries.to(device)
            self.schedule = self.schedule.to(device)
        if self._times is not None and self._times.device != device:
            self._scheduled, self._times, self._step_ts = (
                x.to(device) for x in (self._scheduled, self._times, self._step_ts)
            )

    def _timestep_tensor(self, timestep: int | float | torch.Tensor, device: torch.device) -> torch.Tensor:
        """The timestep as a float64 tensor on ``device``: 0-d or per sample (B,)."""
        if isinstance(timestep, torch.Tensor):
            return timestep.to(device=device, dtype=torch.float64)
        return torch.full((), float(timestep), dtype=torch.float64, device=device)

    def _step_times(self, step_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tau_c, tau_next - tau_c, t_lookup)`` of each timestep (``()`` or ``(B,)`` float64).

        A timestep the scheduler produced (equal to ``timesteps[j]``) steps from ``tau_j`` to
        ``tau_{j+1}`` (0 after the last) in the window holding the exact ``t_j``. Any other
        ``timestep`` is taken literally: ``timestep / T`` to the largest scheduled timestep below
        it (over ``T``; 0 below the last), in the window within ``0.1 / T`` above it (as released).
        Tensor operations only (no host-device synchronisation).
        """
        T = self.config.num_train_timesteps
        zero = torch.zeros((), dtype=torch.float64, device=step_t.device)
        scheduled = self._scheduled  # (N,)
        match = scheduled == step_t.unsqueeze(-1)  # (..., N): at most one true per timestep
        produced = match.any(-1)
        pick = lambda table: torch.where(match, table, zero).sum(-1)  # noqa: E731  (table[j] of the match)
        next_ts = torch.cat([self._step_ts[1:], zero.reshape(1)])
        below = scheduled < step_t.unsqueeze(-1)
        foreign_next = torch.where(below, scheduled, zero).amax(-1)
        cur = torch.where(produced, pick(self._step_ts), step_t)  # tau_c T
        nxt = torch.where(produced, pick(next_ts), foreign_next)  # tau_next T
        # the released look-up's tolerance: a time within 0.1/T above a boundary starts that window
        t_lookup = torch.where(produced, pick(self._times), step_t / T - 0.1 / T)
        return cur / T, (nxt - cur) / T, t_lookup  # dt as (next - cur) / T: the released arithmetic

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        **kwargs,
    ) -> PeRFlowSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One Euler step of the piecewise linear flow from the step's time ``t_c``.

        For a timestep of :attr:`timesteps`, ``t_c`` and the next time ``t_next`` are the
        scheduler's own step times (see :meth:`set_timesteps`: ``timestep / T`` except on an
        off-grid window boundary, where the exact boundary); any other timestep is taken
        literally, ``t_c = timestep / T`` and ``t_next`` the largest scheduled timestep below it
        over ``T`` (0 after the last). ``v`` is the velocity of the window holding ``t_c`` (a time
        on a boundary belongs to the window that starts there; within ``0.1 / T`` for a foreign
        timestep, as released); ``prev_sample = z + (t_next - t_c) v`` and
        ``pred_original_sample = z - t_c v``. ``timestep`` may be a number or a tensor, 0-d or per
        sample ``(B,)``. Computed in float32 (or the sample's dtype if wider); no host-device
        synchronisation, so the loop can be captured or compiled.

        ``generator`` and any other keyword of diffusers' scheduler contract (``eta``,
        ``use_clipped_model_output``, ``variance_noise``, ``s_churn``, ...) are accepted and
        ignored: the PeRFlow sampler is deterministic.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        work = torch.promote_types(sample.dtype, torch.float32)
        z = sample.to(work)  # (B, C, H, W)
        out = model_output.to(work)
        device = z.device
        self._to_device(device)
        step_t = self._timestep_tensor(timestep, device)  # () or (B,)
        t_c, dt, t_lookup = self._step_times(step_t)
        window = window_of(t_lookup, self.boundaries, self.schedule, self.config.prediction_type)
        if self.config.model_output_type != "epsilon" or self._clip is not None:
            alpha, sigma = self.schedule.alpha_sigma(t_c, z)
            out = epsilon_from_output(out, z, alpha, sigma, self.config.model_output_type)
            if self._clip is not None:
                alpha_e = self.schedule.alpha_sigma(window.t_e, z)[0]
                out = clipped_epsilon(out, z, t_c, window, alpha, sigma, alpha_e, self._clip)
        v = velocity_from_output(out, z, t_c, window)
        # at or below t = 0 the flow has arrived: no velocity (avoids 0/0 at the last window's end)
        v = torch.where(expand_like(t_c, z) > 0, v, torch.zeros((), dtype=work, device=device))
        prev = z + expand_like(dt, z) * v
        x0 = z - expand_like(t_c, z) * v
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
        return self.schedule.marginal(original_samples, noise, t)
