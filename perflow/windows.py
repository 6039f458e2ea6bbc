"""Time windows and the noise schedule as plain tensor functions.

Notation (``shared/METHOD.md`` sections 1-3): continuous time ``t`` runs from 1
(noise) to 0 (data); ``T`` is the teacher's number of training timesteps and
``abar`` its cumulative alpha products. ``K`` windows have boundaries
``1 = t_K > t_{K-1} > ... > t_0 = 0``; window ``k`` spans ``(t_s, t_e) = (t_k, t_{k-1})``.

In code the boundaries are one decreasing tensor ``boundaries = [t_K, ..., t_0]``
of length ``K + 1`` and windows are numbered ``j = 0 .. K-1`` in sampling order,
so window ``j`` is ``(boundaries[j], boundaries[j + 1])`` (``j = K - k``).

The look-up and coefficient functions are pure, vectorised over the batch and free
of host-device synchronisation, so the scheduler's ``step`` and the trainer's targets
can share them and a sampling loop can be captured or compiled. The ``check_*``
functions and :func:`alphas_cumprod_from_config` run once, at construction.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
EPSILON_TYPES = ("diff_eps", "ddim_eps")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
)
"""The keys of a diffusers scheduler config that determine ``alphas_cumprod``."""


def alphas_cumprod_from_config(config: Mapping[str, Any]) -> torch.Tensor:
    """``abar[0..T-1]`` (float32) of a diffusers scheduler config, built by diffusers' ``DDIMScheduler``.

    ``betas`` from ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) over
    ``[beta_start, beta_end]`` or ``trained_betas``; with ``rescale_betas_zero_snr`` they are
    rescaled to zero terminal SNR (diffusers' ``rescale_zero_terminal_snr``), so ``abar[T-1] = 0``
    exactly, as ``DDIMScheduler`` has it (no clamping); ``abar = cumprod(1 - betas)``. Only
    :data:`SCHEDULE_KEYS` are read; a missing key takes ``DDIMScheduler``'s default. The one
    implementation behind the trainer's teacher schedule and :class:`perflow.PeRFlowScheduler`.
    """
    from diffusers import DDIMScheduler

    kwargs = {k: config[k] for k in SCHEDULE_KEYS if k in config}
    betas, schedule = kwargs.get("trained_betas"), kwargs.get("beta_schedule", "linear")
    if betas is None and schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"unknown beta_schedule {schedule!r}; expected one of {BETA_SCHEDULES} or pass trained_betas"
        )
    num_train_timesteps = kwargs.get("num_train_timesteps", 1000)
    if betas is not None and len(betas) != num_train_timesteps:
        raise ValueError(
            f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
            "pass one beta per training timestep"
        )
    return DDIMScheduler(**kwargs).alphas_cumprod


def equal_boundaries(num_windows: int, t_noise: float = 1.0, t_clean: float = 0.0) -> torch.Tensor:
    """Boundaries of ``K`` equal windows: ``t_k = t_clean + k (t_noise - t_clean) / K``, decreasing.

    Computed as ``k / K`` in float64 so that ``K = 4`` gives exactly ``[1, 0.75, 0.5, 0.25, 0]``.
    """
    if not isinstance(num_windows, int) or isinstance(num_windows, bool) or num_windows < 1:
        raise ValueError(f"num_time_windows must be an integer >= 1, got {num_windows!r}")
    if not 0.0 <= t_clean < t_noise <= 1.0:
        raise ValueError(
            f"need 0 <= t_clean < t_noise <= 1, got t_noise={t_noise}, t_clean={t_clean}"
        )
    k = torch.arange(num_windows, -1, -1, dtype=torch.float64)
    return t_clean + (t_noise - t_clean) * k / num_windows


def check_boundaries(boundaries: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validate explicit window boundaries and return them as a float64 tensor.

    They must start at 1, end at 0 and strictly decrease: ``1 = t_K > ... > t_0 = 0``.
    """
    b = torch.as_tensor(boundaries, dtype=torch.float64).flatten()
    if b.numel() < 2:
        raise ValueError(
            f"window boundaries need at least two values (1 and 0), got {b.tolist()}"
        )
    if b[0].item() != 1.0 or b[-1].item() != 0.0:
        raise ValueError(
            f"window boundaries must start at 1 (noise) and end at 0 (data), got {b.tolist()}; "
            "write them in sampling order, e.g. [1.0, 0.6, 0.3, 0.0]"
        )
    if not bool((b[1:] < b[:-1]).all()):
        raise ValueError(
            f"window boundaries must strictly decrease from 1 to 0, got {b.tolist()}"
        )
    return b


def check_window_spacing(
    boundaries: torch.Tensor, num_train_timesteps: int, num_solver_steps: int | None = None
) -> torch.Tensor:
    """Refuse windows whose two ends share a teacher timestep index ``i(t) = clamp(round(t T) - 1, 0, T - 1)``.

    Such a window (e.g. ``[1, 0.9995, 0]`` with ``T = 1000``: both ends at index 999) has
    ``abar(t_s) = abar(t_e)``, so the teacher's solve is the identity, ``eta = 0`` and the
    epsilon-type targets are infinite. With ``num_solver_steps = n``, a window spanning fewer
    than ``n`` indices is accepted with a warning (some of its DDIM steps start and end at the
    same index and do nothing). Returns ``boundaries`` (float64, validated by :func:`check_boundaries`).
    """
    b = check_boundaries(boundaries)
    idx = timestep_index(b, num_train_timesteps).tolist()  # (K + 1,)
    for j in range(len(idx) - 1):
        t_s, t_e, span = b[j].item(), b[j + 1].item(), idx[j] - idx[j + 1]
        if span < 1:
            raise ValueError(
                f"window ({t_s:g}, {t_e:g}) starts and ends at the same teacher timestep index {idx[j]} "
                f"(i(t) = clamp(round(t*T) - 1, 0, T-1), T={num_train_timesteps}), so its targets are "
                f"infinite; move its boundaries apart so that round(t*T) differs "
                f"(at least 1/T = {1 / num_train_timesteps:g} apart, ideally n/T)"
            )
        if num_solver_steps is not None and span < num_solver_steps:
            warnings.warn(
                f"window ({t_s:g}, {t_e:g}) spans {span} teacher timestep(s) but the teacher solver takes "
                f"n={num_solver_steps} steps, some of which start and end at the same index and do nothing; "
                "widen the window or lower num_solver_steps",
                stacklevel=2,
            )
    return b


def check_nonzero_abar(boundaries: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str) -> None:
    """Refuse a prediction type that divides by ``abar = 0`` at a window boundary (zero terminal SNR).

    A schedule rescaled to zero terminal SNR (``rescale_betas_zero_snr=True``) has
    ``abar(1) = abar[T-1] = 0``, where the first window starts. There an ``epsilon`` teacher has
    ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)`` undefined, and the epsilon-type
    parameterizations have ``lam = 1 / g`` (``diff_eps``, ``g = sqrt(abar_s / abar_e)``) or
    ``sqrt(abar_e / abar_s)`` (``ddim_eps``) infinite. ``velocity`` students and ``v_prediction``
    or ``sample`` teachers need no division by ``abar`` and are accepted.
    """
    if prediction_type not in EPSILON_TYPES + ("epsilon",):
        return
    b = torch.as_tensor(boundaries, dtype=torch.float64)
    zero = abar_at(b, alphas_cumprod.cpu()) == 0
    if bool(zero.any()):
        t = b[zero].tolist()
        who, fix = (
            ("an epsilon teacher", "use a v_prediction teacher")
            if prediction_type == "epsilon"
            else (f"the {prediction_type} parameterization", "use prediction_type='velocity'")
        )
        raise ValueError(
            f"{who} divides by abar = 0, which this schedule has at t = {t} "
            f"(zero terminal SNR, rescale_betas_zero_snr=True); {fix}"
        )


def window_index(t: torch.Tensor, boundaries: torch.Tensor) -> torch.Tensor:
    """Index ``j`` of the window holding each time ``t``: ``boundaries[j+1] < t <= boundaries[j]``.

    A time exactly on a boundary belongs to the window that starts there; ``t = 0``
    belongs to the last window. Vectorised: ``j = #{i >= 1 : boundaries[i] >= t}``,
    clamped to ``K - 1``.
    """
    b = boundaries.to(device=t.device, dtype=torch.float64)
    num_windows = b.numel() - 1
    # (..., K): which inner/end boundaries lie at or above t
    above = b[1:] >= t.to(torch.float64).unsqueeze(-1)
    return above.sum(-1).clamp(max=num_windows - 1)


def window_bounds(t: torch.Tensor, boundaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end ``(t_s, t_e)`` of the window holding each ``t`` (same shape and dtype as ``t``)."""
    j = window_index(t, boundaries)
    b = boundaries.to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)
    # torch.take, not b[j]: indexing with a 0-d tensor would convert it to a Python int (a host sync)
    return torch.take(b, j), torch.take(b, j + 1)


def timestep_index(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Discrete teacher index of a continuous time: ``i(t) = clamp(round(t T) - 1, 0, T - 1)``."""
    idx = torch.round(t.to(torch.float64) * num_train_timesteps).long() - 1
    return idx.clamp(0, num_train_timesteps - 1)


def abar_at(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``abar(t) = abar[i(t)]``, gathered on ``t``'s device in ``alphas_cumprod``'s dtype."""
    ac = alphas_cumprod.to(t.device)
    return torch.take(ac, timestep_index(t, ac.numel()))  # not ac[i]: see window_bounds


def window_coefficients(
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam, eta)`` with ``z_e = lam z_s + eta eps`` for an epsilon-type parameterization.

    - ``diff_eps``: ``g = sqrt(abar(t_s) / abar(t_e))``, ``lam = 1 / g``, ``eta = -sqrt(1 - g^2) / g``.
    - ``ddim_eps``: ``lam = sqrt(abar(t_e) / abar(t_s))``,
      ``eta = sqrt(1 - abar(t_e)) - sqrt(abar(t_e) (1 - abar(t_s)) / abar(t_s))``.
    - ``velocity`` has no such coefficients: ``lam = 1, eta = 0`` are returned and unused.
    """
    if prediction_type == "velocity":
        one = torch.ones_like(t_s, dtype=alphas_cumprod.dtype)
        return one, torch.zeros_like(one)
    a_s = abar_at(t_s, alphas_cumprod)
    a_e = abar_at(t_e, alphas_cumprod)
    if prediction_type == "diff_eps":
        g = (a_s / a_e).sqrt()
        return 1.0 / g, -(1.0 - g**2).clamp(min=0).sqrt() / g
    if prediction_type == "ddim_eps":
        lam = (a_e / a_s).sqrt()
        eta = (1.0 - a_e).sqrt() - (a_e * (1.0 - a_s) / a_s).sqrt()
        return lam, eta
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
    )


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if it is a PeRFlow parameterization, else raise a clear error."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown PeRFlow prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES} "
            "(diff_eps: SD1.5 recipe, ddim_eps: SDXL recipe, velocity: SD2.1 recipe)"
        )
    return prediction_type


def inference_times(num_inference_steps: int, boundaries: torch.Tensor) -> torch.Tensor:
    """Step start times of the PeRFlow sampler (float64, decreasing, excluding the final 0).

    With ``N >= K`` steps each window gets ``N // K`` steps and the first ``N % K``
    windows one more; inside a window the times are evenly spaced from its start
    towards (excluding) its end. With ``N < K`` the ``N`` steps start at ``N``
    evenly chosen window starts (``boundaries[floor(i K / N)]``), so each step may
    cross several windows.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
    b = boundaries.to(torch.float64)
    num_windows = b.numel() - 1
    if num_inference_steps < num_windows:
        starts = torch.arange(num_inference_steps) * num_windows // num_inference_steps
        return b[starts]
    per_window, extra = divmod(num_inference_steps, num_windows)
    times = []
    for j in range(num_windows):
        n_j = per_window + (1 if j < extra else 0)
        # np.linspace(t_s, t_e, n_j, endpoint=False), operation for operation, as the released scheduler
        times.append(b[j] + torch.arange(n_j, dtype=torch.float64) * ((b[j + 1] - b[j]) / n_j))
    return torch.cat(times)
