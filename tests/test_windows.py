"""Unit tests of perflow.windows against METHOD.md sections 1-4, with references written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perflow.schedule import abar_at, timestep_index
from perflow.windows import (
    check_boundaries,
    check_prediction_type,
    equal_boundaries,
    inference_times,
    window_bounds,
    window_coefficients,
    window_index,
)

T = 1000
ARBITRARY = [1.0, 0.7, 0.35, 0.1, 0.0]


def sd_alphas_cumprod(num_train_timesteps: int = T) -> torch.Tensor:
    """SD's scaled_linear schedule, written out: abar = cumprod(1 - linspace(sqrt(b0), sqrt(b1), T)^2)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ref_window(t: float, bounds: list[float]) -> int:
    """Window j with bounds[j+1] < t <= bounds[j]; t = 0 (or below) is in the last window."""
    for j in range(len(bounds) - 1):
        if bounds[j + 1] < t:
            return j
    return len(bounds) - 2


# ---------------------------------------------------------------- boundaries


def test_equal_boundaries_are_k_over_K():
    assert equal_boundaries(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert equal_boundaries(1).tolist() == [1.0, 0.0]
    for K in (3, 7):
        assert equal_boundaries(K).tolist() == [k / K for k in range(K, -1, -1)]
    b = equal_boundaries(2, t_noise=0.9, t_clean=0.1)
    assert torch.allclose(b, torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64))
    assert equal_boundaries(4).dtype == torch.float64


@pytest.mark.parametrize("K", [0, -1, 2.5, True, "4"])
def test_equal_boundaries_reject_bad_K(K):
    with pytest.raises(ValueError, match="num_time_windows"):
        equal_boundaries(K)


@pytest.mark.parametrize("t_noise,t_clean", [(1.0, 1.0), (0.5, 0.7), (1.2, 0.0), (1.0, -0.1)])
def test_equal_boundaries_reject_bad_ends(t_noise, t_clean):
    with pytest.raises(ValueError, match="t_clean"):
        equal_boundaries(4, t_noise, t_clean)


def test_check_boundaries_accepts_and_returns_float64():
    b = check_boundaries(ARBITRARY)
    assert b.dtype == torch.float64 and b.tolist() == ARBITRARY
    assert check_boundaries(torch.tensor([1.0, 0.0])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "bad,msg",
    [
        ([1.0], "at least two"),
        ([0.0, 0.5, 1.0], "start at 1"),
        ([1.0, 0.5, 0.1], "end at 0"),
        ([0.9, 0.5, 0.0], "start at 1"),
        ([1.0, 0.5, 0.5, 0.0], "strictly decrease"),
        ([1.0, 0.3, 0.6, 0.0], "strictly decrease"),
    ],
)
def test_check_boundaries_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_boundaries(bad)


# ---------------------------------------------------------------- look-up


@pytest.mark.parametrize("bounds", [equal_boundaries(4).tolist(), ARBITRARY, [1.0, 0.0]])
def test_window_index_matches_reference_loop(bounds):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([torch.rand(200, generator=g, dtype=torch.float64), torch.tensor(bounds, dtype=torch.float64)])
    got = window_index(t, torch.tensor(bounds, dtype=torch.float64))
    assert got.tolist() == [ref_window(x, bounds) for x in t.tolist()]


def test_boundary_belongs_to_window_starting_there_and_zero_to_last():
    b = torch.tensor(ARBITRARY, dtype=torch.float64)
    t = torch.tensor([1.0, 0.85, 0.7, 0.6999, 0.35, 0.1, 0.05, 0.0], dtype=torch.float64)
    assert window_index(t, b).tolist() == [0, 0, 1, 1, 2, 3, 3, 3]
    t_s, t_e = window_bounds(t, b)
    assert t_s.tolist() == [1.0, 1.0, 0.7, 0.7, 0.35, 0.1, 0.1, 0.1]
    assert t_e.tolist() == [0.7, 0.7, 0.35, 0.35, 0.1, 0.0, 0.0, 0.0]


def test_window_bounds_shapes_and_dtypes():
    b = equal_boundaries(4)
    t32 = torch.tensor([[0.9, 0.3], [0.5, 0.01]], dtype=torch.float32)  # any shape
    t_s, t_e = window_bounds(t32, b)
    assert t_s.shape == t32.shape and t_s.dtype == torch.float32
    assert t_s.tolist() == [[1.0, 0.5], [0.5, 0.25]] and t_e.tolist() == [[0.75, 0.25], [0.25, 0.0]]
    t_s0, t_e0 = window_bounds(torch.tensor(0.6, dtype=torch.float64), b)  # 0-d
    assert t_s0.dim() == 0 and (t_s0.item(), t_e0.item()) == (0.75, 0.5)


# ---------------------------------------------------------------- abar


def test_timestep_index_rule():
    t = torch.tensor([1.0, 0.75, 0.5, 0.0, 0.0004, 0.0006, 0.0016, 0.9996, 1.2, -0.3], dtype=torch.float64)
    expected = [max(0, min(T - 1, round(x * T) - 1)) for x in t.tolist()]
    assert expected[:4] == [999, 749, 499, 0]  # METHOD.md: t=1 -> 999, t=0 -> 0
    assert timestep_index(t, T).tolist() == expected


def test_abar_at_uses_index_rule_without_wraparound():
    ac = sd_alphas_cumprod()
    t = torch.tensor([0.0, 0.001, 0.25, 1.0], dtype=torch.float64)
    got = abar_at(t, ac)
    assert torch.equal(got, ac[[0, 0, 249, 999]])
    assert got[0] > 0.99  # abar[0], not abar[-1] (~0.0047) as a wrap-around would give
    assert abar_at(torch.tensor(0.5), ac.float()).dtype == torch.float32


# ---------------------------------------------------------------- lam / eta


@pytest.mark.parametrize("bounds", [equal_boundaries(4).tolist(), ARBITRARY])
def test_window_coefficients_match_method_formulas(bounds):
    ac = sd_alphas_cumprod()
    t_s = torch.tensor(bounds[:-1], dtype=torch.float64)
    t_e = torch.tensor(bounds[1:], dtype=torch.float64)
    lam_d, eta_d = window_coefficients(t_s, t_e, ac, "diff_eps")
    lam_b, eta_b = window_coefficients(t_s, t_e, ac, "ddim_eps")
    for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        a_s = ac[max(0, round(s * T) - 1)].item()
        a_e = ac[max(0, round(e * T) - 1)].item()
        g = math.sqrt(a_s / a_e)
        assert lam_d[k].item() == pytest.approx(1 / g, rel=1e-12)
        assert eta_d[k].item() == pytest.approx(-math.sqrt(1 - g * g) / g, rel=1e-12)
        assert lam_b[k].item() == pytest.approx(math.sqrt(a_e / a_s), rel=1e-12)
        ref = math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
        assert eta_b[k].item() == pytest.approx(ref, rel=1e-12)
    lam_v, eta_v = window_coefficients(t_s, t_e, ac, "velocity")
    assert torch.equal(lam_v, torch.ones(4, dtype=torch.float64)) and torch.equal(eta_v, torch.zeros(4, dtype=torch.float64))


def test_coefficients_are_the_diffusion_maps_they_name():
    """ddim_eps is the DDIM jump t_s -> t_e; diff_eps inverts the forward transition t_e -> t_s."""
    ac = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(1)
    t_s, t_e = torch.tensor(0.75, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    a_s, a_e = ac[749], ac[499]
    x0, eps = torch.randn(2, 16, generator=g, dtype=torch.float64)
    z_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    lam, eta = window_coefficients(t_s, t_e, ac, "ddim_eps")
    torch.testing.assert_close(lam * z_s + eta * eps, a_e.sqrt() * x0 + (1 - a_e).sqrt() * eps, rtol=0, atol=1e-12)
    z_e = torch.randn(16, generator=g, dtype=torch.float64)
    q = (a_s / a_e).sqrt()
    z_s = q * z_e + (1 - q**2).sqrt() * eps  # forward transition q(z_s | z_e)
    lam, eta = window_coefficients(t_s, t_e, ac, "diff_eps")
    torch.testing.assert_close(lam * z_s + eta * eps, z_e, rtol=0, atol=1e-12)


def test_prediction_type_checks():
    assert check_prediction_type("ddim_eps") == "ddim_eps"
    with pytest.raises(ValueError, match="diff_eps"):
        check_prediction_type("epsilon")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        window_coefficients(torch.tensor(1.0), torch.tensor(0.5), sd_alphas_cumprod(), "eps")


# ---------------------------------------------------------------- inference grids


def ref_grid(n_steps: int, bounds: list[float]) -> list[float]:
    """METHOD.md section 4 written with numpy: N//K per window, first N%K one more, linspace without end."""
    K = len(bounds) - 1
    if n_steps < K:
        return [bounds[(i * K) // n_steps] for i in range(n_steps)]
    out = []
    for j in range(K):
        n = n_steps // K + (1 if j < n_steps % K else 0)
        out += np.linspace(bounds[j], bounds[j + 1], n, endpoint=False).tolist()
    return out


@pytest.mark.parametrize("bounds", [equal_boundaries(4).tolist(), equal_boundaries(3).tolist(), ARBITRARY])
@pytest.mark.parametrize("n_steps", [1, 2, 3, 4, 5, 6, 7, 8, 13])
def test_inference_times_match_reference(bounds, n_steps):
    got = inference_times(n_steps, torch.tensor(bounds, dtype=torch.float64))
    assert got.dtype == torch.float64
    assert got.tolist() == ref_grid(n_steps, bounds)  # bit for bit, as np.linspace


def test_inference_times_method_examples():
    b = equal_boundaries(4)
    assert (inference_times(4, b) * T).tolist() == [1000, 750, 500, 250]
    assert (inference_times(6, b) * T).tolist() == [1000, 875, 750, 625, 500, 250]
    assert inference_times(1, b).tolist() == [1.0]
    assert inference_times(2, b).tolist() == [1.0, 0.5]
    assert inference_times(3, b).tolist() == [1.0, 0.75, 0.5]


@pytest.mark.parametrize("n", [0, -2, 2.0])
def test_inference_times_reject_bad_n(n):
    with pytest.raises(ValueError, match="num_inference_steps"):
        inference_times(n, equal_boundaries(4))


def test_short_last_boundaries_shorten_only_the_last_window():
    """``t_1 = fraction / K``, the other boundaries equal; fraction 1 is equal windows; K = 1 has no inner boundary."""
    from perflow.windows import equal_boundaries, short_last_boundaries

    assert short_last_boundaries(4, 0.6).tolist() == [1.0, 0.75, 0.5, 0.15, 0.0]
    assert short_last_boundaries(2, 0.5).tolist() == [1.0, 0.25, 0.0]
    assert torch.equal(short_last_boundaries(5, 1.0), equal_boundaries(5))
    assert short_last_boundaries(1, 0.3).tolist() == [1.0, 0.0]
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="last_window_fraction"):
            short_last_boundaries(4, bad)
