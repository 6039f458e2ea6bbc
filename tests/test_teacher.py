"""The teacher's DDIM window solver and the reflow targets, against closed forms.

Gaussian data ``x0 ~ N(mu, s^2 I)`` has an exact teacher,
``eps(z) = sqrt(1 - abar) (z - sqrt(abar) mu) / (abar s^2 + 1 - abar)``, and an exact
probability-flow map ``z -> sqrt(b) mu + sqrt((b s^2 + 1 - b) / (a s^2 + 1 - a)) (z - sqrt(a) mu)``
between noise levels ``a`` and ``b``. DDIM is a first-order solver of that ODE, so its error must
fall like ``1/n`` (halving when ``n`` doubles) and vanish as ``n`` grows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gaussian_helpers import gaussian_denoiser, gaussian_flow
from perflow.objective import reflow_example
from perflow.schedule import abar_at
from perflow.solver import solve_window
from perflow.windows import check_boundaries, window_bounds


pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.7, 0.3


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """SD's scaled_linear schedule, computed here independently of diffusers and perflow."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


def fine_alphas_cumprod(T: int = 200_000) -> torch.Tensor:
    """A finely discretised smooth schedule, so the index rounding of ``abar(t)`` is negligible."""
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    return torch.exp(-6.0 * t**2) * (1 - 1e-3) + 1e-4 * (1 - t)


def _window_batch(ac: torch.Tensor, boundaries, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b = check_boundaries(boundaries)
    t = torch.tensor([0.999, 0.85, 0.65, 0.45, 0.25, 0.05, 0.0], dtype=torch.float64)
    t_s, t_e = window_bounds(t, b)
    x0 = MU + S * torch.randn(t.numel(), 3, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    a = abar_at(t_s, ac).view(-1, 1, 1)
    z_s = a.sqrt() * x0 + (1 - a).sqrt() * noise
    exact = gaussian_flow(z_s, abar_at(t_s, ac), abar_at(t_e, ac), MU, S)
    return z_s, t_s, t_e, exact


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("boundaries", [[1.0, 0.75, 0.5, 0.25, 0.0], [1.0, 0.7, 0.2, 0.0]])
def test_solver_converges_to_exact_gaussian_flow(prediction_type, boundaries):
    ac = fine_alphas_cumprod()
    z_s, t_s, t_e, exact = _window_batch(ac, boundaries)
    assert len(set(t_s.tolist())) > 2  # samples sit in different windows
    den = gaussian_denoiser(MU, S, ac, prediction_type)
    errors = {}
    for n in (8, 16, 32, 64, 4096):
        z_e = solve_window(den, z_s, t_s, t_e, n, ac, prediction_type)
        errors[n] = (z_e - exact).abs().max().item()
    # first order: doubling n halves the error (ratio -> 1/2; allow 0.4 .. 0.6)
    for n in (8, 16, 32):
        assert 0.4 < errors[2 * n] / errors[n] < 0.6, errors
    assert errors[4096] < 2e-4 and errors[4096] < errors[64] / 40, errors


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_solver_on_sd_schedule_per_sample_windows(prediction_type):
    """On SD's 1000-step schedule the error shrinks with n until steps are one index apart."""
    ac = sd_alphas_cumprod()
    z_s, t_s, t_e, exact = _window_batch(ac, [1.0, 0.75, 0.5, 0.25, 0.0], seed=1)
    den = gaussian_denoiser(MU, S, ac, prediction_type)
    err = [(solve_window(den, z_s, t_s, t_e, n, ac, prediction_type) - exact).abs().max().item() for n in (2, 8, 32, 250)]
    assert all(b < a for a, b in zip(err, err[1:])), err
    assert err[-1] < 0.01 * (z_s.abs().max().item()), err
    # float32 inputs give the same answer to float32 precision (the update runs in float32)
    z32 = solve_window(den, z_s.float(), t_s, t_e, 8, ac, prediction_type)
    z64 = solve_window(den, z_s, t_s, t_e, 8, ac, prediction_type)
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, rtol=1e-4, atol=1e-5)


def test_one_step_is_the_ddim_update():
    """n = 1: ``z_e = sqrt(abar_e) x0_hat + sqrt(1 - abar_e) eps_hat`` with the teacher at ``i(t_s)``."""
    ac = sd_alphas_cumprod()
    z_s, t_s, t_e, _ = _window_batch(ac, [1.0, 0.5, 0.0])
    den = gaussian_denoiser(MU, S, ac, "epsilon")
    i_s = (torch.round(t_s * 1000).long() - 1).clamp(0, 999)
    i_e = (torch.round(t_e * 1000).long() - 1).clamp(0, 999)
    a_s, a_e = ac[i_s].view(-1, 1, 1), ac[i_e].view(-1, 1, 1)
    eps = den(z_s, i_s)
    x0 = (z_s - (1 - a_s).sqrt() * eps) / a_s.sqrt()
    expected = a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps
    torch.testing.assert_close(solve_window(den, z_s, t_s, t_e, 1, ac, "epsilon"), expected)


@pytest.mark.parametrize("prediction_type", ["velocity", "diff_eps", "ddim_eps"])
def test_reflow_targets_match_method_formulas(prediction_type):
    """Targets recomputed here from METHOD.md section 3 with an independent abar."""
    ac = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(3)
    x0 = MU + S * torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.97, 0.8, 0.5, 0.49, 0.2, 0.01], dtype=torch.float64)
    boundaries = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64)
    den = gaussian_denoiser(MU, S, ac, "epsilon")
    ex = reflow_example(den, x0, boundaries, ac, 4, prediction_type, "epsilon", noise=noise, t=t)

    # the window holding each t (t = 0.5 sits on a boundary: it starts the window (0.5, 0.25))
    t_s = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 0.25], dtype=torch.float64)
    t_e = t_s - 0.25
    torch.testing.assert_close(ex.t_s, t_s)
    torch.testing.assert_close(ex.t_e, t_e)
    idx = lambda tt: (torch.round(tt * 1000).long() - 1).clamp(0, 999)  # noqa: E731
    a_s, a_e = ac[idx(t_s)].view(-1, 1, 1, 1), ac[idx(t_e)].view(-1, 1, 1, 1)
    z_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * noise
    torch.testing.assert_close(ex.z_s, z_s)
    z_e = ex.z_e
    ts, te, tt = (v.view(-1, 1, 1, 1) for v in (t_s, t_e, t))
    torch.testing.assert_close(ex.z_t, z_s + (z_e - z_s) * (tt - ts) / (te - ts))
    torch.testing.assert_close(ex.timestep, (t * 1000).float())
    if prediction_type == "velocity":
        expected = (z_e - z_s) / (te - ts)
    elif prediction_type == "diff_eps":
        gg = (a_s / a_e).sqrt()
        expected = (z_e - z_s / gg) / (-(1 - gg**2).sqrt() / gg)
    else:
        lam = (a_e / a_s).sqrt()
        eta = (1 - a_e).sqrt() - (a_e * (1 - a_s) / a_s).sqrt()
        expected = (z_e - lam * z_s) / eta
    torch.testing.assert_close(ex.target, expected)
