"""The noise schedule as one object, the Window value, resolve_boundaries and expand_like.

References are written here from the formulas (``docs/method.md``): ``abar[i(t)]`` gathered by
hand, the forward process ``sqrt(abar) x0 + sqrt(1 - abar) eps``, and for a second schedule kind
written in this file (a continuous flow-matching path ``z = (1 - t) x0 + t eps``) the closed-form
probability flow of Gaussian data: the solver, windows and objective must run on it unchanged.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from perflow import PeRFlowScheduler
from perflow.objective import reflow_example
from perflow.parameterization import (
    interpolate,
    target_from_window,
    velocity_from_output,
    window_end_denominator,
    window_end_from_output,
)
from perflow.schedule import DiscreteVPSchedule, NoiseSchedule, alphas_cumprod_from_config, as_schedule
from perflow.solver import solve_window
from perflow.tensors import expand_like
from perflow.windows import (
    Window,
    check_nonzero_abar,
    check_window_spacing,
    equal_boundaries,
    resolve_boundaries,
    window_bounds,
    window_coefficients,
    window_of,
)

T = 1000
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def sd_alphas_cumprod() -> torch.Tensor:
    """SD's scaled_linear schedule in float64, written out independently of diffusers and perflow."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float64) ** 2
    return torch.from_numpy(np.cumprod(1.0 - betas))


def index(t: torch.Tensor) -> torch.Tensor:
    return (torch.round(t * T).long() - 1).clamp(0, T - 1)


# ---------------------------------------------------------------- expand_like


def test_expand_like_reshapes_and_casts():
    like = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    x = expand_like(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), like)
    assert x.shape == (3, 1, 1, 1) and x.dtype == torch.float16
    assert expand_like(torch.tensor(0.5, dtype=torch.float64), like).shape == ()
    assert expand_like(0.25, like).dtype == torch.float16
    assert expand_like(torch.ones(3, 2), like).shape == (3, 2, 1, 1)


# ---------------------------------------------------------------- the discrete VP schedule


def test_vp_schedule_from_config_index_abar():
    s = DiscreteVPSchedule.from_config({**SD, "prediction_type": "epsilon", "clip_sample": False})
    assert torch.equal(s.alphas_cumprod, DDIMScheduler(**SD).alphas_cumprod) and s.dtype == torch.float32
    assert s.num_train_timesteps == T
    t = torch.tensor([1.0, 0.9995, 0.75, 0.0004, 0.0], dtype=torch.float64)
    assert s.index(t).tolist() == [999, 999, 749, 0, 0] and torch.equal(s.timestep(t), s.index(t))
    assert torch.equal(s.abar(t), s.alphas_cumprod[[999, 999, 749, 0, 0]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_vp_marginal_is_the_forward_process(dtype):
    ac = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    t = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    a = ac[index(t)].to(dtype).view(-1, 1, 1, 1)
    z = DiscreteVPSchedule(ac).marginal(x0, noise, t)
    assert z.dtype == dtype
    torch.testing.assert_close(z, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=0, atol=0)
    # the table's precision does not matter: float32 values held in float64 give the same bits
    ac32 = ac.float()
    assert torch.equal(DiscreteVPSchedule(ac32).marginal(x0, noise, t), DiscreteVPSchedule(ac32.double()).marginal(x0, noise, t))


def test_scheduler_add_noise_is_the_schedule_marginal():
    sched = PeRFlowScheduler(prediction_type="velocity")
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    ts = torch.tensor([999, 250])
    assert torch.equal(sched.add_noise(x0, noise, ts), DiscreteVPSchedule(sched.alphas_cumprod).marginal(x0, noise, ts / T))


def test_schedule_to_and_as_schedule():
    s = DiscreteVPSchedule(sd_alphas_cumprod())
    assert s.to(dtype=torch.float64) is s and s.to("cpu") is s
    assert s.to(dtype=torch.float32).dtype == torch.float32
    assert as_schedule(s) is s
    wrapped = as_schedule(s.alphas_cumprod)
    assert isinstance(wrapped, DiscreteVPSchedule) and wrapped.alphas_cumprod is s.alphas_cumprod
    with pytest.raises(TypeError, match="NoiseSchedule"):
        as_schedule([0.9, 0.5])


# ---------------------------------------------------------------- Window and window_of


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
def test_window_of_collects_bounds_and_float64_coefficients(prediction_type):
    ac = sd_alphas_cumprod()
    b = torch.tensor([1.0, 0.7, 0.35, 0.1, 0.0], dtype=torch.float64)
    t = torch.tensor([1.0, 0.7, 0.5, 0.2, 0.05, 0.0], dtype=torch.float64)
    for schedule in (DiscreteVPSchedule(ac), DiscreteVPSchedule(ac.float())):  # coefficients in float64 either way
        w = window_of(t, b, schedule, prediction_type)
        t_s, t_e = window_bounds(t, b)
        lam, eta = window_coefficients(t_s, t_e, schedule.alphas_cumprod.double(), prediction_type)
        assert torch.equal(w.t_s, t_s) and torch.equal(w.t_e, t_e) and w.prediction_type == prediction_type
        assert w.lam.dtype == torch.float64 and torch.equal(w.lam, lam) and torch.equal(w.eta, eta)


def test_window_checks_its_prediction_type_and_expands():
    one = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="prediction_type"):
        Window(one, one, one, one, "epsilon")
    w = Window(one, 0.5 * one, one, one, "ddim_eps").expand_like(torch.zeros(2, 4, 3, 3))
    assert w.t_s.shape == (2, 1, 1, 1) and w.eta.dtype == torch.float32


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
def test_window_api_round_trip(prediction_type):
    """target -> output at any point of the segment -> velocity = the segment's slope; z_e_hat = z_e."""
    ac = sd_alphas_cumprod()
    g = torch.Generator().manual_seed(4)
    b = equal_boundaries(4)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.01], dtype=torch.float64)
    w = window_of(t, b, DiscreteVPSchedule(ac), prediction_type)
    z_s, z_e = (torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    target = target_from_window(z_s, z_e, w)
    z_t = interpolate(z_s, z_e, t, w.t_s, w.t_e)
    slope = (z_e - z_s) / (w.t_e - w.t_s).view(-1, 1, 1, 1)
    torch.testing.assert_close(velocity_from_output(target, z_t, t, w), slope, rtol=1e-10, atol=1e-10)
    if prediction_type != "velocity":
        torch.testing.assert_close(window_end_from_output(target, z_t, t, w), z_e, rtol=1e-10, atol=1e-10)
        assert torch.equal(window_end_denominator(t, w), w.lam * (t - w.t_s) + (w.t_e - t))


# ---------------------------------------------------------------- resolve_boundaries


def test_resolve_boundaries_equal_and_explicit():
    assert torch.equal(resolve_boundaries(4), equal_boundaries(4))
    assert torch.equal(resolve_boundaries(3, t_noise=0.9, t_clean=0.1), equal_boundaries(3, 0.9, 0.1))
    assert resolve_boundaries(4, [1.0, 0.6, 0.3, 0.0]).tolist() == [1.0, 0.6, 0.3, 0.0]  # explicit wins
    with pytest.raises(ValueError, match="strictly decrease"):
        resolve_boundaries(None, [1.0, 0.3, 0.6, 0.0])
    with pytest.raises(ValueError, match="t_noise=1.0"):
        resolve_boundaries(None, [1.0, 0.5, 0.0], t_noise=0.9)
    with pytest.raises(ValueError, match="num_time_windows"):
        resolve_boundaries(None)


def test_resolve_boundaries_checks_against_the_schedule():
    s = DiscreteVPSchedule(sd_alphas_cumprod())
    with pytest.raises(ValueError, match="same teacher timestep index 999"):
        resolve_boundaries(None, [1.0, 0.9995, 0.0], s)
    resolve_boundaries(None, [1.0, 0.9995, 0.0])  # without the schedule only the shape is checked
    with pytest.warns(UserWarning, match=r"spans 4 teacher timestep\(s\).*n=8"):
        resolve_boundaries(None, [1.0, 0.996, 0.0], s, num_solver_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_boundaries(4, None, s, num_solver_steps=8, prediction_type="diff_eps")
    zsnr = DiscreteVPSchedule.from_config({**SD, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="prediction_type='velocity'"):
        resolve_boundaries(4, None, zsnr, prediction_type="ddim_eps")
    assert torch.equal(resolve_boundaries(4, None, zsnr, prediction_type="velocity"), equal_boundaries(4))
    # the same errors as the standalone checks
    with pytest.raises(ValueError, match="same teacher timestep index"):
        check_window_spacing([1.0, 0.9995, 0.0], T)
    with pytest.raises(ValueError, match="v_prediction teacher"):
        check_nonzero_abar(equal_boundaries(2), zsnr, "epsilon")


@pytest.mark.parametrize("settings", [
    dict(num_time_windows=4), dict(num_time_windows=3), dict(window_boundaries=[1.0, 0.6125, 0.3, 0.0]),
    dict(num_time_windows=2, prediction_type="velocity"),
])
def test_trainer_and_scheduler_resolve_the_same_boundaries(settings):
    from perflow.training.config_io import make_config
    from perflow.training.loop import boundaries_of

    from perflow.training.teachers import Teacher

    # equal windows (a shorter last window: test_training.py::test_last_window_fraction_places_the_windows...)
    cfg = make_config(None, {"perflow.last_window_fraction": 1.0, **{f"perflow.{k}": v for k, v in settings.items()}})
    if cfg.perflow.prediction_type == "auto":  # the default: what the trainer resolves it to for a diffusion teacher
        cfg.perflow.prediction_type = Teacher.default_parameterization
    ac = alphas_cumprod_from_config(SD).double()
    sched = PeRFlowScheduler(**SD, prediction_type=cfg.perflow.prediction_type,
                             num_time_windows=cfg.perflow.num_time_windows,
                             window_boundaries=settings.get("window_boundaries"))
    ours = resolve_boundaries(
        cfg.perflow.num_time_windows, cfg.perflow.window_boundaries, DiscreteVPSchedule(ac),
        cfg.perflow.num_solver_steps, cfg.perflow.prediction_type,
    )
    assert torch.equal(ours, boundaries_of(cfg, ac)) and torch.equal(ours, sched.boundaries)


# ---------------------------------------------------------------- a second schedule kind


class FlowMatchingPath(NoiseSchedule):
    """``z = (1 - t) x0 + t eps`` on continuous ``t`` (the teacher is told ``t T``): written here to
    show that a schedule kind plugs into the solver, the windows and the objective unchanged."""

    num_train_timesteps = T

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64

    def alpha_sigma(self, t, like):
        sigma = expand_like(t, like)
        return 1 - sigma, sigma

    def timestep(self, t):
        return t * T

    def epsilon_coefficients(self, t_s, t_e, prediction_type):
        raise ValueError("this flow-matching path supports the velocity parameterization only")

    def check_windows(self, boundaries, num_solver_steps=None):
        pass  # continuous time: any valid boundaries

    def to(self, device=None, dtype=None):
        return self


MU, S = 0.7, 0.3


def fm_gaussian_x0(z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Exact ``E[x0 | z_t]`` for ``x0 ~ N(mu, s^2 I)`` on the path: ``mu + (1-t) s^2 / v(t) (z - (1-t) mu)``,
    ``v(t) = (1-t)^2 s^2 + t^2`` (a ``sample``-prediction teacher)."""
    t = (timestep.to(torch.float64) / T).view(-1, *[1] * (z.dim() - 1))
    v = (1 - t) ** 2 * S**2 + t**2
    return (MU + (1 - t) * S**2 / v * (z.double() - (1 - t) * MU)).to(z.dtype)


def fm_gaussian_flow(z, t_a, t_b):
    """Exact probability flow of that data from ``t_a`` to ``t_b``: ``(1-t_b) mu + sqrt(v(t_b)/v(t_a)) (z - (1-t_a) mu)``."""
    v = lambda t: (1 - t) ** 2 * S**2 + t**2  # noqa: E731
    ta, tb = t_a.view(-1, 1), t_b.view(-1, 1)
    return (1 - tb) * MU + (v(tb) / v(ta)).sqrt() * (z - (1 - ta) * MU)


def test_solver_runs_a_flow_matching_kind_to_its_exact_flow():
    g = torch.Generator().manual_seed(0)
    t_s = torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=torch.float64)
    t_e = t_s - 0.5
    z_s = torch.randn(4, 6, generator=g, dtype=torch.float64)
    exact = fm_gaussian_flow(z_s, t_s, t_e)
    errors = {n: (solve_window(fm_gaussian_x0, z_s, t_s, t_e, n, FlowMatchingPath(), "sample") - exact).abs().max().item()
              for n in (16, 32, 64, 128)}
    for n in (16, 32, 64):  # DDIM is first order: doubling n halves the error
        assert 0.4 < errors[2 * n] / errors[n] < 0.6, errors


def test_objective_and_windows_run_a_flow_matching_kind():
    g = torch.Generator().manual_seed(1)
    x0, noise = (torch.randn(3, 2, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    path = FlowMatchingPath()
    b = resolve_boundaries(None, [1.0, 0.9995, 0.0], path)  # no teacher index to collide on
    ex = reflow_example(fm_gaussian_x0, x0, b, path, 2, "velocity", "sample", noise=noise, t=t)
    ts = ex.t_s.view(-1, 1, 1)
    torch.testing.assert_close(ex.z_s, (1 - ts) * x0 + ts * noise, rtol=0, atol=0)
    torch.testing.assert_close(ex.target, (ex.z_e - ex.z_s) / (ex.t_e - ex.t_s).view(-1, 1, 1), rtol=0, atol=0)
    torch.testing.assert_close(ex.timestep, (t * T).float())
    with pytest.raises(ValueError, match="velocity parameterization only"):
        window_of(t, b, path, "ddim_eps")
