"""Correctness defects of issue 8: each test failed before its fix.

1. windows off the 1/T grid: the sampler must reproduce the composed window maps exactly;
2. zero-terminal-SNR teachers: one ``alphas_cumprod`` for trainer and scheduler, and a clear
   refusal of what divides by ``abar = 0``;
3. degenerate windows (both ends at one teacher index) are refused;
4. ``step`` accepts diffusers' keywords (``generator=`` from ``DDPMPipeline``);
5. ``import perflow`` is enough for ``DiffusionPipeline.from_pretrained`` on a saved pipeline;
6. CFG-fixed guidance scales are moved to the UNet's device once, not at every teacher call.

References are written here from METHOD.md (window maps, ``lam``/``eta``, the index rule) and
from the zero-terminal-SNR paper's formula, independently of perflow.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import perflow
from perflow import PeRFlowScheduler
from perflow.schedule import alphas_cumprod_from_config
from perflow.windows import check_nonzero_abar, check_window_spacing

T = 1000
SHAPE = (2, 3, 4, 4)
ABAR = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.double()


def index(t: float) -> int:
    """METHOD.md: i(t) = clamp(round(t T) - 1, 0, T - 1), Python's round (halves to even, as torch)."""
    return min(max(round(t * T) - 1, 0), T - 1)


def coefficients(t_s: float, t_e: float, prediction_type: str, abar=ABAR) -> tuple[float, float]:
    a_s, a_e = float(abar[index(t_s)]), float(abar[index(t_e)])
    if prediction_type == "diff_eps":
        g = math.sqrt(a_s / a_e)
        return 1 / g, -math.sqrt(1 - g * g) / g
    if prediction_type == "ddim_eps":
        return math.sqrt(a_e / a_s), math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
    return 1.0, 0.0


# ---------------------------------------------------------------- 1. windows off the 1/T grid


def equal(K: int) -> list[float]:
    return [k / K for k in range(K, -1, -1)]


OFF_GRID = [(equal(3), N) for N in (3, 6, 7)] + [(equal(6), N) for N in (6, 12, 13)]
OFF_GRID += [(equal(7), N) for N in (7, 10, 14)] + [([1.0, 0.6125, 0.3, 0.0], N) for N in (3, 4, 7)]


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("bounds,num_steps", OFF_GRID)
def test_ideal_student_reproduces_composed_window_maps_off_grid(prediction_type, bounds, num_steps):
    """Window k maps its start z_s to z_e = M_k(z_s): ``lam_k z_s + c_k`` (epsilon-type) or
    ``z_s + (t_e - t_s) c_k`` (velocity). Every segment of that family has the same target,
    ``c_k / eta_k`` or ``c_k``, so the ideal student outputs it in window k whatever z and t are;
    sampling from z0 must land on M_K(...M_1(z0)). Before the fix the window-end steps overshot
    each off-grid boundary by up to 1/T with the wrong window's velocity: errors 2e-3 (velocity)
    to 5e-2 (epsilon-type). Float64 round-off: ~20 operations a step, each 1.1e-16 relative to
    values up to (1 + |lam|) <= 7 times the scale, over at most 14 steps: below 1e-12 of the scale."""
    K = len(bounds) - 1
    g = torch.Generator().manual_seed(K * 100 + num_steps)
    c = torch.randn(K, *SHAPE, generator=g, dtype=torch.float64)
    z0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    coef = [coefficients(bounds[j], bounds[j + 1], prediction_type) for j in range(K)]

    def student(timestep: torch.Tensor) -> torch.Tensor:
        t = float(timestep) / T
        j = next((j for j in range(K) if bounds[j + 1] < t), K - 1)  # the window holding t
        return c[j] if prediction_type == "velocity" else c[j] / coef[j][1]

    expected = z0
    for j in range(K):
        lam = coef[j][0]
        expected = expected + (bounds[j + 1] - bounds[j]) * c[j] if prediction_type == "velocity" else lam * expected + c[j]

    sched = PeRFlowScheduler(prediction_type=prediction_type, window_boundaries=bounds)
    sched.set_timesteps(num_steps)
    z = z0
    for t in sched.timesteps:
        z = sched.step(student(t), t, z).prev_sample
    scale = max(1.0, float(expected.abs().max()))
    assert float((z - expected).abs().max()) <= 1e-12 * scale


def test_off_grid_timesteps_stay_released_integers():
    """The pipeline still sees floor(t T) (int64); each is in the same window as its exact time."""
    sched = PeRFlowScheduler(num_time_windows=3)
    sched.set_timesteps(3)
    assert sched.timesteps.dtype == torch.int64 and sched.timesteps.tolist() == [1000, 666, 333]
    sched = PeRFlowScheduler(window_boundaries=[1.0, 0.6125, 0.3, 0.0])
    sched.set_timesteps(6)
    assert sched.timesteps.tolist() == [1000, 806, 612, 456, 300, 150]


@pytest.mark.parametrize("prediction_type", ["diff_eps", "velocity"])
def test_off_grid_foreign_and_per_sample_timesteps(prediction_type):
    """Per-sample timesteps mixing produced (1000, 666) and foreign (500, 700) ones step each sample
    as a batch of one would; a foreign timestep steps literally from timestep/T to the next
    scheduled timestep/T."""
    sched = PeRFlowScheduler(prediction_type=prediction_type, num_time_windows=3)
    sched.set_timesteps(3)
    g = torch.Generator().manual_seed(0)
    z, out = torch.randn(2, 4, *SHAPE[1:], generator=g, dtype=torch.float64)
    ts = torch.tensor([1000, 666, 500, 700])
    batched = sched.step(out, ts, z)
    for b in range(4):
        single = sched.step(out[b : b + 1], ts[b], z[b : b + 1])
        torch.testing.assert_close(batched.prev_sample[b : b + 1], single.prev_sample, rtol=0, atol=0)
    # velocity: a foreign step is z + (t_next - t_c) out with t_c = 0.5, t_next = 333/T
    if prediction_type == "velocity":
        torch.testing.assert_close(batched.prev_sample[2], z[2] + (0.333 - 0.5) * out[2], rtol=0, atol=1e-15)


# ---------------------------------------------------------------- 2. zero terminal SNR

ZSNR = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", rescale_betas_zero_snr=True)


def zero_snr_abar() -> torch.Tensor:
    """Lin et al. 2024 (arXiv 2305.08891) algorithm 1, on SD's betas: shift sqrt(abar) so its last
    value is 0 and scale it so its first is unchanged."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, T, dtype=np.float32) ** 2
    s = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    abar = s**2
    betas = 1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return torch.from_numpy(np.cumprod(1 - betas))


def test_zero_snr_schedule_is_the_rescaled_one_everywhere():
    from perflow.training.teachers import teacher_schedule

    ref = zero_snr_abar()
    ac = alphas_cumprod_from_config(ZSNR)
    assert ac[-1].item() == 0.0  # exactly zero, as DDIMScheduler has it
    torch.testing.assert_close(ac.double(), ref, rtol=1e-5, atol=1e-7)  # float32 betas
    teacher_sched, kind, schedule = teacher_schedule({**ZSNR, "prediction_type": "v_prediction"})
    teacher_ac = teacher_sched.alphas_cumprod
    assert kind == "v_prediction" and schedule["rescale_betas_zero_snr"] is True
    sched = PeRFlowScheduler(**schedule, prediction_type="velocity")  # as the trainer's export builds it
    assert sched.config.rescale_betas_zero_snr is True
    assert torch.equal(sched.alphas_cumprod, ac) and torch.equal(teacher_ac, ac.double())
    assert abs(sched.alphas_cumprod[749].item() - ref[749].item()) < 1e-6  # 0.0332, not SD's 0.0566
    ddim = DDIMScheduler(**ZSNR, prediction_type="v_prediction")
    assert torch.equal(PeRFlowScheduler.from_config(ddim.config, prediction_type="velocity").alphas_cumprod, ac)


def test_zero_snr_refuses_what_divides_by_zero():
    from perflow.training.teachers import teacher_schedule

    with pytest.raises(ValueError, match="v_prediction teacher"):
        teacher_schedule({**ZSNR, "prediction_type": "epsilon"})
    for kind in ("diff_eps", "ddim_eps"):
        with pytest.raises(ValueError, match="prediction_type='velocity'"):
            PeRFlowScheduler(**ZSNR, prediction_type=kind)
    ac = alphas_cumprod_from_config(ZSNR)
    check_nonzero_abar(torch.tensor([1.0, 0.5, 0.0]), ac, "velocity")  # no division by abar
    check_nonzero_abar(torch.tensor([1.0, 0.5, 0.0]), ac, "v_prediction")
    check_nonzero_abar(torch.tensor([1.0, 0.5, 0.0]), ABAR, "diff_eps")  # SD: abar > 0


def test_zero_snr_trainer_boundaries_refuse_epsilon_types():
    from perflow.training.config_io import make_config
    from perflow.training.loop import boundaries_of

    ac = alphas_cumprod_from_config(ZSNR).double()
    cfg = make_config(None, {"perflow.prediction_type": "diff_eps"})
    with pytest.raises(ValueError, match="velocity"):
        boundaries_of(cfg, ac)
    cfg = make_config(None, {"perflow.prediction_type": "velocity"})
    assert boundaries_of(cfg, ac).tolist() == boundaries_of(cfg).tolist()


def test_zero_snr_velocity_student_trains_and_samples_finite():
    """A v_prediction teacher and a velocity student never divide by abar(1) = 0."""
    from perflow.objective import reflow_example

    ac = alphas_cumprod_from_config(ZSNR).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    ex = reflow_example(
        lambda z, i: 0.5 * z, x0, torch.tensor(equal(4), dtype=torch.float64), ac, 4, "velocity",
        teacher_prediction_type="v_prediction", t=torch.tensor([0.99, 0.8]),
    )
    assert torch.isfinite(ex.target).all() and ex.t_s.tolist() == [1.0, 1.0]
    sched = PeRFlowScheduler(**ZSNR, prediction_type="velocity")
    sched.set_timesteps(4)
    z = x0
    for t in sched.timesteps:
        z = sched.step(0.5 * z, t, z).prev_sample
    assert torch.isfinite(z).all()


# ---------------------------------------------------------------- 3. degenerate windows


@pytest.mark.parametrize("bounds,index_", [([1.0, 0.9995, 0.0], 999), ([1.0, 0.5, 0.001, 0.0], 0)])
def test_windows_at_one_teacher_index_are_refused(bounds, index_):
    """i(0.9995) = round(999.5) - 1 = 999 (half to even) = i(1); i(0.001) = 0 = i(0): eta = 0."""
    assert index(bounds[-2]) == index(bounds[-1]) or index(bounds[0]) == index(bounds[1])
    with pytest.raises(ValueError, match=f"same teacher timestep index {index_}.*1/T"):
        check_window_spacing(torch.tensor(bounds, dtype=torch.float64), T)
    with pytest.raises(ValueError, match="same teacher timestep index"):
        PeRFlowScheduler(window_boundaries=bounds)
    from perflow.training.config_io import make_config
    from perflow.training.loop import boundaries_of

    cfg = make_config(None, {"perflow.window_boundaries": bounds})
    with pytest.raises(ValueError, match="same teacher timestep index"):
        boundaries_of(cfg, ABAR)


def test_windows_narrower_than_the_solver_warn():
    with pytest.warns(UserWarning, match=r"spans 4 teacher timestep\(s\).*n=8"):
        check_window_spacing(torch.tensor([1.0, 0.996, 0.0], dtype=torch.float64), T, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_window_spacing(torch.tensor(equal(4), dtype=torch.float64), T, 8)
        check_window_spacing(torch.tensor([1.0, 0.996, 0.0], dtype=torch.float64), T)  # n unknown


# ---------------------------------------------------------------- 4. diffusers' step keywords


def tiny_ddpm_pipeline(prediction_type: str = "velocity"):
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    pipe = DDPMPipeline(unet=unet, scheduler=PeRFlowScheduler(prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_ddpm_pipeline_runs_with_generator_keyword(one_thread):
    """DDPMPipeline calls step(..., generator=generator); the result equals a hand-written loop."""
    pipe = tiny_ddpm_pipeline()
    got = pipe(batch_size=1, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    z = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sched = PeRFlowScheduler(prediction_type="velocity")
    sched.set_timesteps(4)
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(pipe.unet(z, t).sample, t, z).prev_sample
    torch.testing.assert_close(got, (z / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-6)
    out = sched.step(z, sched.timesteps[0], z, eta=0.0, use_clipped_model_output=False, variance_noise=None)
    assert torch.isfinite(out.prev_sample).all()


# ---------------------------------------------------------------- 5. from_pretrained after `import perflow`


def test_import_perflow_is_enough_for_from_pretrained(tmp_path, one_thread):
    pipe = tiny_ddpm_pipeline()
    pipe.scheduler = PeRFlowScheduler(prediction_type="velocity", window_boundaries=[1.0, 0.6, 0.3, 0.0])
    pipe.save_pretrained(tmp_path)
    root = str(Path(perflow.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = textwrap.dedent(
        f"""
        import sys
        {{pre}}
        from diffusers import DiffusionPipeline
        try:
            pipe = DiffusionPipeline.from_pretrained({str(tmp_path)!r})
        except ValueError as err:
            print("ERROR", err)
            sys.exit(0)
        print("LOADED", type(pipe.scheduler).__module__, type(pipe.scheduler).__name__,
              pipe.scheduler.config.window_boundaries)
        """
    )

    def run(pre: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", script.replace("{pre}", pre)], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "LOADED perflow.scheduler PeRFlowScheduler [1.0, 0.6, 0.3, 0.0]" in run("import perflow")
    # the documented rule: diffusers resolves "perflow.scheduler" from sys.modules only
    assert "has not been imported" in run("")


def test_import_perflow_stays_cheap():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, perflow; print('torch' in sys.modules, 'diffusers' in sys.modules)"],
        env={**os.environ, "PYTHONPATH": str(Path(perflow.__file__).resolve().parent.parent)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.split() == ["False", "False"], proc.stderr


# ---------------------------------------------------------------- 6. guidance scale moved once


class MetaUNet(torch.nn.Module):
    """A UNet stand-in on the meta device (shapes only), so a copy to it is visible as an op."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), device="meta"))

    def forward(self, z, t, encoder_hidden_states, return_dict=False):
        return (z + self.w,)


def test_cfg_fixed_guidance_scale_is_not_copied_per_call():
    from torch.utils._python_dispatch import TorchDispatchMode

    from perflow.denoisers import Condition, guided_teacher_denoiser

    class CrossDeviceCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ins = [a for a in args if isinstance(a, torch.Tensor)]
            if isinstance(out, torch.Tensor) and any(a.device != out.device for a in ins):
                self.count += 1
            return out

    batch = 3
    cond, null = Condition(torch.randn(batch, 2, 4)), Condition(torch.randn(batch, 2, 4))
    dropped = torch.tensor([False, True, False])
    den = guided_teacher_denoiser(MetaUNet(), cond, null, dropped, "fixed", 7.5)
    z = torch.zeros(batch, 4, 2, 2, device="meta")
    i = torch.zeros(batch, dtype=torch.long, device="meta")
    with CrossDeviceCopies() as mode:
        for _ in range(3):
            den(z, i)
    assert mode.count == 0
