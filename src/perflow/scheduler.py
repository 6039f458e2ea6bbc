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

The same class samples flow-matching students (SD3, Flux: ``schedule_kind="flow_matching"``,
:class:`perflow.schedule.FlowMatchSchedule`): ``t = sigma``, timesteps ``sigma T`` as float32 (not
truncated), windows fixed in ``sigma`` at every resolution, and the flow-matching scheduler's
contract that the SD3 and Flux pipelines use (``set_timesteps(num_inference_steps, device, sigmas=...,
mu=...)``, ``sigmas``, ``set_begin_index``, ``scale_noise``).
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
from .schedule import FLOW_MATCH_KEYS, DiscreteVPSchedule, FlowMatchSchedule
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

    and in SD3 and Flux pipelines (text-to-image and image-to-image), from their
    ``FlowMatchEulerDiscreteScheduler`` config (the kind and ``velocity`` are then picked)::

        pipe.scheduler = PeRFlowScheduler.from_config(pipe.scheduler.config)

    Args:
        num_train_timesteps: ``T``, the teacher's number of training timesteps.
        beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the teacher's
            noise schedule, turned into ``alphas_cumprod`` exactly as ``DDIMScheduler`` does
            (:func:`perflow.schedule.alphas_cumprod_from_config`); with zero terminal SNR only the
            ``velocity`` parameterization is accepted.
        set_alpha_to_one: kept for compatibility with released configs; unused (the sampler
            ends at ``t = 0``, whose ``abar`` is ``abar[0]``).
        prediction_type: the student's parameterization: ``diff_eps``, ``ddim_eps`` or ``velocity``
            (``None``: ``diff_eps`` for a variance-preserving teacher, ``velocity`` for flow matching,
            the only one it accepts).
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
        schedule_kind: ``discrete_vp`` (the beta schedule above) or ``flow_matching``; ``None``:
            ``flow_matching`` when ``shift`` or ``use_dynamic_shifting`` is given (a
            ``FlowMatchEulerDiscreteScheduler`` config), else ``discrete_vp``.
        shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len, max_image_seq_len:
            the flow-matching teacher's shift (``FlowMatchEulerDiscreteScheduler``'s meaning), kept in
            the config for the pipelines' ``calculate_shift`` and the trainer's teacher solve; the
            sampler's grid does not depend on them (windows are fixed in ``sigma``). ``None`` for a
            variance-preserving teacher.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + ["FlowMatchEulerDiscreteScheduler"]
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
        prediction_type: str | None = None,
        t_noise: float = 1.0,
        t_clean: float = 0.0,
        num_time_windows: int = 4,
        window_boundaries: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        model_output_type: str = "epsilon",
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        schedule_kind: str | None = None,
        shift: float | None = None,
        use_dynamic_shifting: bool | None = None,
        base_shift: float | None = None,
        max_shift: float | None = None,
        base_image_seq_len: int | None = None,
        max_image_seq_len: int | None = None,
    ):
        if schedule_kind is None:
            schedule_kind = "flow_matching" if (shift is not None or use_dynamic_shifting is not None) else "discrete_vp"
        if schedule_kind not in ("discrete_vp", "flow_matching"):
            raise ValueError(f"unknown schedule_kind {schedule_kind!r}; expected 'discrete_vp' or 'flow_matching'")
        flow = schedule_kind == "flow_matching"
        if prediction_type is None:
            prediction_type = "velocity" if flow else "diff_eps"
        self.register_to_config(schedule_kind=schedule_kind, prediction_type=prediction_type)
        if prediction_type in TEACHER_PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is a teacher's (diffusion) prediction type; a PeRFlow "
                f"model uses one of {PREDICTION_TYPES}: pass it explicitly, e.g. "
                f"PeRFlowScheduler.from_config(pipe.scheduler.config, prediction_type="
                f"{'velocity' if flow else 'diff_eps'!r})"
            )
        check_prediction_type(prediction_type)
        check_model_output_type(model_output_type, prediction_type)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
        if flow:
            schedule = FlowMatchSchedule.from_config(self.config)
            # the teacher's shift settings, filled in, for the pipelines' calculate_shift
            self.register_to_config(**{k: getattr(schedule, k) for k in FLOW_MATCH_KEYS})
        else:
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
        self.alphas_cumprod = None if flow else schedule.alphas_cumprod  # (T,) float32
        self.schedule = schedule.to(dtype=torch.float64)  # the same values; lam/eta are computed in float64
        self.boundaries = boundaries
        if clip_sample and not clip_sample_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {clip_sample_range!r}")
        self._clip = float(clip_sample_range) if (clip_sample and prediction_type == "ddim_eps") else None
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self.sigmas: torch.Tensor | None = None  # flow matching: (N + 1,) step times and the final 0
        self.mu: float | None = None  # flow matching: the pipeline's shift exponent, recorded, not used
        self._begin_index: int | None = None
        # set by set_timesteps, on the sampling device: (N,) float64 each
        self._scheduled: torch.Tensor | None = None  # the timesteps
        self._times: torch.Tensor | None = None  # exact step start times t_j
        self._step_ts: torch.Tensor | None = None  # tau_j T, the times step integrates between

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``, keeping a teacher scheduler's own values.

        A scheduler built in code lists the arguments it left at their defaults in ``_use_default_values``,
        and diffusers' ``from_config`` drops those keys so that the new class's defaults apply: for a
        ``DDPMScheduler()`` that would silently replace its linear 1e-4..0.02 betas (and ``clip_sample``, its
        ``epsilon`` prediction type) by this class's SD defaults. For a config of another scheduler class the
        list is ignored, the schedule's kind is read from the config (:func:`perflow.schedule.scheduler_kind`)
        and a flow-mode DPM-Solver/UniPC config's ``flow_shift`` is its ``shift``. A ``num_time_windows`` that
        disagrees with the config's explicit ``window_boundaries`` is refused unless new boundaries (or
        ``window_boundaries=None``) are given too: the boundaries would otherwise win silently."""
        if config is not None and not isinstance(config, str):
            source = dict(config)
            own = source.get("_class_name") == cls.__name__ or ("num_time_windows" in source and "schedule_kind" in source)
            saved = source.get("window_boundaries")
            if saved is not None and kwargs.get("num_time_windows") not in (None, len(saved) - 1) \
                    and "window_boundaries" not in kwargs:
                raise ValueError(
                    f"num_time_windows={kwargs['num_time_windows']} disagrees with the config's window_boundaries "
                    f"({len(saved) - 1} windows), which would win; pass window_boundaries=None as well for "
                    f"{kwargs['num_time_windows']} equal windows, or new window_boundaries"
                )
            if not own:  # a teacher's config (in memory it carries no _class_name)
                from .schedule import scheduler_kind

                source.pop("_use_default_values", None)
                if "schedule_kind" not in kwargs and "schedule_kind" not in source:
                    kwargs["schedule_kind"] = scheduler_kind(source)
                if kwargs["schedule_kind"] == "flow_matching" and source.get("shift") is None \
                        and source.get("flow_shift") is not None and "shift" not in kwargs:
                    kwargs["shift"] = source["flow_shift"]
                config = source
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def is_flow_matching(self) -> bool:
        """Whether the teacher is a flow-matching model (``schedule_kind == "flow_matching"``)."""
        return self.config.schedule_kind == "flow_matching"

    @property
    def begin_index(self) -> int | None:
        """The first step's index, as set by an image-to-image pipeline (:meth:`set_begin_index`)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Record where an image-to-image pipeline starts in :attr:`timesteps`. :meth:`step` finds each
        step by its timestep, so sampling from any begin index needs nothing else."""
        self._begin_index = begin_index

    @property
    def num_windows(self) -> int:
        """``K``, the number of time windows."""
        return self.boundaries.numel() - 1

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """Identity (a PeRFlow model takes the latent as it is); present for interchangeability."""
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | np.ndarray | torch.Tensor | None = None,
        mu: float | None = None,
        timesteps: list[float] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Set the ``N`` sampling timesteps ``t T`` (truncated to int64; float32 ``sigma T`` for flow matching), on ``device``.

        Flow matching (the SD3/Flux pipelines' call): ``N`` is ``num_inference_steps`` or the length of
        ``sigmas``/``timesteps``. The pipelines' default ``sigmas = linspace(1, 1/N, N)`` means "``N``
        steps" and gets the PeRFlow grid below; other ``sigmas`` (or ``timesteps / T``) are taken as the
        step start times themselves (strictly decreasing in ``(0, 1]``; a step crossing a boundary uses
        the velocity of the window it starts in). ``mu`` (dynamic shift) is recorded and does not move
        the grid: windows are fixed in ``sigma``. A variance-preserving scheduler takes
        ``num_inference_steps`` only.

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
        if self.is_flow_matching:
            return self._set_flow_timesteps(num_inference_steps, device, sigmas, mu, timesteps)
        if sigmas is not None or timesteps is not None:
            raise ValueError(
                "the variance-preserving PeRFlow scheduler sets its own timesteps from num_inference_steps; "
                "do not pass sigmas or timesteps"
            )
        num_inference_steps = self._check_num_steps(num_inference_steps)
        T = self.config.num_train_timesteps
        boundaries = self.boundaries.cpu()
        times = inference_times(num_inference_steps, boundaries)  # (N,) float64
        timesteps = (times * T).to(torch.int64)  # truncation, as the released scheduler

        def distinct(ts: torch.Tensor) -> bool:  # strictly decreasing integer timesteps, none at 0
            return bool((ts[1:] < ts[:-1]).all()) and int(ts[-1]) >= 1

        if not distinct(timesteps):
            most = next((n for n in range(num_inference_steps - 1, 0, -1)
                         if distinct((inference_times(n, boundaries) * T).to(torch.int64))), 1)
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is too large for T={T} and these windows (the integer "
                f"timesteps t*T would repeat or reach 0): use at most {most}; PeRFlow samples in 4-8 steps "
                "(e.g. pipe(..., num_inference_steps=4))"
            )
        starts_window = (times.unsqueeze(-1) == boundaries).any(-1)  # (N,)
        step_ts = torch.where(starts_window, times * T, timesteps.to(torch.float64))  # tau_j T
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device)
        self._scheduled, self._times, self._step_ts = (
            x.to(self.timesteps.device) for x in (timesteps.to(torch.float64), times, step_ts)
        )
        self._to_device(self.timesteps.device)

    def _check_num_steps(self, num_inference_steps) -> int:
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
        return num_inference_steps

    def _set_flow_timesteps(self, num_inference_steps, device, sigmas, mu, timesteps) -> None:
        """:meth:`set_timesteps` for a flow-matching student: exact step times ``t_j``, timesteps ``t_j T`` (float32)."""
        T = self.config.num_train_timesteps
        given = None
        if timesteps is not None:
            given = torch.as_tensor(np.asarray(timesteps, dtype=np.float64)) / T
        elif sigmas is not None:
            given = torch.as_tensor(np.asarray(sigmas, dtype=np.float64))
        if given is not None:
            n = given.numel()
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"num_inference_steps={num_inference_steps} but {n} sigmas/timesteps were given")
            num_inference_steps = n
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        num_inference_steps = self._check_num_steps(num_inference_steps)
        boundaries = self.boundaries.cpu()
        default = torch.linspace(1.0, 1.0 / num_inference_steps, num_inference_steps, dtype=torch.float64)
        if given is None or torch.allclose(given, default, rtol=0, atol=1e-6):
            times = inference_times(num_inference_steps, boundaries)  # (N,) float64
        else:
            times = given
            if given.dim() != 1 or not bool((times[1:] < times[:-1]).all()) or not (0 < float(times[-1]) and float(times[0]) <= 1):
                raise ValueError(
                    f"sigmas must strictly decrease within (0, 1] (timesteps within (0, {T}]), got {times.tolist()}"
                )
        timesteps32 = (times * T).to(torch.float32)  # sigma T, as diffusers' flow-matching scheduler
        if not bool((timesteps32[1:] < timesteps32[:-1]).all()):
            raise ValueError(f"num_inference_steps={num_inference_steps} gives repeated float32 timesteps; use fewer steps")
        self.num_inference_steps = num_inference_steps
        self.mu = mu
        self._begin_index = None
        self.timesteps = timesteps32.to(device)
        self.sigmas = torch.cat([times, times.new_zeros(1)]).to(torch.float32).to(self.timesteps.device)
        self._scheduled, self._times, self._step_ts = (
            x.to(self.timesteps.device) for x in (timesteps32.to(torch.float64), times, times * T)
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
        (so timestep 0 uses ``abar[0]``, no wrap-around); for flow matching ``(1 - t) x0 + t noise``."""
        T = self.config.num_train_timesteps
        t = self._timestep_tensor(timesteps, original_samples.device) / T
        return self.schedule.marginal(original_samples, noise, t)

    def scale_noise(
        self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The flow-matching pipelines' image-to-image entry point (``FlowMatchEulerDiscreteScheduler``'s
        signature): :meth:`add_noise` at ``timestep``, per sample, i.e. ``(1 - t) sample + t noise``."""
        if noise is None:
            raise ValueError("scale_noise needs the noise to mix in")
        return self.add_noise(sample, noise, timestep)
