"""The trainer's former loss and window-end weight (``perflow.training.loop`` before it switched to
:mod:`perflow.objective`), kept as an independent reference for tests/test_objective.py."""

from __future__ import annotations

import torch

from perflow.windows import window_coefficients


def reflow_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """``mean_b weight_b mean_i rho(pred - target)``, ``rho(d) = d^2`` or ``sqrt(d^2 + c^2) - c``."""
    d = pred.float() - target.float()
    rho = d.square() if kind == "mse" else (d.square() + huber_c**2).sqrt() - huber_c
    per_sample = rho.flatten(1).mean(1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean()


def window_end_weight(ex, alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """``(eta (t_e - t) / (lam (t - t_s) + t_e - t))^2``; for ``velocity`` ``(t_e - t)^2``."""
    t, t_s, t_e = ex.t, ex.t_s, ex.t_e
    if prediction_type == "velocity":
        return ((t_e - t) ** 2).float()
    lam, eta = window_coefficients(t_s, t_e, alphas_cumprod.to(torch.float64), prediction_type)
    return (eta * (t_e - t) / (lam * (t - t_s) + (t_e - t))).square().float()
