"""The student's own K-step sampler during training: window starts from its states, and the fidelity check.

Two uses of the sampler a user will run (the exported :class:`~perflow.scheduler.PeRFlowScheduler` at ``K``
steps, one per window) inside a training run:

- **window starts from the student's own states** (``perflow.student_starts``): a fraction of each batch starts
  its window where the (EMA) student's sampler reaches that window's start from the example's noise,
  :func:`perflow.objective.sampler_window_starts` with :func:`student_window_step`, instead of at the forward
  marginal; the target is the teacher's solve from there (docs/study.md, eighth round);
- **the fidelity check** (``training.fidelity_check_every``): every N steps the (EMA) student's K-step sample
  from fixed noise, against the teacher's chain of window solves from the same noise
  (:func:`perflow.objective.teacher_chain_end`, the sample a perfect student reproduces), on the calibration
  batches: ``fidelity = mean_b mean_i (z_K^student - z_K^teacher)^2``. The training loss cannot see where the
  student's errors go once the later windows amplify them; this number can. With ``training.keep_best`` the
  run exports the checked student with the lowest fidelity error (:class:`BestStudent`), not the last one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..denoisers import Condition
from ..objective import sampler_window_starts, teacher_chain_end

BEST_FILE = "best_student.safetensors"
"""A checkpoint's copy of the best checked student's weights (by parameter name)."""


@contextlib.contextmanager
def ema_weights(ema, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` with the EMA's shadow weights inside the block (its own weights restored after); with
    ``ema`` None, the module as it is."""
    if ema is None:
        yield module
        return
    ema.store(module.parameters())
    ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        ema.restore(module.parameters())


def student_window_step(student: torch.nn.Module, cond: Condition, scheduler):
    """``window_step(z, j, rows)`` for :func:`perflow.objective.sampler_window_starts`: one step of the student's
    PeRFlow sampler across window ``j`` for the batch rows ``rows`` under their conditions (no guidance), with
    ``scheduler`` set to one step per window (``scheduler.set_timesteps(K)``)."""

    def window_step(z: torch.Tensor, j: int, rows: torch.Tensor) -> torch.Tensor:
        ts = scheduler.timesteps[j]
        out = cond.select(rows).forward(student, z, ts.expand(z.shape[0]).to(z.device, torch.float32))
        return scheduler.step(out.float(), ts, z).prev_sample

    return window_step


def k_step_scheduler(scheduler, num_windows: int, device: torch.device | str | None = None):
    """A copy of the student's ``scheduler`` set to one sampling step per window (the K-step sampler)."""
    import copy

    sampler = copy.deepcopy(scheduler)
    sampler.set_timesteps(num_windows, device=device)
    return sampler


@torch.no_grad()
def sampler_states(student: torch.nn.Module, cond: Condition, scheduler, noise: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Row ``b``: the state the student's K-step sampler reaches at the start of window ``k_b`` from ``noise_b``
    (``k_b = 0``: the noise itself; ``k_b = K``: the sample)."""
    return sampler_window_starts(student_window_step(student, cond, scheduler), noise, k)


@dataclass
class FidelityCheck:
    """Fixed noise and conditions with the teacher's chain ends, built once per run (:meth:`build`)."""

    batches: list[tuple[Condition, torch.Tensor, torch.Tensor]]  # (student condition, noise, teacher's chain end)
    scheduler: object  # the student's PeRFlowScheduler at one step per window
    num_windows: int

    @classmethod
    @torch.no_grad()
    def build(cls, calibration, boundaries: torch.Tensor, num_solver_steps, prediction_type: str,
              clip_sample: float | None, scheduler) -> "FidelityCheck":
        """From ``(teacher denoiser, noise, schedule, student condition)`` batches (the trainer's calibration
        batches): each batch's teacher chain end at the run's steps per window."""
        K = torch.as_tensor(boundaries).numel() - 1
        batches = [(cond, noise, teacher_chain_end(den, noise, boundaries, schedule, num_solver_steps, prediction_type,
                                                   clip_sample))
                   for den, noise, schedule, cond in calibration]
        return cls(batches, k_step_scheduler(scheduler, K, batches[0][1].device if batches else None), K)

    @torch.no_grad()
    def error(self, student: torch.nn.Module) -> float:
        """Mean over the check's samples of the squared error of the student's K-step sample to the teacher's
        chain end (mean over elements), with the student in eval mode (its mode restored after)."""
        was_training = student.training
        student.eval()
        try:
            return self._error(student)
        finally:
            student.train(was_training)

    def _error(self, student: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for cond, noise, ref in self.batches:
            k = torch.full((noise.shape[0],), self.num_windows, dtype=torch.int64)
            z = sampler_states(student, cond, self.scheduler, noise, k)
            total += (z.double() - ref.double()).square().flatten(1).mean(1).sum().item()
            count += noise.shape[0]
        return total / max(count, 1)


@dataclass
class BestStudent:
    """The checked student with the lowest fidelity error so far, and the run's check history."""

    step: int | None = None
    error: float | None = None
    weights: dict[str, torch.Tensor] | None = None  # parameter name -> CPU tensor
    history: list[list[float]] = field(default_factory=list)  # [step, error] of every check

    def offer(self, step: int, error: float, named_params) -> bool:
        """Record a check; keep ``named_params`` (``(name, tensor)`` pairs, copied to the CPU) if it is the best."""
        self.history.append([int(step), float(error)])
        if self.error is not None and not error < self.error:
            return False
        self.step, self.error = int(step), float(error)
        self.weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in named_params}
        return True

    def state(self) -> dict:
        """What a checkpoint's ``perflow_state.json`` records (the weights go to :data:`BEST_FILE`)."""
        return {"fidelity": self.history, "best_step": self.step, "best_fidelity": self.error}

    def restore(self, state: dict, weights: dict[str, torch.Tensor] | None) -> None:
        self.history = [list(h) for h in state.get("fidelity") or []]
        self.step, self.error = state.get("best_step"), state.get("best_fidelity")
        self.weights = weights if self.step is not None else None


__all__ = ["BEST_FILE", "BestStudent", "FidelityCheck", "ema_weights", "k_step_scheduler", "sampler_states",
           "student_window_step"]
