"""The flow-matching schedule kind: config, shift, the teacher's window solve, time sampling, refusals.

References come from the formulas (``tests/flow_helpers.py``) and from diffusers'
``FlowMatchEulerDiscreteScheduler`` and pipelines' ``calculate_shift`` (the grid the teacher samples on).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flow_helpers import MU, S, T, euler, exact_flow, gaussian_velocity, shifted, window_solve_sigmas
from perflow.objective import reflow_example
from perflow.schedule import (
    DiscreteVPSchedule,
    FlowMatchSchedule,
    dynamic_shift_mu,
    schedule_from_config,
    shift_sigma,
    unshift_sigma,
)
from perflow.solver import solve_window, x0_eps_from_output
from perflow.time_sampling import logit_normal_times, make_time_sampler
from perflow.windows import equal_boundaries, resolve_boundaries, window_of

SD3 = dict(shift=3.0)
FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)


def test_schedule_from_config_picks_the_kind_and_refuses_neither():
    fm = schedule_from_config(FlowMatchEulerDiscreteScheduler(**FLUX).config)
    assert isinstance(fm, FlowMatchSchedule)
    assert (fm.shift, fm.use_dynamic_shifting, fm.base_shift, fm.max_shift, fm.base_image_seq_len,
            fm.max_image_seq_len) == (3.0, True, 0.5, 1.15, 256, 4096)
    assert schedule_from_config(FlowMatchEulerDiscreteScheduler(**SD3).config).shift == 3.0
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    assert schedule_from_config(unipc.config).shift == 3.0  # flow mode names its shift flow_shift
    vp = schedule_from_config(DDIMScheduler(beta_schedule="scaled_linear").config)
    assert isinstance(vp, DiscreteVPSchedule)
    with pytest.raises(ValueError, match="neither variance-preserving .* nor flow-matching"):
        schedule_from_config({"_class_name": "EDMEulerScheduler", "sigma_min": 0.002, "sigma_max": 80.0})
    from diffusers import EulerDiscreteScheduler

    # called at 0.25 log sigma, not at an index: the discrete teacher solve would feed it wrong timesteps
    with pytest.raises(ValueError, match="timestep_type 'continuous'"):
        schedule_from_config(EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction").config)
    assert isinstance(schedule_from_config(EulerDiscreteScheduler().config), DiscreteVPSchedule)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flow_marginal_alpha_sigma_timestep(dtype):
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    t = torch.tensor([1.0, 0.3, 0.0], dtype=torch.float64)
    s = FlowMatchSchedule(shift=3.0)
    tv = t.to(dtype).view(-1, 1, 1)
    assert torch.equal(s.marginal(x0, eps, t), (1 - tv) * x0 + tv * eps)
    assert torch.equal(s.timestep(t), torch.tensor([1000.0, 300.0, 0.0], dtype=torch.float64))


def test_flow_prediction_gives_x0_and_eps():
    g = torch.Generator().manual_seed(1)
    x0, eps = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.5, 0.2, 0.05], dtype=torch.float64).view(-1, 1)
    z = (1 - t) * x0 + t * eps
    x0_hat, eps_hat = x0_eps_from_output(eps - x0, z, 1 - t, t, "flow_prediction")
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-15)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-15)


def test_shift_maps_match_the_formulas_and_invert():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (1.0, 3.0, math.exp(1.15)):
        ref = torch.tensor([shifted(x, s) for x in u.tolist()], dtype=torch.float64)
        assert torch.equal(shift_sigma(u, s), ref)
        torch.testing.assert_close(unshift_sigma(shift_sigma(u, s), s), u, rtol=0, atol=1e-15)
    # dynamic shifting's e^mu / (e^mu + (1/u - 1)) is the same map with s = e^mu
    mu, inner = 0.8, u[1:]
    torch.testing.assert_close(shift_sigma(inner, math.exp(mu)), math.exp(mu) / (math.exp(mu) + (1 / inner - 1)),
                               rtol=1e-15, atol=0)


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 9000])
def test_teacher_grid_is_the_pipelines_grid_at_every_resolution(image_seq_len):
    """The trainer's teacher grid over the whole time axis = diffusers' scheduler grid with the pipeline's mu."""
    n = 8
    fm = FlowMatchSchedule(**FLUX)
    mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    assert dynamic_shift_mu(image_seq_len, 256, 4096, 0.5, 1.15) == mu
    ours = fm.at_resolution(image_seq_len)
    assert ours.mu == mu and ours.effective_shift == math.exp(mu)
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    grid = torch.stack([ours.solver_time(one, zero, j, n) for j in range(n + 1)])
    ref = FlowMatchEulerDiscreteScheduler(**FLUX)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)  # what FluxPipeline passes
    torch.testing.assert_close(grid.float(), ref.sigmas, rtol=0, atol=1e-7)  # diffusers keeps float32
    indep = torch.tensor([shifted(1 - j / n, math.exp(mu)) for j in range(n + 1)], dtype=torch.float64)
    torch.testing.assert_close(grid, indep, rtol=1e-15, atol=1e-16)


def test_dynamic_shift_without_resolution_is_refused():
    fm = FlowMatchSchedule(**FLUX)
    z = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="dynamic shifting.*at_resolution"):
        solve_window(gaussian_velocity, z, torch.ones(2, dtype=torch.float64), 0.5, 4, fm, "flow_prediction")
    with pytest.raises(ValueError, match="image_seq_len"):
        fm.at_resolution()
    assert FlowMatchSchedule(shift=3.0).at_resolution(1024).effective_shift == 3.0  # static: no resolution needed


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_window_solve_is_euler_on_the_shifted_grid(shift):
    g = torch.Generator().manual_seed(2)
    z_s = torch.randn(3, 5, generator=g, dtype=torch.float64)
    fm = FlowMatchSchedule(shift=shift)
    n = 6
    for t_s, t_e in [(1.0, 0.75), (0.5, 0.25), (0.25, 0.0)]:
        ours = solve_window(gaussian_velocity, z_s, torch.full((3,), t_s, dtype=torch.float64), t_e, n, fm,
                            "flow_prediction")
        torch.testing.assert_close(ours, euler(z_s, window_solve_sigmas(t_s, t_e, n, shift)), rtol=1e-14, atol=1e-14)


def test_window_solve_converges_to_the_exact_flow():
    g = torch.Generator().manual_seed(3)
    z_s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    t_s = torch.ones(4, dtype=torch.float64)
    errors = {n: (solve_window(gaussian_velocity, z_s, t_s, 0.5, n, FlowMatchSchedule(shift=3.0), "flow_prediction")
                  - exact_flow(z_s, 1.0, 0.5)).abs().max().item() for n in (16, 32, 64, 128)}
    for n in (16, 32, 64):  # Euler is first order
        assert 0.4 < errors[2 * n] / errors[n] < 0.6, errors


def test_velocity_student_starts_at_the_teacher():
    """n = 1: the window target is the teacher's own output at the window start (one Euler step)."""
    g = torch.Generator().manual_seed(4)
    x0, noise = (torch.randn(4, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
    fm = FlowMatchSchedule(shift=3.0)
    b = resolve_boundaries(4, None, fm, prediction_type="velocity")
    ex = reflow_example(gaussian_velocity, x0, b, fm, 1, "velocity", "flow_prediction", noise=noise, t=t)
    torch.testing.assert_close(ex.target, gaussian_velocity(ex.z_s, ex.t_s * T), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ex.z_s, (1 - ex.t_s.view(-1, 1, 1)) * x0 + ex.t_s.view(-1, 1, 1) * noise, rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps"])
def test_epsilon_types_are_refused_for_flow_matching(prediction_type):
    with pytest.raises(ValueError, match="does not apply to a flow-matching teacher.*'velocity'"):
        resolve_boundaries(4, None, FlowMatchSchedule(shift=3.0), prediction_type=prediction_type)
    with pytest.raises(ValueError, match="does not apply to a flow-matching teacher"):
        window_of(torch.tensor([0.5], dtype=torch.float64), equal_boundaries(4), FlowMatchSchedule(), prediction_type)


def test_logit_normal_times():
    sampler = make_time_sampler("logit_normal", equal_boundaries(4), mean=0.3, std=0.8)
    t = sampler(8, torch.Generator().manual_seed(5), torch.device("cpu"))
    n = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert t.dtype == torch.float64 and torch.equal(t, 1 / (1 + torch.exp(-(0.3 + 0.8 * n))))
    big = logit_normal_times(0.3, 0.8)(200_000, torch.Generator().manual_seed(6), torch.device("cpu"))
    logit = torch.log(big / (1 - big))
    assert abs(logit.mean().item() - 0.3) < 0.01 and abs(logit.std().item() - 0.8) < 0.01
    with pytest.raises(ValueError, match="logit_normal_std"):
        logit_normal_times(0.0, 0.0)
    with pytest.raises(ValueError, match="logit_normal"):
        make_time_sampler("gamma", equal_boundaries(4))
