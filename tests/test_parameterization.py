"""Unit tests of perflow.parameterization: targets and their inverse (output -> velocity / window end)."""

from __future__ import annotations

import pytest
import torch

from loose_window_args import target_from_window, velocity_from_output, window_end_from_output
from perflow.parameterization import interpolate
from perflow.tensors import expand_like as _bcast
from perflow.windows import equal_boundaries, window_bounds, window_coefficients

B = 6


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def random_segments(bounds: torch.Tensor, seed: int = 0):
    """Per sample: a window (t_s, t_e), a segment z_s -> z_e and a time t inside the window (incl. t_s)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    t[0] = 1.0  # a window start
    t[1] = bounds[2].item()  # an inner boundary: starts its window
    t_s, t_e = window_bounds(t, bounds)
    z_s = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    z_e = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    return t, t_s, t_e, z_s, z_e


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("bounds", [equal_boundaries(4), torch.tensor([1.0, 0.7, 0.35, 0.1, 0.0], dtype=torch.float64)])
def test_round_trip_target_to_velocity_is_segment_slope(prediction_type, bounds):
    """Feeding a segment's target back at any point of the segment gives (z_e - z_s) / (t_e - t_s)."""
    t, t_s, t_e, z_s, z_e = random_segments(bounds)
    lam, eta = window_coefficients(t_s, t_e, sd_alphas_cumprod(), prediction_type)
    target = target_from_window(z_s, z_e, t_s, t_e, lam, eta, prediction_type)
    z_t = interpolate(z_s, z_e, t, t_s, t_e)
    v = velocity_from_output(target, z_t, t, t_s, t_e, lam, eta, prediction_type)
    slope = (z_e - z_s) / (t_e - t_s).view(B, 1, 1, 1)
    torch.testing.assert_close(v, slope, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps"])
def test_window_end_from_output_recovers_z_e(prediction_type):
    t, t_s, t_e, z_s, z_e = random_segments(equal_boundaries(4), seed=3)
    lam, eta = window_coefficients(t_s, t_e, sd_alphas_cumprod(), prediction_type)
    eps = target_from_window(z_s, z_e, t_s, t_e, lam, eta, prediction_type)
    # the epsilon target is defined by z_e = lam z_s + eta eps
    lam4, eta4 = lam.view(B, 1, 1, 1), eta.view(B, 1, 1, 1)
    torch.testing.assert_close(lam4 * z_s + eta4 * eps, z_e, rtol=1e-12, atol=1e-12)
    for frac in (0.0, 0.3, 0.999):  # anywhere on the segment, including its start
        tc = t_s + frac * (t_e - t_s)
        z_t = interpolate(z_s, z_e, tc, t_s, t_e)
        z_e_hat = window_end_from_output(eps, z_t, tc, t_s, t_e, lam, eta)
        torch.testing.assert_close(z_e_hat, z_e, rtol=1e-10, atol=1e-10)


def test_velocity_target_and_passthrough():
    t, t_s, t_e, z_s, z_e = random_segments(equal_boundaries(2), seed=5)
    one, zero = torch.ones(B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)
    target = target_from_window(z_s, z_e, t_s, t_e, one, zero, "velocity")
    torch.testing.assert_close(z_s + target * (t_e - t_s).view(B, 1, 1, 1), z_e, rtol=0, atol=1e-12)
    out = torch.randn_like(z_s)
    assert velocity_from_output(out, z_s, t, t_s, t_e, one, zero, "velocity") is out


def test_interpolate_endpoints_and_midpoint():
    t, t_s, t_e, z_s, z_e = random_segments(equal_boundaries(4), seed=7)
    torch.testing.assert_close(interpolate(z_s, z_e, t_s, t_s, t_e), z_s, rtol=0, atol=0)
    torch.testing.assert_close(interpolate(z_s, z_e, t_e, t_s, t_e), z_e, rtol=0, atol=1e-15)
    mid = interpolate(z_s, z_e, (t_s + t_e) / 2, t_s, t_e)
    torch.testing.assert_close(mid, (z_s + z_e) / 2, rtol=0, atol=1e-15)


def test_scalar_times_broadcast_and_precision_follows_like():
    z = torch.randn(2, 4, 3, 3, dtype=torch.float32)
    assert _bcast(torch.tensor(0.5, dtype=torch.float64), z).shape == ()
    x = _bcast(torch.tensor([0.5, 0.25], dtype=torch.float64), z)
    assert x.shape == (2, 1, 1, 1) and x.dtype == torch.float32
    z_e = torch.randn_like(z)
    scalar = interpolate(z, z_e, torch.tensor(0.6), torch.tensor(0.75), torch.tensor(0.5))
    torch.testing.assert_close(scalar, z + (z_e - z) * 0.6)


def test_unknown_prediction_type_raises():
    z = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="prediction_type"):
        velocity_from_output(z, z, z[:, 0], z[:, 0], z[:, 0], z[:, 0], z[:, 0], "epsilon")
    with pytest.raises(ValueError, match="prediction_type"):
        target_from_window(z, z, z[:, 0], z[:, 0], z[:, 0], z[:, 0], "v_prediction")


# ----------------------------------------------------------------------------- the raw output's type


def _teacher_output(z: torch.Tensor, output_type: str) -> torch.Tensor:
    """A fixed nonlinear 'network' that ignores its timestep (so student timestep t T and teacher
    index i(t) see the same function)."""
    return torch.tanh(1.3 * z) + 0.2 * z.roll(1, dims=-1) if output_type != "sample" else 0.5 * torch.tanh(z)


@pytest.mark.parametrize("output_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("bounds", [[1.0, 0.75, 0.5, 0.25, 0.0], [1.0, 0.6125, 0.3, 0.0]])
def test_untrained_ddim_eps_student_of_its_teachers_output_type_is_the_teachers_ddim(output_type, bounds):
    """A student that is its teacher and keeps the teacher's output type (model_output_type), sampled with
    ddim_eps at N = K steps, is exactly the teacher's DDIM over the window boundaries (one
    solve_window step per window): the untrained student starts at a training-free sampler."""
    from perflow.scheduler import PeRFlowScheduler
    from perflow.schedule import DiscreteVPSchedule
    from perflow.solver import solve_window

    K = len(bounds) - 1
    sched = PeRFlowScheduler(prediction_type="ddim_eps", window_boundaries=bounds, model_output_type=output_type)
    sched.set_timesteps(K)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    x = z.clone()
    for ts in sched.timesteps:
        x = sched.step(_teacher_output(x, output_type), ts, x).prev_sample
    schedule = DiscreteVPSchedule(sched.alphas_cumprod.double())
    ref = z.clone()
    for j in range(K):
        t_s, t_e = torch.tensor(bounds[j], dtype=torch.float64), torch.tensor(bounds[j + 1], dtype=torch.float64)
        ref = solve_window(lambda v, _i: _teacher_output(v, output_type), ref, t_s, t_e, 1, schedule, output_type)
    torch.testing.assert_close(x, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("output_type", ["v_prediction", "sample"])
def test_loss_of_a_teacher_student_at_window_starts_is_zero_only_with_its_output_type(output_type):
    """With a one-step teacher solve and t at window starts, the teacher itself read with its own output
    type has zero loss (its DDIM jump is the target); read as epsilon it does not."""
    from perflow.objective import batch_loss, reflow_example
    from perflow.schedule import DiscreteVPSchedule

    schedule = DiscreteVPSchedule(sd_alphas_cumprod())
    bounds = equal_boundaries(4)
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = bounds[:4].clone()
    net = lambda z, _ts: _teacher_output(z, output_type)  # noqa: E731
    losses = {}
    for mot in (output_type, "epsilon"):
        ex = reflow_example(net, x0, bounds, schedule, 1, "ddim_eps", output_type, t=t, model_output_type=mot,
                            generator=torch.Generator().manual_seed(2))
        losses[mot] = batch_loss(net, ex).item()
    assert losses[output_type] < 1e-12
    assert losses["epsilon"] > 1e-3


def test_model_output_type_is_checked():
    from perflow.parameterization import check_model_output_type
    from perflow.scheduler import PeRFlowScheduler

    with pytest.raises(ValueError, match="unknown model_output_type"):
        check_model_output_type("eps", "ddim_eps")
    with pytest.raises(ValueError, match="epsilon-type parameterization"):
        PeRFlowScheduler(prediction_type="velocity", model_output_type="v_prediction")


# ----------------------------------------------------------------------------- a clipping teacher


def _ddpm_alphas_cumprod() -> torch.Tensor:
    return torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), dim=0)


def _wild_eps(z: torch.Tensor) -> torch.Tensor:
    """An epsilon 'network' whose implied clean sample leaves [-1, 1] (so clipping acts)."""
    return 0.8 * torch.tanh(2 * z) + 0.3 * z.roll(1, dims=-1)


@pytest.mark.parametrize("bounds", [[1.0, 0.75, 0.5, 0.25, 0.0], [1.0, 0.6125, 0.3, 0.0]])
def test_untrained_student_of_a_clipping_teacher_is_its_clipped_ddim(bounds):
    """With clip_sample (a pixel DDPM's config), the ddim_eps scheduler at N = K is exactly diffusers'
    clipped DDIM step per window (solve_window with n = 1 and the clip); without it, it is not."""
    from perflow.schedule import DiscreteVPSchedule
    from perflow.scheduler import PeRFlowScheduler
    from perflow.solver import solve_window

    K = len(bounds) - 1
    cfg = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="ddim_eps", window_boundaries=bounds)
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    runs = {}
    for clip in (True, False):
        sched = PeRFlowScheduler(**cfg, clip_sample=clip)
        sched.set_timesteps(K)
        x = z.clone()
        for ts in sched.timesteps:
            x = sched.step(_wild_eps(x), ts, x).prev_sample
        runs[clip] = x
    schedule = DiscreteVPSchedule(sched.alphas_cumprod.double())
    ref = z.clone()
    for j in range(K):
        t_s, t_e = torch.tensor(bounds[j], dtype=torch.float64), torch.tensor(bounds[j + 1], dtype=torch.float64)
        ref = solve_window(lambda v, _i: _wild_eps(v), ref, t_s, t_e, 1, schedule, "epsilon", clip_sample=1.0)
    torch.testing.assert_close(runs[True], ref, rtol=1e-9, atol=1e-9)
    assert (runs[False] - ref).abs().max() > 1e-2


def test_clipped_epsilon_moves_the_window_end_by_the_remaining_fraction_of_the_clip_correction():
    """z_e_hat(clipped_epsilon(out)) - z_e_hat(out) = (1 - f) alpha_e (clip(x0) - x0), f the window fraction
    done: the DDIM clip at a window start, nothing at its end (the velocity stays bounded)."""
    from perflow.parameterization import clipped_epsilon, window_end_from_output
    from perflow.schedule import DiscreteVPSchedule
    from perflow.windows import window_of

    schedule = DiscreteVPSchedule(_ddpm_alphas_cumprod())
    bounds = equal_boundaries(4)
    t = torch.tensor([1.0, 0.9, 0.6, 0.2500001, 0.1], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    out = _wild_eps(z)
    w = window_of(t, bounds, schedule, "ddim_eps")
    alpha, sigma = schedule.alpha_sigma(t, z)
    alpha_e = schedule.alpha_sigma(w.t_e, z)[0]
    clipped = clipped_epsilon(out, z, t, w, alpha, sigma, alpha_e, 1.0)
    x0 = (z - sigma * out) / alpha
    f = _bcast((t - w.t_s) / (w.t_e - w.t_s), z)
    expected = (1 - f) * alpha_e * (x0.clamp(-1, 1) - x0)
    got = window_end_from_output(clipped, z, t, w) - window_end_from_output(out, z, t, w)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert expected[:3].abs().max() > 1e-3  # clipping acts in these windows


def test_loss_of_a_clipping_teacher_student_at_window_starts_is_zero_only_with_the_clip():
    """One clipped teacher step per window, t at window starts: the teacher as a ddim_eps student has zero
    loss when its prediction is clipped as the teacher's (clip_sample), not without."""
    from perflow.objective import batch_loss, reflow_example
    from perflow.schedule import DiscreteVPSchedule

    schedule = DiscreteVPSchedule(_ddpm_alphas_cumprod())
    bounds = equal_boundaries(4)
    x0 = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    net = lambda z, _ts: _wild_eps(z)  # noqa: E731
    ex = reflow_example(net, x0, bounds, schedule, 1, "ddim_eps", t=bounds[:4].clone(), clip_sample=1.0,
                        generator=torch.Generator().manual_seed(2))
    assert batch_loss(net, ex, weighting="window_end").item() < 1e-12  # float32 loss arithmetic
    ex.clip_sample = None  # the student unclipped, the target still clipped
    assert batch_loss(net, ex, weighting="window_end").item() > 1e-2
