"""The teacher's noise schedule as one object: its forward process, its timesteps and its window maths.

Notation (``docs/method.md``, rows "schedule" and "one training batch"): continuous time ``t``
runs from 1 (noise) to 0 (data), and the teacher's forward process is

    z_t = alpha(t) x0 + sigma(t) eps.

:class:`NoiseSchedule` is the small interface everything else takes (the window look-up, the
teacher solver, the training targets, the scheduler); a schedule kind implements

- :meth:`~NoiseSchedule.alpha_sigma`: ``(alpha(t), sigma(t))``, broadcast against a batch;
  :meth:`~NoiseSchedule.marginal` (the forward process) and the solver's steps are built on it;
- :meth:`~NoiseSchedule.timestep`: the timestep the teacher's denoiser is told at time ``t``;
- :meth:`~NoiseSchedule.epsilon_coefficients`: the epsilon-type parameterizations' ``(lam, eta)``
  of a window (``z_e = lam z_s + eta eps``);
- :meth:`~NoiseSchedule.check_windows`: the schedule's own limits on window boundaries.

Today's kind is :class:`DiscreteVPSchedule`, a discrete variance-preserving diffusion teacher
(``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``, ``abar(t) = abar[i(t)]``,
``i(t) = clamp(round(t T) - 1, 0, T - 1)``). A continuous flow-matching teacher
(``z = (1 - sigma) x0 + sigma eps`` with ``sigma = t``, diffusers' ``FlowMatchEulerDiscreteScheduler``)
is the second kind, :class:`FlowMatchSchedule`; :func:`schedule_from_config` picks the kind of a
teacher's scheduler config. A schedule may also place the teacher solver's ``n`` steps inside a
window (:meth:`~NoiseSchedule.solver_time`): evenly in ``t`` for the VP kind, evenly in the
unshifted time ``u`` for a shifted flow-matching teacher (its own sampling grid).

The per-time functions are pure, vectorised over the batch and free of host-device
synchronisation (the scheduler's ``step`` calls them); the checks run once, at construction.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

from .tensors import expand_like

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
)
"""The keys of a diffusers scheduler config that determine ``alphas_cumprod``."""


def check_beta_schedule(config: Mapping[str, Any]) -> None:
    """Refuse a ``beta_schedule`` other than :data:`BETA_SCHEDULES` (what ``DDIMScheduler`` builds) unless the
    config gives ``trained_betas``; the error says how to write them."""
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and schedule not in BETA_SCHEDULES:
        raise ValueError(f"the teacher's beta_schedule {schedule!r} is not one of {BETA_SCHEDULES}; write its betas into "
                         "the scheduler config as trained_betas (e.g. DDPMScheduler(...).betas.tolist())")


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
    check_beta_schedule(kwargs)
    betas = kwargs.get("trained_betas")
    num_train_timesteps = kwargs.get("num_train_timesteps", 1000)
    if betas is not None and len(betas) != num_train_timesteps:
        raise ValueError(
            f"trained_betas has {len(betas)} values but num_train_timesteps={num_train_timesteps}; "
            "pass one beta per training timestep"
        )
    return DDIMScheduler(**kwargs).alphas_cumprod


def timestep_index(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Discrete teacher index of a continuous time: ``i(t) = clamp(round(t T) - 1, 0, T - 1)``."""
    idx = torch.round(t.to(torch.float64) * num_train_timesteps).long() - 1
    return idx.clamp(0, num_train_timesteps - 1)


def abar_at(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``abar(t) = abar[i(t)]``, gathered on ``t``'s device in ``alphas_cumprod``'s dtype."""
    ac = alphas_cumprod.to(t.device)
    # torch.take, not ac[i]: indexing with a 0-d tensor would convert it to a Python int (a host sync)
    return torch.take(ac, timestep_index(t, ac.numel()))


def window_index_spans(boundaries: torch.Tensor, num_train_timesteps: int) -> list[int]:
    """How many teacher timestep indices ``i(t) = clamp(round(t T) - 1, 0, T - 1)`` each window spans,
    ``i(t_s) - i(t_e)``: the most DDIM steps of a window solve that do not start and end at one index."""
    idx = timestep_index(torch.as_tensor(boundaries, dtype=torch.float64), num_train_timesteps).tolist()  # (K + 1,)
    return [idx[j] - idx[j + 1] for j in range(len(idx) - 1)]


def check_index_spacing(
    boundaries: torch.Tensor, num_train_timesteps: int, num_solver_steps: int | Sequence[int] | None = None
) -> None:
    """Refuse windows whose two ends share a teacher timestep index ``i(t) = clamp(round(t T) - 1, 0, T - 1)``.

    ``boundaries`` are valid ones (:func:`perflow.windows.check_boundaries`), float64. Such a window
    (e.g. ``[1, 0.9995, 0]`` with ``T = 1000``: both ends at index 999) has ``abar(t_s) = abar(t_e)``,
    so the teacher's solve is the identity, ``eta = 0`` and the epsilon-type targets are infinite.
    With ``num_solver_steps = n`` (or one ``n_k`` per window), a window spanning fewer than ``n``
    indices (:func:`window_index_spans`) is accepted with a warning (some of its DDIM steps start and
    end at the same index and do nothing).
    """
    b = boundaries
    idx = timestep_index(b, num_train_timesteps).tolist()  # (K + 1,)
    spans = window_index_spans(b, num_train_timesteps)
    per_window = num_solver_steps if isinstance(num_solver_steps, (list, tuple)) else [num_solver_steps] * len(spans)
    for j, (span, n) in enumerate(zip(spans, per_window)):
        t_s, t_e = b[j].item(), b[j + 1].item()
        if span < 1:
            raise ValueError(
                f"window ({t_s:g}, {t_e:g}) starts and ends at the same teacher timestep index {idx[j]} "
                f"(i(t) = clamp(round(t*T) - 1, 0, T-1), T={num_train_timesteps}), so its targets are "
                f"infinite; move its boundaries apart so that round(t*T) differs "
                f"(at least 1/T = {1 / num_train_timesteps:g} apart, ideally n/T)"
            )
        if n is not None and span < n:
            warnings.warn(
                f"window ({t_s:g}, {t_e:g}) spans {span} teacher timestep(s) but the teacher solver takes "
                f"n={n} steps, some of which start and end at the same index and do nothing; "
                "widen the window or lower num_solver_steps",
                stacklevel=3,
            )


def vp_epsilon_coefficients(
    t_s: torch.Tensor, t_e: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lam, eta)`` with ``z_e = lam z_s + eta eps`` on a variance-preserving schedule, in ``alphas_cumprod``'s dtype.

    - ``diff_eps``: ``g = sqrt(abar(t_s) / abar(t_e))``, ``lam = 1 / g``, ``eta = -sqrt(1 - g^2) / g``
      (the inverse of the forward transition ``t_e -> t_s``).
    - ``ddim_eps``: ``lam = sqrt(abar(t_e) / abar(t_s))``,
      ``eta = sqrt(1 - abar(t_e)) - sqrt(abar(t_e) (1 - abar(t_s)) / abar(t_s))`` (the DDIM jump ``t_s -> t_e``).
    """
    a_s = abar_at(t_s, alphas_cumprod)
    a_e = abar_at(t_e, alphas_cumprod)
    if prediction_type == "diff_eps":
        g = (a_s / a_e).sqrt()
        return 1.0 / g, -(1.0 - g**2).clamp(min=0).sqrt() / g
    if prediction_type == "ddim_eps":
        lam = (a_e / a_s).sqrt()
        eta = (1.0 - a_e).sqrt() - (a_e * (1.0 - a_s) / a_s).sqrt()
        return lam, eta
    raise ValueError(f"no epsilon-type coefficients for prediction_type {prediction_type!r}; expected 'diff_eps' or 'ddim_eps'")


class NoiseSchedule(ABC):
    """The teacher's forward process ``z_t = alpha(t) x0 + sigma(t) eps`` on ``t`` in ``[0, 1]`` (1 = noise).

    ``num_train_timesteps`` is ``T``: the student is evaluated at timestep ``t T`` (the released
    PeRFlow checkpoints' convention), whatever the teacher's own timesteps are.
    """

    num_train_timesteps: int

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype the schedule's per-time quantities are computed in."""

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))``, each broadcast against ``like`` in its dtype (:func:`perflow.tensors.expand_like`)."""

    @abstractmethod
    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the teacher's denoiser is evaluated at for time ``t`` (per sample)."""

    @abstractmethod
    def epsilon_coefficients(
        self, t_s: torch.Tensor, t_e: torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lam, eta)`` of an epsilon-type parameterization for windows ``(t_s, t_e)``: ``z_e = lam z_s + eta eps``."""

    @abstractmethod
    def check_windows(self, boundaries: torch.Tensor, num_solver_steps: int | Sequence[int] | None = None) -> None:
        """Refuse (``ValueError``) or warn about valid boundaries the schedule cannot resolve."""

    @abstractmethod
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "NoiseSchedule":
        """The same schedule on ``device`` / in ``dtype`` (``self`` when nothing changes)."""

    def marginal(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process at time ``t``: ``z_t = alpha(t) x0 + sigma(t) noise``, in ``x0``'s dtype."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * noise

    def solver_time(self, t_s: torch.Tensor, t_e: torch.Tensor, j: int, n: int) -> torch.Tensor:
        """Time of the teacher solver's point ``j`` of ``n`` in window ``(t_s, t_e)``: ``t_s + (t_e - t_s) (j / n)``
        (evenly spaced; a kind with its own sampling grid overrides this)."""
        return t_s + (t_e - t_s) * (j / n)


@dataclass(frozen=True, eq=False)
class DiscreteVPSchedule(NoiseSchedule):
    """A discrete variance-preserving diffusion teacher: ``abar[0..T-1]`` (diffusers' ``alphas_cumprod``).

    ``abar(t) = abar[i(t)]`` with ``i(t) = clamp(round(t T) - 1, 0, T - 1)`` (so ``t = 1`` is index
    ``T - 1`` and ``t = 0`` index 0, whose ``abar`` is not exactly 1);
    ``z_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps``; the teacher is evaluated at index ``i(t)``.
    """

    alphas_cumprod: torch.Tensor  # (T,)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiscreteVPSchedule":
        """The schedule of a diffusers scheduler config (:func:`alphas_cumprod_from_config`, float32)."""
        return cls(alphas_cumprod_from_config(config))

    @property
    def num_train_timesteps(self) -> int:  # type: ignore[override]
        return self.alphas_cumprod.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.alphas_cumprod.dtype

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def index(self, t: torch.Tensor) -> torch.Tensor:
        """``i(t) = clamp(round(t T) - 1, 0, T - 1)`` (:func:`timestep_index`)."""
        return timestep_index(t, self.num_train_timesteps)

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """``abar(t) = abar[i(t)]`` (:func:`abar_at`), on ``t``'s device in the schedule's dtype."""
        return abar_at(t, self.alphas_cumprod)

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar(t)), sqrt(1 - abar(t)))``, ``abar`` cast to ``like``'s dtype first."""
        a = expand_like(self.abar(t), like)
        return a.sqrt(), (1 - a).sqrt()

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The teacher's discrete index ``i(t)`` (int64)."""
        return self.index(t)

    def epsilon_coefficients(
        self, t_s: torch.Tensor, t_e: torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`vp_epsilon_coefficients` on this schedule's ``abar``."""
        return vp_epsilon_coefficients(t_s, t_e, self.alphas_cumprod, prediction_type)

    def check_windows(self, boundaries: torch.Tensor, num_solver_steps: int | Sequence[int] | None = None) -> None:
        """Each window's ends at distinct teacher indices (:func:`check_index_spacing`)."""
        check_index_spacing(boundaries, self.num_train_timesteps, num_solver_steps)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiscreteVPSchedule":
        ac = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self if ac is self.alphas_cumprod else DiscreteVPSchedule(ac)


FLOW_MATCH_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
    "base_image_seq_len", "max_image_seq_len",
)
"""The keys of a ``FlowMatchEulerDiscreteScheduler`` config that :class:`FlowMatchSchedule` reads."""

FLOW_MATCH_SCHEDULERS = (
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler",
)


def shift_sigma(u: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """The shifted teacher time ``sigma = s u / (1 + (s - 1) u)`` of the unshifted time ``u`` in ``[0, 1]``.

    Dynamic shifting (``sigma = e^mu / (e^mu + (1/u - 1))``, diffusers' exponential ``time_shift``)
    is the same map with ``s = e^mu``; written without ``1/u``, so ``u = 0`` gives 0.
    """
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`shift_sigma`: ``u = sigma / (s - (s - 1) sigma)``."""
    return sigma / (shift - (shift - 1) * sigma)


def dynamic_shift_mu(
    image_seq_len: int | float,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu``, linear in the image's token count: ``mu = base_shift + (L - L_base) (max_shift - base_shift) / (L_max - L_base)``.

    The same arithmetic as the SD3 and Flux pipelines' ``calculate_shift`` (``m L + b``), so trainer and
    pipeline get the same float.
    """
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    b = base_shift - m * base_image_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True, eq=False)
class FlowMatchSchedule(NoiseSchedule):
    """A continuous flow-matching teacher: ``z_t = (1 - t) x0 + t eps`` with ``t = sigma`` (1 = noise).

    The teacher predicts the velocity ``dz/dsigma = eps - x0`` at timestep ``sigma T`` (its
    prediction type is ``flow_prediction``), and samples on a shifted grid
    ``sigma = s u / (1 + (s - 1) u)`` of an even grid in ``u``: ``s = shift``, or with
    ``use_dynamic_shifting`` ``s = e^mu`` with ``mu`` from the image's token count
    (:func:`dynamic_shift_mu`). Windows are boundaries in ``t = sigma`` itself (they do not depend on
    the shift, hence not on the resolution: ``docs/method.md``, "Windows and the shift"); the shift
    only places the teacher solver's ``n`` Euler steps inside a window (:meth:`solver_time`).
    A dynamic-shift schedule must be resolved to one resolution first (:meth:`at_resolution`).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    mu: float | None = None  # set by at_resolution for a dynamic-shift teacher

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if self.use_dynamic_shifting and self.base_image_seq_len == self.max_image_seq_len:
            raise ValueError("base_image_seq_len and max_image_seq_len must differ for dynamic shifting")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowMatchSchedule":
        """The schedule of a ``FlowMatchEulerDiscreteScheduler`` config (only :data:`FLOW_MATCH_KEYS`;
        a missing key takes that scheduler's default). A DPM-Solver/UniPC flow-mode config names its
        shift ``flow_shift``: it is read as ``shift``."""
        kw = {k: config[k] for k in FLOW_MATCH_KEYS if config.get(k) is not None}
        if "shift" not in kw and config.get("flow_shift") is not None:
            kw["shift"] = config["flow_shift"]
        return cls(**kw)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    @property
    def effective_shift(self) -> float:
        """``s``: ``shift``, or ``e^mu`` for a dynamic-shift teacher resolved to a resolution."""
        if not self.use_dynamic_shifting:
            return float(self.shift)
        if self.mu is None:
            raise ValueError(
                "this flow-matching teacher uses dynamic shifting, whose shift depends on the image's token "
                "count: resolve it first with schedule.at_resolution(image_seq_len) (or pass mu)"
            )
        return math.exp(self.mu)

    def at_resolution(self, image_seq_len: int | None = None, mu: float | None = None) -> "FlowMatchSchedule":
        """The schedule at one resolution: ``mu`` given, or :func:`dynamic_shift_mu` of ``image_seq_len``
        (the transformer's token count, ``(H / 2) (W / 2)`` latents for SD3 and Flux). ``self`` for a
        static shift."""
        if not self.use_dynamic_shifting:
            return self
        if mu is None:
            if image_seq_len is None:
                raise ValueError("a dynamic-shift teacher needs image_seq_len (or mu) to compute its shift")
            mu = dynamic_shift_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                                  self.base_shift, self.max_shift)
        return replace(self, mu=float(mu))

    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1 - t, t)``, broadcast against ``like`` in its dtype."""
        sigma = expand_like(t, like)
        return 1 - sigma, sigma

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """``sigma T`` in ``t``'s dtype (the denoiser casts it to the model's)."""
        return t * self.num_train_timesteps

    def solver_time(self, t_s: torch.Tensor, t_e: torch.Tensor, j: int, n: int | torch.Tensor) -> torch.Tensor:
        """``sigma_j = shift(u_s + (u_e - u_s) j / n)`` with ``u = unshift(t)``: the window's part of the
        teacher's own shifted grid (:func:`shift_sigma`). The ends are ``t_s`` and ``t_e`` exactly
        (``n`` may be per sample, ``(B,)``)."""
        if j == 0:
            return t_s
        if not isinstance(n, torch.Tensor) and j == n:
            return t_e
        s = self.effective_shift
        u_s, u_e = unshift_sigma(t_s, s), unshift_sigma(t_e, s)
        inner = shift_sigma(u_s + (u_e - u_s) * (j / n), s)
        return torch.where(n == j, t_e, inner) if isinstance(n, torch.Tensor) else inner

    def epsilon_coefficients(
        self, t_s: torch.Tensor, t_e: torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refused: the epsilon-type parameterizations divide by ``alpha(1) = 0`` on the flow-matching path."""
        raise ValueError(
            f"prediction_type={prediction_type!r} does not apply to a flow-matching teacher (its window "
            "coefficients divide by alpha(t=1) = 1 - 1 = 0); use prediction_type='velocity', which starts "
            "exactly at the teacher's own velocity output"
        )

    def check_windows(self, boundaries: torch.Tensor, num_solver_steps: int | Sequence[int] | None = None) -> None:
        """Continuous time: any valid boundaries."""

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "FlowMatchSchedule":
        return self


def scheduler_kind(config: Mapping[str, Any]) -> str:
    """``"flow_matching"`` or ``"discrete_vp"`` for a diffusers scheduler config; a config that is neither is refused.

    Flow-matching: a ``FlowMatch*`` scheduler class (or a config with its ``shift`` and ``use_dynamic_shifting``), a PeRFlow config with ``schedule_kind:
    flow_matching``, or a ``flow_prediction`` config (DPM-Solver/UniPC in flow mode). Variance-preserving:
    ``beta_start``/``beta_end``/``beta_schedule`` or ``trained_betas`` (DDPM, DDIM, PNDM, Euler, ...).
    """
    name = config.get("_class_name", "")
    kind = config.get("schedule_kind")
    if kind in SCHEDULE_KINDS:
        return kind
    flow_keys = "shift" in config and "use_dynamic_shifting" in config  # FlowMatchEulerDiscreteScheduler's own
    if name in FLOW_MATCH_SCHEDULERS or flow_keys or config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        return "flow_matching"
    if any(k in config for k in ("beta_start", "beta_end", "beta_schedule", "trained_betas")):
        if config.get("timestep_type") == "continuous":
            raise ValueError(
                f"the teacher's {name or 'scheduler'} has timestep_type 'continuous' (its model is called at 0.25 log "
                "sigma, not at a timestep index), which perflow's discrete teacher solve does not do; use a teacher "
                "trained on discrete timesteps (timestep_type 'discrete')"
            )
        return "discrete_vp"
    raise ValueError(
        f"the teacher's scheduler config ({name or 'no _class_name'}) is neither variance-preserving (beta_start, "
        "beta_end, beta_schedule or trained_betas) nor flow-matching (FlowMatchEulerDiscreteScheduler: shift, "
        "use_dynamic_shifting); use a teacher whose scheduler_config.json is one of these"
    )


SCHEDULE_KINDS = ("discrete_vp", "flow_matching")


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """The teacher's :class:`NoiseSchedule` of a diffusers scheduler config, its kind from :func:`scheduler_kind`."""
    if scheduler_kind(config) == "flow_matching":
        return FlowMatchSchedule.from_config(config)
    return DiscreteVPSchedule.from_config(config)


def as_schedule(schedule: NoiseSchedule | torch.Tensor) -> NoiseSchedule:
    """``schedule`` itself, or a raw ``alphas_cumprod`` tensor wrapped as a :class:`DiscreteVPSchedule`."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(schedule, torch.Tensor):
        return DiscreteVPSchedule(schedule)
    raise TypeError(f"expected a NoiseSchedule or an alphas_cumprod tensor, got {type(schedule).__name__}")


__all__ = [
    "BETA_SCHEDULES",
    "FLOW_MATCH_KEYS",
    "FLOW_MATCH_SCHEDULERS",
    "SCHEDULE_KEYS",
    "SCHEDULE_KINDS",
    "DiscreteVPSchedule",
    "FlowMatchSchedule",
    "NoiseSchedule",
    "abar_at",
    "alphas_cumprod_from_config",
    "as_schedule",
    "check_index_spacing",
    "window_index_spans",
    "dynamic_shift_mu",
    "schedule_from_config",
    "scheduler_kind",
    "shift_sigma",
    "timestep_index",
    "unshift_sigma",
    "vp_epsilon_coefficients",
]
