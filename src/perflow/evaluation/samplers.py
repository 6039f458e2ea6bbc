"""Sampling loops for the evaluation: any diffusers scheduler over a denoiser callable.

The baselines are the teacher sampled with diffusers' own few-step solvers (DDIM,
DPM-Solver++ (2M), UniPC), by default with ``timestep_spacing="trailing"`` so that even one step
starts from the last training timestep (``t = 1``, as PeRFlow does) rather than from
``leading`` spacing's timestep 1 (any of :data:`TIMESTEP_SPACINGS` can be asked for), and all
end at the teacher's last noise level ``abar[0]``. For a flow-matching teacher (a
``FlowMatchEulerDiscreteScheduler`` config) the baselines are the same solvers in their flow
forms, all ending at ``sigma = 0``: ``ddim`` is ``FlowMatchEulerDiscreteScheduler`` (Euler on the
linear path is DDIM), ``dpmsolver++`` and ``unipc`` run with ``use_flow_sigmas=True``,
``prediction_type="flow_prediction"`` and ``flow_shift`` = the teacher's shift (their own flow
grid; ``timestep_spacing`` does not apply). PeRFlow and whole-range reflow students are sampled
with :class:`perflow.PeRFlowScheduler`. Every sampler gets the same initial noise and
condition, and ``N`` steps cost ``N`` model evaluations (times 2 under classifier-free
guidance, for every sampler alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from perflow.solver import Denoiser as ModelFn  # (z (B, ...), timestep (B,)) -> output

BASELINE_SAMPLERS = ("ddim", "dpmsolver++", "unipc")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
"""diffusers' ``timestep_spacing`` options: where the ``N`` timesteps of an ``N``-step run sit."""


def baseline_scheduler(name: str, teacher_scheduler_config: dict, timestep_spacing: str = "trailing"):
    """A diffusers scheduler for the teacher: ``ddim``, ``dpmsolver++`` (2nd-order multistep) or ``unipc``,
    with ``timestep_spacing`` one of :data:`TIMESTEP_SPACINGS`."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
    config = {k: v for k, v in dict(teacher_scheduler_config).items() if not k.startswith("_")}
    from perflow.schedule import scheduler_kind

    if scheduler_kind(config) == "flow_matching":
        return flow_baseline_scheduler(name, config)
    config["timestep_spacing"] = timestep_spacing
    if name == "ddim":
        # a scheduler config without clip_sample (PNDM, Euler, DPM-Solver...) samples unclipped, as the trainer's
        # window solve reads it (perflow.training.teachers.teacher_clip_sample); DDIM's own default would clip
        return DDIMScheduler.from_config({"clip_sample": False, **config})
    # every sampler ends at the teacher's last noise level abar[0] (as DDIM with
    # set_alpha_to_one=False and PeRFlow do), not at sigma = 0
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="sigma_min"
        )
    if name == "unipc":
        return UniPCMultistepScheduler.from_config(config, final_sigmas_type="sigma_min")
    raise ValueError(f"unknown baseline sampler {name!r}; expected one of {BASELINE_SAMPLERS}")


def flow_baseline_scheduler(name: str, config: dict):
    """A baseline for a flow-matching teacher's ``FlowMatchEulerDiscreteScheduler`` ``config``: ``ddim`` (its own
    Euler scheduler), ``dpmsolver++`` (2nd-order multistep) or ``unipc`` in their flow modes, ending at ``sigma = 0``."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if config.get("use_dynamic_shifting"):
        raise ValueError("the flow-mode baselines take a fixed shift; resolve the teacher's dynamic shift at the "
                         "evaluated resolution first (perflow.evaluation.teacher_eval.sampler_config)")
    # perflow's keys (schedule_kind; prediction_type of a Teacher's schedule), not FlowMatchEulerDiscreteScheduler's
    config = {k: v for k, v in config.items() if k not in ("schedule_kind", "prediction_type")}
    if name == "ddim":
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    flow = dict(num_train_timesteps=config.get("num_train_timesteps", 1000), use_flow_sigmas=True,
                prediction_type="flow_prediction", flow_shift=float(config.get("shift", 1.0)), final_sigmas_type="zero")
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow)
    if name == "unipc":
        return UniPCMultistepScheduler(**flow)
    raise ValueError(f"unknown baseline sampler {name!r}; expected one of {BASELINE_SAMPLERS}")


@dataclass
class SampleResult:
    """Final samples ``(B, ...)``; optionally the states ``(N+1, B, ...)`` and their times ``(N+1,)`` in ``[0, 1]``."""

    samples: torch.Tensor
    trajectory: torch.Tensor | None = None
    times: torch.Tensor | None = None
    num_model_evals: int = 0


def _state_time(scheduler, timestep: torch.Tensor) -> float:
    """Continuous time ``t`` of the state a scheduler is about to step from.

    PeRFlow timesteps are ``t T``; a diffusion scheduler's discrete index ``i`` is ``t = (i + 1) / T``
    (the inverse of ``i(t) = round(t T) - 1``)."""
    T = scheduler.config.num_train_timesteps
    from perflow.scheduler import PeRFlowScheduler

    flow = type(scheduler).__name__.startswith("FlowMatch") or getattr(scheduler.config, "use_flow_sigmas", False)
    if isinstance(scheduler, PeRFlowScheduler) or flow:  # timesteps t T (sigma T for flow matching)
        return float(timestep) / T
    return (float(timestep) + 1) / T


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    scheduler,
    noise: torch.Tensor,
    num_steps: int,
    return_trajectory: bool = False,
    progress: bool = False,
    desc: str = "sampling",
) -> SampleResult:
    """Run ``scheduler`` for ``num_steps`` steps from ``noise`` (``z_N = noise * init_noise_sigma``)."""
    from tqdm.auto import tqdm

    scheduler.set_timesteps(num_steps)
    z = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at noise itself
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    states, times = [z], []
    batch = z.shape[0]
    for timestep in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        times.append(_state_time(scheduler, timestep))
        out = model_fn(scale(z, timestep), timestep.expand(batch))
        z = scheduler.step(out, timestep, z).prev_sample
        if return_trajectory:
            states.append(z)
    times.append(0.0)
    if not return_trajectory:
        return SampleResult(z, num_model_evals=len(scheduler.timesteps))
    return SampleResult(z, torch.stack(states), torch.tensor(times, dtype=torch.float64), len(scheduler.timesteps))
