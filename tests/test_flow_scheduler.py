"""PeRFlowScheduler for flow-matching students: the exact maths, the pipelines' contract, and the pipelines.

The exactness reference is written from the formulas: Gaussian data's closed-form teacher velocity
(``tests/flow_helpers.py``), the teacher's window solves composed window by window, and an ideal
piecewise-linear student derived from them (each window's solve is affine in its start point).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from flow_helpers import T, gaussian_velocity
from perflow import PeRFlowScheduler
from perflow.schedule import FlowMatchSchedule
from perflow.solver import solve_window
from perflow.windows import equal_boundaries, inference_times

FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
SHAPE = (2, 3, 4)


def ideal_student(boundaries: list[float], schedule: FlowMatchSchedule, n: int):
    """The velocity of the straight segment from ``z_s`` to ``Phi(z_s)`` through ``(z, t)``, per window.

    ``Phi(z) = A z + c`` elementwise (the Euler solve of an affine velocity is affine), so the segment's
    start is ``z_s = (z - c f) / (1 + (A - 1) f)``, ``f = (t - t_s) / (t_e - t_s)``."""

    def phi(z, t_s, t_e):
        return solve_window(gaussian_velocity, z, torch.full((z.shape[0],), t_s, dtype=torch.float64), t_e, n,
                            schedule, "flow_prediction")

    def velocity(z, timestep):
        t = float(timestep.reshape(-1)[0]) / T
        j = max(i for i in range(len(boundaries) - 1) if boundaries[i] >= t)  # the window starting at or above t
        j = min(j, len(boundaries) - 2)
        t_s, t_e = boundaries[j], boundaries[j + 1]
        c = phi(torch.zeros_like(z), t_s, t_e)
        a = phi(torch.ones_like(z), t_s, t_e) - c
        f = (t - t_s) / (t_e - t_s)
        z_s = (z - c * f) / (1 + (a - 1) * f)
        return (a * z_s + c - z_s) / (t_e - t_s)

    return velocity, phi


@pytest.mark.parametrize("shift,num_steps", [(1.0, 4), (3.0, 4), (3.0, 8), ("dynamic", 4), ("dynamic", 6)])
def test_ideal_student_reproduces_the_composed_teacher_solves(shift, num_steps):
    """N = K, and N > K (steps inside windows). The step times are chosen exact in float32 (multiples of
    1/8), since the student reads its time from the float32 timestep as a transformer does."""
    K, n = 4, 5
    schedule = FlowMatchSchedule(**FLUX).at_resolution(1024) if shift == "dynamic" else FlowMatchSchedule(shift=shift)
    b = equal_boundaries(K).tolist()
    student, phi = ideal_student(b, schedule, n)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = z.clone()
    for j in range(K):
        ref = phi(ref, b[j], b[j + 1])
    sched = PeRFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX).config, num_time_windows=K)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=1.0)  # as FluxPipeline calls it
    for t in sched.timesteps:
        z = sched.step(student(z, t), t, z).prev_sample
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-13)


def test_flow_timesteps_are_sigma_T_and_ignore_the_resolution():
    sched = PeRFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX).config)
    assert sched.config.schedule_kind == "flow_matching" and sched.config.prediction_type == "velocity"
    assert sched.alphas_cumprod is None and sched.order == 1
    for n, expected in [(4, [1000, 750, 500, 250]), (6, [1000, 875, 750, 625, 500, 250]), (2, [1000, 500])]:
        grids = []
        for seq_len in (16, 256, 1024, 4096):  # the pipelines' mu at each resolution
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
            grids.append(sched.timesteps.clone())
        sched.set_timesteps(n)
        for g in grids:
            assert g.dtype == torch.float32 and torch.equal(g, sched.timesteps)
        assert sched.timesteps.tolist() == expected
        assert torch.equal(sched.sigmas, torch.tensor(expected + [0]) / 1000.0)


def test_trainer_and_scheduler_agree_at_every_resolution():
    from perflow.training.config_io import make_config
    from perflow.training.loop import boundaries_of

    fm = FlowMatchSchedule(**FLUX)
    for settings in (dict(num_time_windows=4, last_window_fraction=1.0), dict(window_boundaries=[1.0, 0.9, 0.6, 0.0])):
        cfg = make_config(None, {"perflow.prediction_type": "velocity", **{f"perflow.{k}": v for k, v in settings.items()}})
        sched = PeRFlowScheduler(**FLUX, window_boundaries=settings.get("window_boundaries"),
                                 num_time_windows=cfg.perflow.num_time_windows)
        for seq_len in (16, 256, 4096):
            trained = boundaries_of(cfg, fm.at_resolution(seq_len))
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4), mu=calculate_shift(seq_len, 256, 4096, 0.5, 1.15))
            assert torch.equal(trained, sched.boundaries)
            assert torch.equal(sched._times, inference_times(4, trained))


def test_custom_sigmas_are_step_times_and_bad_ones_refused():
    sched = PeRFlowScheduler(shift=3.0)
    sched.set_timesteps(sigmas=[1.0, 0.9, 0.3])
    assert torch.allclose(sched.timesteps, torch.tensor([1000.0, 900.0, 300.0]))
    sched.set_timesteps(timesteps=[1000.0, 600.0])
    assert sched.timesteps.tolist() == [1000.0, 600.0]
    with pytest.raises(ValueError, match="strictly decrease"):
        sched.set_timesteps(sigmas=[0.5, 0.9])
    with pytest.raises(ValueError, match="needs num_inference_steps"):
        sched.set_timesteps()
    vp = PeRFlowScheduler(prediction_type="velocity")
    with pytest.raises(ValueError, match="do not pass sigmas"):
        vp.set_timesteps(sigmas=[1.0, 0.5])


def test_step_velocity_per_sample_foreign_and_pred_original():
    sched = PeRFlowScheduler(shift=3.0)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(1)
    z, out = (torch.randn(SHAPE, generator=g) for _ in range(2))
    prev, x0 = sched.step(out, sched.timesteps[1], z, return_dict=False)
    torch.testing.assert_close(prev, z + (0.5 - 0.75) * out, rtol=0, atol=1e-7)
    torch.testing.assert_close(x0, z - 0.75 * out, rtol=0, atol=1e-7)
    last = sched.step(out, sched.timesteps[-1], z)
    torch.testing.assert_close(last.prev_sample, last.pred_original_sample, rtol=0, atol=0)
    # per-sample timesteps: each sample steps as it would alone
    per = sched.step(out, torch.tensor([1000.0, 500.0]), z).prev_sample
    for i, t in enumerate((1000.0, 500.0)):
        assert torch.equal(per[i], sched.step(out[i:i + 1], torch.tensor(t), z[i:i + 1]).prev_sample[0])
    # a timestep the scheduler did not produce: taken literally, to the next scheduled one below
    foreign = sched.step(out, 600.0, z).prev_sample
    torch.testing.assert_close(foreign, z + (0.5 - 0.6) * out, rtol=0, atol=1e-7)


def test_fewer_steps_than_windows_warns(caplog):
    sched = PeRFlowScheduler(shift=3.0, num_time_windows=4)
    with caplog.at_level(logging.WARNING, logger="perflow.scheduler"):
        sched.set_timesteps(sigmas=[1.0, 0.5])
    assert any("below the number of time windows" in r.getMessage() for r in caplog.records)
    assert sched.timesteps.tolist() == [1000.0, 500.0]


def test_scale_noise_and_save_load_round_trip(tmp_path):
    sched = PeRFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler(**FLUX).config, num_time_windows=3)
    x, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    sched.set_timesteps(3)
    t = sched.timesteps[1:2]
    s = t.double().item() / T
    torch.testing.assert_close(sched.scale_noise(x, t, noise), (1 - s) * x + s * noise, rtol=0, atol=1e-7)
    sched.set_begin_index(1)
    assert sched.begin_index == 1
    sched.save_pretrained(tmp_path)
    loaded = PeRFlowScheduler.from_pretrained(tmp_path)
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    assert loaded.config.use_dynamic_shifting is True and loaded.config.base_image_seq_len == 256
    loaded.set_timesteps(3)
    assert torch.equal(loaded.timesteps, sched.timesteps) and torch.equal(loaded.boundaries, sched.boundaries)
    with pytest.raises(ValueError, match="does not apply to a flow-matching teacher"):
        PeRFlowScheduler(shift=3.0, prediction_type="ddim_eps")
    vp = PeRFlowScheduler()
    assert vp.config.schedule_kind == "discrete_vp" and vp.config.prediction_type == "diff_eps" and vp.config.shift is None


def test_step_has_no_host_sync_compiles_fullgraph():
    """``torch.compile(fullgraph=True)`` fails on any ``.item()``/``bool(tensor)`` (a host sync on a GPU) in ``step``."""
    sched = PeRFlowScheduler(shift=3.0)
    sched.set_timesteps(6)
    z, out = torch.randn(2, *SHAPE[1:]), torch.randn(2, *SHAPE[1:])

    def one_step(model_output, timestep, sample):
        return sched.step(model_output, timestep, sample, return_dict=False)

    compiled = torch.compile(one_step, fullgraph=True, backend="eager")
    for timestep in (sched.timesteps[2], torch.tensor([1000.0, 640.0])):
        got, ref = compiled(out, timestep, z), one_step(out, timestep, z)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# ---------------------------------------------------------------- in the diffusers pipelines


def _pipes(family):
    from diffusers import (
        FluxImg2ImgPipeline,
        FluxPipeline,
        StableDiffusion3Img2ImgPipeline,
        StableDiffusion3Pipeline,
    )

    from perflow.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

    if family == "sd3":
        pipe = tiny_sd3_pipeline()
        return pipe, StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline
    return tiny_flux_pipeline(), FluxPipeline, FluxImg2ImgPipeline


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_untrained_student_samples_as_the_teacher_in_the_pipelines(family):
    """A velocity student equal to its teacher, sampled by PeRFlow at N = K = 4 in the unchanged pipeline, is the
    teacher's Euler sampler on the window boundaries (FlowMatchEulerDiscreteScheduler, shift 1, the same sigmas):
    text-to-image and image-to-image (``scale_noise``, ``set_begin_index``)."""
    pipe, t2i_cls, i2i_cls = _pipes(family)
    kw = dict(prompt="a photo of a cat", height=16, width=16, max_sequence_length=16, output_type="pt",
              sigmas=[1.0, 0.75, 0.5, 0.25], num_inference_steps=4)
    if family == "flux":
        kw["guidance_scale"] = 3.5
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    results = {}
    for name, scheduler in (("teacher", FlowMatchEulerDiscreteScheduler(shift=1.0)),
                            ("perflow", PeRFlowScheduler.from_config(pipe.scheduler.config))):
        comps = {**pipe.components, "scheduler": scheduler}
        t2i, i2i = t2i_cls(**comps), i2i_cls(**comps)
        a = t2i(**kw, generator=torch.Generator().manual_seed(0)).images
        b = i2i(**kw, image=image, strength=0.5, generator=torch.Generator().manual_seed(0)).images
        if name == "perflow":
            assert scheduler.begin_index == 2 and isinstance(scheduler, PeRFlowScheduler)
        results[name] = (a, b)
    for got, ref in zip(results["perflow"], results["teacher"]):
        assert torch.isfinite(got).all() and got.shape == (1, 3, 16, 16)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(results["perflow"][0], results["perflow"][1])
