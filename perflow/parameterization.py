"""Model output <-> velocity / window end, and the training targets (its inverse).

``shared/METHOD.md`` sections 3 and 4. For ``t_c`` in window ``(t_s, t_e)`` the
student should follow ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``.

- ``velocity``: the model outputs ``dz/dt``; the target is ``(z_e - z_s) / (t_e - t_s)``.
- epsilon-type (``diff_eps``, ``ddim_eps``): writing ``z_e = lam z_s + eta eps``
  with the window's ``(lam, eta)`` (:func:`perflow.windows.window_coefficients`),
  the target is ``eps = (z_e - lam z_s) / eta``; at sampling time the output is
  turned back into the predicted window end

      z_e_hat = (lam (t_e - t_s) z + eta (t_e - t_c) out) / (lam (t_c - t_s) + (t_e - t_c))

  and the velocity ``v = (z_e_hat - z) / (t_e - t_c)``.

The two directions are exact inverses on the segment: feeding the target of a
segment back at any point of it gives the segment's velocity (tested as a round trip).
All times are tensors broadcastable against the batch (shape ``(B,)`` or scalar).
"""

from __future__ import annotations

import torch

from .windows import EPSILON_TYPES, check_prediction_type


def _bcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(B,)`` (or scalar) tensor to broadcast against ``like`` ``(B, ...)``,
    in ``like``'s dtype and device (callers choose the precision by choosing ``like``'s dtype)."""
    x = torch.as_tensor(x, device=like.device, dtype=like.dtype)
    if x.dim() == 0:
        return x
    return x.reshape(x.shape + (1,) * (like.dim() - x.dim()))


def window_end_from_output(
    output: torch.Tensor,
    z: torch.Tensor,
    t_c: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    lam: torch.Tensor,
    eta: torch.Tensor,
) -> torch.Tensor:
    """Predicted window end of an epsilon-type output:
    ``z_e_hat = (lam (t_e - t_s) z + eta (t_e - t_c) out) / (lam (t_c - t_s) + (t_e - t_c))``."""
    t_c, t_s, t_e, lam, eta = (_bcast(v, z) for v in (t_c, t_s, t_e, lam, eta))
    denom = lam * (t_c - t_s) + (t_e - t_c)
    return (lam * (t_e - t_s) * z + eta * (t_e - t_c) * output) / denom


def velocity_from_output(
    output: torch.Tensor,
    z: torch.Tensor,
    t_c: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    lam: torch.Tensor,
    eta: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Velocity ``dz/dt`` at ``(z, t_c)``: ``out`` itself for ``velocity``, else ``(z_e_hat - z) / (t_e - t_c)``."""
    check_prediction_type(prediction_type)
    if prediction_type == "velocity":
        return output
    z_e_hat = window_end_from_output(output, z, t_c, t_s, t_e, lam, eta)
    return (z_e_hat - z) / (_bcast(t_e, z) - _bcast(t_c, z))


def target_from_window(
    z_s: torch.Tensor,
    z_e: torch.Tensor,
    t_s: torch.Tensor,
    t_e: torch.Tensor,
    lam: torch.Tensor,
    eta: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """Regression target for the segment ``z_s -> z_e`` of window ``(t_s, t_e)``.

    ``velocity``: ``(z_e - z_s) / (t_e - t_s)``; epsilon-type: ``(z_e - lam z_s) / eta``.
    The target does not depend on where in the window the student is evaluated.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "velocity":
        return (z_e - z_s) / (_bcast(t_e, z_s) - _bcast(t_s, z_s))
    assert prediction_type in EPSILON_TYPES
    return (z_e - _bcast(lam, z_s) * z_s) / _bcast(eta, z_s)


def interpolate(
    z_s: torch.Tensor, z_e: torch.Tensor, t: torch.Tensor, t_s: torch.Tensor, t_e: torch.Tensor
) -> torch.Tensor:
    """Point of the straight segment at time ``t``: ``z_t = z_s + (z_e - z_s) (t - t_s) / (t_e - t_s)``."""
    frac = (_bcast(t, z_s) - _bcast(t_s, z_s)) / (_bcast(t_e, z_s) - _bcast(t_s, z_s))
    return z_s + (z_e - z_s) * frac
