"""Model output <-> velocity / window end, and the training targets (its inverse).

``docs/method.md``, rows "output -> velocity" and "training target". For ``t_c`` in window
``(t_s, t_e)`` the student should follow ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``.

- ``velocity``: the model outputs ``dz/dt``; the target is ``(z_e - z_s) / (t_e - t_s)``.
- epsilon-type (``diff_eps``, ``ddim_eps``): writing ``z_e = lam z_s + eta eps``
  with the window's ``(lam, eta)`` (:func:`perflow.windows.window_coefficients`),
  the target is ``eps = (z_e - lam z_s) / eta``; at sampling time the output is
  turned back into the predicted window end

      z_e_hat = (lam (t_e - t_s) z + eta (t_e - t_c) out) / (lam (t_c - t_s) + (t_e - t_c))

  and the velocity ``v = (z_e_hat - z) / (t_e - t_c)``.

The two directions are exact inverses on the segment: feeding the target of a
segment back at any point of it gives the segment's velocity (tested as a round trip).
The network's raw output need not be the window's epsilon: ``model_output_type`` (diffusers'
``prediction_type`` words, :data:`MODEL_OUTPUT_TYPES`) says what it predicts at ``z_t = alpha(t) x0
+ sigma(t) eps``, and :func:`epsilon_from_output` turns it into the epsilon-type parameterizations'
``out`` (``epsilon``: itself; ``v_prediction``: ``sigma z + alpha v``; ``sample``:
``(z - alpha x0) / sigma``). A student that keeps its teacher's output type starts, with ``ddim_eps``,
exactly as the teacher's DDIM sampler over the windows' boundaries.

A window's quantities travel as one :class:`perflow.windows.Window` (``t_s, t_e, lam, eta``
and the prediction type); times are tensors broadcastable against the batch (``(B,)`` or 0-d).
Each formula is computed in the dtype of the latent it meets.
"""

from __future__ import annotations

import torch

from .solver import TEACHER_PREDICTION_TYPES, x0_eps_from_output
from .tensors import expand_like
from .windows import EPSILON_TYPES, Window

MODEL_OUTPUT_TYPES = tuple(p for p in TEACHER_PREDICTION_TYPES if p != "flow_prediction")
"""What a student network's raw output predicts (diffusers' ``prediction_type`` words; a flow-matching
student's ``velocity`` parameterization outputs the velocity itself)."""


def check_model_output_type(model_output_type: str, prediction_type: str) -> str:
    """Refuse an unknown ``model_output_type``, or one other than ``epsilon`` for the ``velocity`` parameterization."""
    if model_output_type not in MODEL_OUTPUT_TYPES:
        raise ValueError(
            f"unknown model_output_type {model_output_type!r}; expected one of {MODEL_OUTPUT_TYPES}"
        )
    if model_output_type != "epsilon" and prediction_type not in EPSILON_TYPES:
        raise ValueError(
            f"model_output_type={model_output_type!r} needs an epsilon-type parameterization {EPSILON_TYPES}; "
            f"the {prediction_type!r} parameterization outputs the velocity itself (use model_output_type='epsilon')"
        )
    return model_output_type


def resolve_model_output_type(model_output_type: str, prediction_type: str, teacher_prediction_type: str) -> str:
    """``auto``: the teacher's own output type for an epsilon-type parameterization (so the student
    starts as the teacher's DDIM over the windows), ``epsilon`` (unused) for ``velocity``; any other
    value is checked (:func:`check_model_output_type`) and returned."""
    if model_output_type == "auto":
        return teacher_prediction_type if prediction_type in EPSILON_TYPES else "epsilon"
    return check_model_output_type(model_output_type, prediction_type)


def epsilon_from_output(
    output: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, model_output_type: str
) -> torch.Tensor:
    """The epsilon-type ``out`` of a raw network output at ``z = alpha x0 + sigma eps``
    (:func:`perflow.solver.x0_eps_from_output`'s ``eps``): ``out`` for ``epsilon``,
    ``sigma z + alpha v`` for ``v_prediction``, ``(z - alpha x0) / sigma`` for ``sample``.
    ``alpha``, ``sigma`` broadcast against ``z``."""
    if model_output_type == "epsilon":
        return output
    return x0_eps_from_output(output, z, alpha, sigma, model_output_type)[1]


def window_end_denominator(t: torch.Tensor, window: Window) -> torch.Tensor:
    """``lam (t - t_s) + (t_e - t)``, the denominator of the predicted window end, in the operands' dtype.

    Zero only where the epsilon-type output cannot be turned into a window end; also the
    denominator of the window-end loss weight (:func:`perflow.objective.window_end_weight`).
    """
    return window.lam * (t - window.t_s) + (window.t_e - t)


def window_end_from_output(output: torch.Tensor, z: torch.Tensor, t: torch.Tensor, window: Window) -> torch.Tensor:
    """Predicted window end of an epsilon-type output at ``(z, t_c = t)``:
    ``z_e_hat = (lam (t_e - t_s) z + eta (t_e - t_c) out) / (lam (t_c - t_s) + (t_e - t_c))``."""
    w, t_c = window.expand_like(z), expand_like(t, z)
    return (w.lam * (w.t_e - w.t_s) * z + w.eta * (w.t_e - t_c) * output) / window_end_denominator(t_c, w)


def velocity_from_output(output: torch.Tensor, z: torch.Tensor, t: torch.Tensor, window: Window) -> torch.Tensor:
    """Velocity ``dz/dt`` at ``(z, t_c = t)``: ``out`` itself for ``velocity``, else ``(z_e_hat - z) / (t_e - t_c)``."""
    if window.prediction_type == "velocity":
        return output
    z_e_hat = window_end_from_output(output, z, t, window)
    return (z_e_hat - z) / (expand_like(window.t_e, z) - expand_like(t, z))


def clipped_epsilon(
    output: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    window: Window,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_e: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """The ``ddim_eps`` output whose window end honours a teacher's ``clip_sample`` range ``r``.

    With the clean sample implied at the current point, ``x0 = (z - sigma out) / alpha``, and
    ``delta = clip(x0, -r, r) - x0``, returns
    ``out + alpha_e delta (lam (t_c - t_s) + t_e - t_c) / (eta (t_e - t_s))``: the output whose predicted
    window end (:func:`window_end_from_output`) is ``z_e_hat + (1 - f) alpha_e delta`` with
    ``f = (t_c - t_s) / (t_e - t_s)``. At a window start that is ``alpha_e clip(x0) + sigma_e out``,
    diffusers' clipped DDIM step (so an untrained student of a clipping teacher starts as the
    teacher's clipped DDIM over the windows); the correction shrinks to 0 at the window end, so the
    velocity stays bounded; and wherever ``|x0| <= r`` the output is unchanged.
    ``alpha``, ``sigma`` at ``t_c``, ``alpha_e`` at the window end, broadcast against ``z``.
    """
    w, t_c = window.expand_like(z), expand_like(t, z)
    x0 = (z - sigma * output) / alpha
    delta = x0.clamp(-clip_range, clip_range) - x0
    return output + alpha_e * delta * window_end_denominator(t_c, w) / (w.eta * (w.t_e - w.t_s))


def target_from_window(z_s: torch.Tensor, z_e: torch.Tensor, window: Window) -> torch.Tensor:
    """Regression target for the segment ``z_s -> z_e`` of ``window``.

    ``velocity``: ``(z_e - z_s) / (t_e - t_s)``; epsilon-type: ``(z_e - lam z_s) / eta``.
    The target does not depend on where in the window the student is evaluated.
    """
    if window.prediction_type == "velocity":
        return (z_e - z_s) / (expand_like(window.t_e, z_s) - expand_like(window.t_s, z_s))
    return (z_e - expand_like(window.lam, z_s) * z_s) / expand_like(window.eta, z_s)


def interpolate(
    z_s: torch.Tensor, z_e: torch.Tensor, t: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor
) -> torch.Tensor:
    """Point of the straight segment at time ``t``: ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``."""
    frac = (expand_like(t, z_s) - expand_like(t_s, z_s)) / (expand_like(t_e, z_s) - expand_like(t_s, z_s))
    return z_s + (z_e - z_s) * frac


__all__ = [
    "MODEL_OUTPUT_TYPES",
    "check_model_output_type",
    "clipped_epsilon",
    "epsilon_from_output",
    "resolve_model_output_type",
    "interpolate",
    "target_from_window",
    "velocity_from_output",
    "window_end_denominator",
    "window_end_from_output",
]
