"""Time windows as plain tensor functions: boundaries, look-up, a window's coefficients, sampling times.

Notation (``docs/method.md``, rows "windows, look-up" and "parameterizations"): continuous time
``t`` runs from 1 (noise) to 0 (data). ``K`` windows have boundaries
``1 = t_K > t_{K-1} > ... > t_0 = 0``; window ``k`` spans ``(t_s, t_e) = (t_k, t_{k-1})``.

In code the boundaries are one decreasing tensor ``boundaries = [t_K, ..., t_0]``
of length ``K + 1`` and windows are numbered ``j = 0 .. K-1`` in sampling order,
so window ``j`` is ``(boundaries[j], boundaries[j + 1])`` (``j = K - k``).

A :class:`Window` carries, per sample, the window's ends and the student parameterization's
coefficients ``(lam, eta)`` (``z_e = lam z_s + eta eps``); :func:`window_of` builds it from
times, boundaries and the teacher's :class:`~perflow.schedule.NoiseSchedule`.
:func:`resolve_boundaries` turns settings (``K`` equal windows or explicit boundaries) into
checked boundaries, for the config, the trainer, the export and the scheduler alike.

The look-up and coefficient functions are pure, vectorised over the batch and free
of host-device synchronisation, so the scheduler's ``step`` and the trainer's targets
can share them and a sampling loop can be captured or compiled. The ``check_*``
functions and :func:`resolve_boundaries` run once, at construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .schedule import NoiseSchedule, as_schedule, check_index_spacing
from .tensors import expand_like

PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")
EPSILON_TYPES = ("diff_eps", "ddim_eps")


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


def short_last_boundaries(num_windows: int, fraction: float) -> torch.Tensor:
    """``K`` equal windows on ``[1, 0]`` with the last one shortened to ``fraction`` of its width, the window
    before it taking the rest: ``t_k = k / K`` for ``k >= 2``, ``t_1 = fraction / K``, ``t_0 = 0``.

    ``fraction = 1`` gives :func:`equal_boundaries`; ``K = 4, fraction = 0.6`` gives ``[1, 0.75, 0.5, 0.15, 0]``.
    The last window's one step ends at the clean sample, and it is the window a student learns slowest
    (docs/study.md, sixth round).
    """
    b = equal_boundaries(num_windows)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"last_window_fraction must be in (0, 1] (1: equal windows), got {fraction!r}")
    if num_windows >= 2:
        b[num_windows - 1] = fraction / num_windows
    return b


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
    boundaries: Sequence[float] | torch.Tensor, num_train_timesteps: int, num_solver_steps: int | Sequence[int] | None = None
) -> torch.Tensor:
    """Validate ``boundaries`` (:func:`check_boundaries`) and refuse windows whose two ends share a
    teacher timestep index ``i(t) = clamp(round(t T) - 1, 0, T - 1)`` (:func:`perflow.schedule.check_index_spacing`).

    Such a window (e.g. ``[1, 0.9995, 0]`` with ``T = 1000``: both ends at index 999) has
    ``abar(t_s) = abar(t_e)``, so the teacher's solve is the identity, ``eta = 0`` and the
    epsilon-type targets are infinite. With ``num_solver_steps = n``, a window spanning fewer
    than ``n`` indices is accepted with a warning. Returns the boundaries (float64).
    """
    b = check_boundaries(boundaries)
    check_index_spacing(b, num_train_timesteps, num_solver_steps)
    return b


def check_nonzero_abar(
    boundaries: Sequence[float] | torch.Tensor, schedule: NoiseSchedule | torch.Tensor, prediction_type: str
) -> None:
    """Refuse a prediction type that divides by ``abar = 0`` at a window boundary (zero terminal SNR).

    A schedule rescaled to zero terminal SNR (``rescale_betas_zero_snr=True``) has
    ``abar(1) = abar[T-1] = 0``, where the first window starts. There an ``epsilon`` teacher has
    ``x0 = (z - sqrt(1 - abar) eps) / sqrt(abar)`` undefined, and the epsilon-type
    parameterizations have ``lam = 1 / g`` (``diff_eps``, ``g = sqrt(abar_s / abar_e)``) or
    ``sqrt(abar_e / abar_s)`` (``ddim_eps``) infinite. ``velocity`` students and ``v_prediction``
    or ``sample`` teachers need no division by ``abar`` and are accepted. ``schedule`` is a
    :class:`~perflow.schedule.NoiseSchedule` or an ``alphas_cumprod`` tensor; the test is on its
    signal coefficient, ``alpha(t) = sqrt(abar(t)) = 0``.
    """
    if prediction_type not in EPSILON_TYPES + ("epsilon",):
        return
    b = torch.as_tensor(boundaries, dtype=torch.float64)
    alpha, _ = as_schedule(schedule).to("cpu").alpha_sigma(b, b)
    zero = alpha == 0
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


def resolve_boundaries(
    num_time_windows: int | None = None,
    window_boundaries: Sequence[float] | torch.Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    num_solver_steps: int | Sequence[int] | None = None,
    prediction_type: str | None = None,
    t_noise: float = 1.0,
    t_clean: float = 0.0,
) -> torch.Tensor:
    """Window boundaries ``[1, ..., 0]`` (float64) from settings, checked: the one place they are resolved.

    Explicit ``window_boundaries`` (:func:`check_boundaries`; ``num_time_windows`` is then ignored
    and ``t_noise, t_clean`` must stay 1 and 0), else ``num_time_windows`` equal windows between
    ``t_noise`` and ``t_clean`` (:func:`equal_boundaries`). With the teacher's ``schedule`` the
    windows are checked against it (:meth:`~perflow.schedule.NoiseSchedule.check_windows`: for a
    discrete teacher, distinct timestep indices at each window's ends, a warning below
    ``num_solver_steps`` indices, one ``n`` or one per window) and, with ``prediction_type`` (the student's, or a teacher's
    ``epsilon``), for a division by ``abar = 0`` (:func:`check_nonzero_abar`).
    """
    if window_boundaries is not None:
        if (t_noise, t_clean) != (1.0, 0.0):
            raise ValueError(
                "window_boundaries already fix the first and last boundary (1 and 0); "
                f"leave t_noise=1.0 and t_clean=0.0 (got {t_noise}, {t_clean})"
            )
        b = check_boundaries(window_boundaries)
    else:
        b = equal_boundaries(num_time_windows, t_noise, t_clean)
    if schedule is not None:
        schedule.check_windows(b, num_solver_steps)
        if prediction_type in EPSILON_TYPES:
            schedule.epsilon_coefficients(b[:-1], b[1:], prediction_type)  # a kind without them refuses here
        if prediction_type is not None:
            check_nonzero_abar(b, schedule, prediction_type)
    return b


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


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` if it is a PeRFlow parameterization, else raise a clear error."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown PeRFlow prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES} "
            "(diff_eps: SD1.5 recipe, ddim_eps: SDXL recipe, velocity: SD2.1 recipe)"
        )
    return prediction_type


def window_coefficients(
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    schedule: NoiseSchedule | torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam, eta)`` with ``z_e = lam z_s + eta eps`` for an epsilon-type parameterization.

    ``schedule`` is the teacher's :class:`~perflow.schedule.NoiseSchedule` (or its raw
    ``alphas_cumprod``); on today's variance-preserving schedule
    (:func:`perflow.schedule.vp_epsilon_coefficients`):

    - ``diff_eps``: ``g = sqrt(abar(t_s) / abar(t_e))``, ``lam = 1 / g``, ``eta = -sqrt(1 - g^2) / g``.
    - ``ddim_eps``: ``lam = sqrt(abar(t_e) / abar(t_s))``,
      ``eta = sqrt(1 - abar(t_e)) - sqrt(abar(t_e) (1 - abar(t_s)) / abar(t_s))``.
    - ``velocity`` has no such coefficients: ``lam = 1, eta = 0`` are returned and unused.

    Computed in the schedule's dtype.
    """
    schedule = as_schedule(schedule)
    if prediction_type == "velocity":
        one = torch.ones_like(t_s, dtype=schedule.dtype)
        return one, torch.zeros_like(one)
    if prediction_type not in EPSILON_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}"
        )
    return schedule.epsilon_coefficients(t_s, t_e, prediction_type)


@dataclass(frozen=True)
class Window:
    """The window holding each sample's time and its parameterization coefficients.

    ``t_s``, ``t_e``: the window's start and end; ``lam``, ``eta``: ``z_e = lam z_s + eta eps``
    (``1, 0`` for ``velocity``); each per sample ``(B,)`` or 0-d. ``prediction_type`` is the
    student's parameterization (checked on construction).
    """

    t_s: torch.Tensor
    t_e: torch.Tensor
    lam: torch.Tensor
    eta: torch.Tensor
    prediction_type: str

    def __post_init__(self) -> None:
        check_prediction_type(self.prediction_type)

    def expand_like(self, like: torch.Tensor) -> "Window":
        """The same window with every tensor broadcast against ``like`` in its dtype (:func:`perflow.tensors.expand_like`)."""
        t_s, t_e, lam, eta = (expand_like(v, like) for v in (self.t_s, self.t_e, self.lam, self.eta))
        return Window(t_s, t_e, lam, eta, self.prediction_type)


def window_of(
    t: torch.Tensor, boundaries: torch.Tensor, schedule: NoiseSchedule, prediction_type: str
) -> Window:
    """The :class:`Window` holding each time ``t``: its ends (:func:`window_bounds`, in ``t``'s dtype)
    and ``(lam, eta)`` (:func:`window_coefficients`, computed in float64)."""
    t_s, t_e = window_bounds(t, boundaries)
    lam, eta = window_coefficients(t_s, t_e, schedule.to(dtype=torch.float64), prediction_type)
    return Window(t_s, t_e, lam, eta, prediction_type)


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
