"""PeRFlowScheduler: exact paths, the released scheduler's semantics, diffusers' contract.

References here are written independently of perflow (plain Python/numpy loops over
METHOD.md section 4 and the released scheduler's documented behaviour); the noise
schedule comes from diffusers' DDIMScheduler.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from perflow import PeRFlowScheduler, PeRFlowSchedulerOutput

T = 1000
TYPES = ["diff_eps", "ddim_eps", "velocity"]
ARBITRARY = [1.0, 0.7, 0.35, 0.1, 0.0]
SHAPE = (2, 4, 5, 5)


def sd_abar() -> np.ndarray:
    """SD's alphas_cumprod (float32, as DDIMScheduler builds it), as float64 numbers."""
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return ddim.alphas_cumprod.double().numpy()


ABAR = sd_abar()


def coefficients(t_s: float, t_e: float, prediction_type: str, index=lambda t: max(0, round(t * T) - 1)):
    """(lam, eta) of METHOD.md section 3 for the window (t_s, t_e)."""
    a_s, a_e = ABAR[index(t_s)], ABAR[index(t_e)]
    if prediction_type == "diff_eps":
        g = math.sqrt(a_s / a_e)
        return 1 / g, -math.sqrt(1 - g * g) / g
    if prediction_type == "ddim_eps":
        return math.sqrt(a_e / a_s), math.sqrt(1 - a_e) - math.sqrt(a_e * (1 - a_s) / a_s)
    return 1.0, 0.0


# ---------------------------------------------------------------- exact piecewise-linear paths


class Path:
    """A piecewise linear path through points[j] at bounds[j] and a "model" returning its exact target."""

    def __init__(self, bounds: list[float], points: torch.Tensor, prediction_type: str):
        self.bounds, self.points, self.prediction_type = bounds, points, prediction_type

    def window(self, t: float) -> int:
        for j in range(len(self.bounds) - 1):
            if self.bounds[j + 1] < t:
                return j
        return len(self.bounds) - 2

    def at(self, t: float) -> torch.Tensor:
        j = self.window(t)
        t_s, t_e = self.bounds[j], self.bounds[j + 1]
        return self.points[j] + (self.points[j + 1] - self.points[j]) * ((t - t_s) / (t_e - t_s))

    def target(self, t: float) -> torch.Tensor:
        j = self.window(t)
        t_s, t_e = self.bounds[j], self.bounds[j + 1]
        z_s, z_e = self.points[j], self.points[j + 1]
        if self.prediction_type == "velocity":
            return (z_e - z_s) / (t_e - t_s)
        lam, eta = coefficients(t_s, t_e, self.prediction_type)
        return (z_e - lam * z_s) / eta

    def __call__(self, z: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.target(float(timestep) / T).to(z.dtype)


def random_path(bounds, prediction_type, dtype=torch.float64, straight=False, seed=0) -> Path:
    g = torch.Generator().manual_seed(seed)
    if straight:  # z(t) = a + t d: collinear, with the same velocity in every window
        a, d = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
        points = torch.stack([a + b * d for b in bounds])
    else:
        points = torch.randn(len(bounds), *SHAPE, generator=g, dtype=torch.float64)
    return Path(bounds, points.to(dtype), prediction_type)


def follow(path: Path, scheduler: PeRFlowScheduler, num_steps: int, atol: float) -> None:
    """Sample from the path's start; after every step the sample must sit on the path at the next time."""
    scheduler.set_timesteps(num_steps)
    ts = scheduler.timesteps.tolist()
    z = path.points[0]
    for i, t in enumerate(scheduler.timesteps):
        z = scheduler.step(path(z, t), t, z).prev_sample
        t_next = ts[i + 1] / T if i + 1 < len(ts) else 0.0
        torch.testing.assert_close(z, path.at(t_next), rtol=0, atol=atol)
    torch.testing.assert_close(z, path.points[-1], rtol=0, atol=atol)


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("bounds", [[1.0, 0.75, 0.5, 0.25, 0.0], ARBITRARY])
@pytest.mark.parametrize("num_steps", [4, 8, 7])
def test_lands_on_window_ends_of_exact_path(prediction_type, bounds, num_steps):
    path = random_path(bounds, prediction_type)
    sched = PeRFlowScheduler(prediction_type=prediction_type, window_boundaries=bounds)
    follow(path, sched, num_steps, atol=1e-9)  # float64 sample: float64 arithmetic throughout


@pytest.mark.parametrize("prediction_type", TYPES)
def test_exact_path_in_float32(prediction_type):
    # float32: each of the ~10 operations per step rounds with relative error 6e-8; the epsilon
    # conversion multiplies |z| ~ 3 by lam <~ 4 and divides by eta, so errors stay below 1e-5
    path = random_path(ARBITRARY, prediction_type, dtype=torch.float32, seed=1)
    sched = PeRFlowScheduler(prediction_type=prediction_type, window_boundaries=ARBITRARY)
    follow(path, sched, 7, atol=1e-5)


@pytest.mark.parametrize("prediction_type", TYPES)
@pytest.mark.parametrize("num_steps", [1, 2, 3])
def test_fewer_steps_than_windows_on_a_straight_flow(prediction_type, num_steps, caplog):
    path = random_path(ARBITRARY, prediction_type, straight=True)
    sched = PeRFlowScheduler(prediction_type=prediction_type, window_boundaries=ARBITRARY)
    with caplog.at_level(logging.WARNING, logger="perflow.scheduler"):
        follow(path, sched, num_steps, atol=1e-9)
    assert len(sched.timesteps) == num_steps
    assert any("below the number of time windows" in r.getMessage() for r in caplog.records)


def test_pred_original_sample_is_extrapolation_to_zero():
    """x0_hat = z + (0 - t_c) v with v the step's velocity; in the last window that is the path's end."""
    path = random_path(ARBITRARY, "diff_eps", seed=2)
    sched = PeRFlowScheduler(prediction_type="diff_eps", window_boundaries=ARBITRARY)
    sched.set_timesteps(8)
    ts = sched.timesteps.tolist()
    for i, t in enumerate(sched.timesteps):
        t_c, t_next = ts[i] / T, (ts[i + 1] / T if i + 1 < len(ts) else 0.0)
        z = path.at(t_c)
        out = sched.step(path(z, t), t, z)
        v = (path.at(t_next) - z) / (t_next - t_c)  # the path's slope in this window
        torch.testing.assert_close(out.pred_original_sample, z - t_c * v, rtol=0, atol=1e-9)
        if t_c <= ARBITRARY[-2]:
            torch.testing.assert_close(out.pred_original_sample, path.points[-1], rtol=0, atol=1e-9)


# ---------------------------------------------------------------- the released scheduler, as a plain loop


def released_timesteps(num_steps: int, K: int) -> np.ndarray:
    starts = [i / K for i in range(K, 0, -1)]
    ends = starts[1:] + [0.0]
    if num_steps < K:  # the released code raised N to K here; METHOD.md: steps at window starts floor(iK/N)
        times = np.array([starts[(i * K) // num_steps] for i in range(num_steps)])
    else:
        times = np.concatenate(
            [
                np.linspace(starts[i], ends[i], num_steps // K + (1 if i < num_steps % K else 0), endpoint=False)
                for i in range(K)
            ]
        )
    return (times * T).astype(np.int64)


def released_sample(model, z: np.ndarray, K: int, num_steps: int, prediction_type: str) -> np.ndarray:
    """The released sampling loop (float64): 1e-4 look-up tolerance, truncated abar indices."""
    starts = [i / K for i in range(K, 0, -1)]
    ends = starts[1:] + [0.0]
    timesteps = released_timesteps(num_steps, K)
    for n, timestep in enumerate(timesteps):
        t_c = timestep / T
        idx = 0
        while t_c - 1e-4 <= ends[idx]:
            idx += 1
        t_s, t_e = starts[idx], ends[idx]
        out = model(z, t_c)
        if prediction_type == "velocity":
            v = out
        else:
            lam, eta = coefficients(
                t_s, t_e, prediction_type, index=lambda t: max(int(t * T - 1), 0)
            )
            denom = lam * (t_c - t_s) + (t_e - t_c)
            z_e_hat = lam * (t_e - t_s) / denom * z + eta * (t_e - t_c) / denom * out
            v = (z_e_hat - z) / (t_e - t_c)
        prev = timesteps[n + 1] if n + 1 < len(timesteps) else 0
        z = z + (prev - timestep) / T * v
    return z


def linear_model(seed: int = 0):
    """A fixed "model": out = A z + c t, the same linear map for numpy (float64) and torch."""
    rng = np.random.default_rng(seed)
    A = 0.8 * np.eye(4) + 0.1 * rng.standard_normal((4, 4))
    c = 0.1 * rng.standard_normal((4, 1, 1))

    def np_model(z, t_c):
        return np.einsum("oc,bchw->bohw", A, z) + c * t_c

    def torch_model(z, timestep):
        At, ct = torch.from_numpy(A).to(z.dtype), torch.from_numpy(c).to(z.dtype)
        return torch.einsum("oc,bchw->bohw", At, z) + ct * (timestep.to(z.dtype) / T)

    return np_model, torch_model


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("prediction_type", TYPES)
def test_same_latents_as_released_scheduler(K, prediction_type):
    np_model, torch_model = linear_model()
    z0 = np.random.default_rng(1).standard_normal(SHAPE)
    sched = PeRFlowScheduler(prediction_type=prediction_type, num_time_windows=K)
    for num_steps in range(1, 9):
        ref = released_sample(np_model, z0, K, num_steps, prediction_type)
        sched.set_timesteps(num_steps)
        assert sched.timesteps.tolist() == released_timesteps(num_steps, K).tolist()
        # float64: the same arithmetic as the reference up to operation order (~1e-15 seen);
        # float32: unit roundoff 6e-8 over ~30 rounded operations along 8 steps (~6e-7 seen)
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
            z = torch.from_numpy(z0).to(dtype)
            for t in sched.timesteps:
                z = sched.step(torch_model(z, t), t, z, return_dict=False)[0]
            assert z.dtype == dtype
            scale = max(1.0, float(np.abs(ref).max()))
            err = float(np.abs(z.double().numpy() - ref).max()) / scale
            assert err <= tol, (num_steps, dtype, err)


# ---------------------------------------------------------------- timesteps and configuration


def test_timestep_grids_of_method_md():
    sched = PeRFlowScheduler(num_time_windows=4)
    sched.set_timesteps(4)
    assert sched.timesteps.tolist() == [1000, 750, 500, 250]
    assert sched.timesteps.dtype == torch.int64
    sched.set_timesteps(6)
    assert sched.timesteps.tolist() == [1000, 875, 750, 625, 500, 250]
    sched.set_timesteps(2)  # fewer steps than windows: window starts 0 and 2
    assert sched.timesteps.tolist() == [1000, 500]


def test_timesteps_on_requested_device():
    sched = PeRFlowScheduler()
    sched.set_timesteps(4, device="cpu")
    assert sched.timesteps.device == torch.device("cpu")
    sched.set_timesteps(4, device="meta")
    assert sched.timesteps.device.type == "meta"


def test_schedule_validation():
    sched = PeRFlowScheduler()
    with pytest.raises(ValueError, match="too large"):
        sched.set_timesteps(2000)  # t*T truncated to integers repeats
    for bad in (0, -1, 2.5, "4"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(bad)
    sched.set_timesteps(np.int64(4))  # numpy integers are integers
    with pytest.raises(ValueError, match="set_timesteps"):
        PeRFlowScheduler().step(torch.zeros(1, 4, 2, 2), 1000, torch.zeros(1, 4, 2, 2))


RELEASED_CONFIG = {
    "_class_name": "PeRFlowScheduler",
    "_diffusers_version": "0.26.3",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_time_windows": 4,
    "num_train_timesteps": 1000,
    "prediction_type": "ddim_eps",
    "set_alpha_to_one": False,
    "t_clean": 0,
    "t_noise": 1,
    "trained_betas": None,
}


def test_loads_released_scheduler_config_unchanged(tmp_path, caplog):
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "scheduler_config.json").write_text(json.dumps(RELEASED_CONFIG))
    with caplog.at_level(logging.WARNING):
        sched = PeRFlowScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert not [r for r in caplog.records if "not expected" in r.getMessage()]
    assert sched.config.prediction_type == "ddim_eps" and sched.num_windows == 4
    assert sched.boundaries.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert torch.equal(sched.alphas_cumprod, torch.from_numpy(ABAR).float())
    sched.set_timesteps(8)
    assert sched.timesteps.tolist() == [1000, 875, 750, 625, 500, 375, 250, 125]


def test_save_pretrained_round_trip(tmp_path):
    sched = PeRFlowScheduler(prediction_type="velocity", window_boundaries=np.array(ARBITRARY), beta_schedule="linear")
    assert sched.config.num_time_windows == 4 and sched.config.window_boundaries == ARBITRARY
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "PeRFlowScheduler" and saved["window_boundaries"] == ARBITRARY
    loaded = PeRFlowScheduler.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sched.config)
    assert torch.equal(loaded.boundaries, sched.boundaries)
    assert torch.equal(loaded.alphas_cumprod, sched.alphas_cumprod)


def test_from_ddim_config_and_overrides():
    ddim = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    sched = PeRFlowScheduler.from_config(ddim.config, prediction_type="diff_eps")
    assert sched.config.prediction_type == "diff_eps"
    assert torch.equal(sched.alphas_cumprod, ddim.alphas_cumprod)
    with pytest.raises(ValueError, match="prediction_type='diff_eps'"):
        PeRFlowScheduler.from_config(ddim.config)  # "epsilon" is the teacher's type
    three = PeRFlowScheduler.from_config(RELEASED_CONFIG, window_boundaries=[1.0, 0.6, 0.3, 0.0])
    assert three.num_windows == 3 and three.config.num_time_windows == 3


def test_from_config_refuses_a_window_count_its_saved_boundaries_would_override():
    """A saved scheduler with explicit boundaries: ``from_config(cfg, num_time_windows=5)`` kept its 3 windows."""
    three = PeRFlowScheduler(prediction_type="ddim_eps", window_boundaries=[1.0, 0.6, 0.3, 0.0])
    with pytest.raises(ValueError, match=r"num_time_windows=5 disagrees with the config's window_boundaries \(3 windows\)"):
        PeRFlowScheduler.from_config(three.config, num_time_windows=5)
    assert PeRFlowScheduler.from_config(three.config, num_time_windows=5, window_boundaries=None).num_windows == 5
    assert PeRFlowScheduler.from_config(three.config, num_time_windows=3).num_windows == 3  # agrees: accepted
    assert PeRFlowScheduler.from_config(three.config).num_windows == 3


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_as_ddim(schedule):
    kw = dict(beta_start=0.0001, beta_end=0.02, beta_schedule=schedule)
    assert torch.equal(PeRFlowScheduler(**kw).alphas_cumprod, DDIMScheduler(**kw).alphas_cumprod)
    betas = np.linspace(1e-4, 2e-2, 1000)
    got = PeRFlowScheduler(trained_betas=betas.tolist()).alphas_cumprod
    torch.testing.assert_close(got.double(), torch.from_numpy(np.cumprod(1 - betas)), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(prediction_type="eps"), "prediction_type"),
        (dict(prediction_type="v_prediction"), "prediction_type='diff_eps'"),
        (dict(num_time_windows=0), "num_time_windows"),
        (dict(window_boundaries=[1.0, 0.5, 0.5, 0.0]), "strictly decrease"),
        (dict(window_boundaries=[0.0, 0.5, 1.0]), "start at 1"),
        (dict(window_boundaries=[1.0, 0.5, 0.0], t_noise=0.9), "t_noise"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(trained_betas=[0.01] * 10), "trained_betas"),
    ],
)
def test_bad_configuration_raises(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        PeRFlowScheduler(**kwargs)


def test_diffusers_contract():
    sched = PeRFlowScheduler()
    assert sched.order == 1 and sched.init_noise_sigma == 1.0 and len(sched) == 1000
    assert "DDIMScheduler" in PeRFlowScheduler._compatibles
    z = torch.randn(SHAPE)
    assert sched.scale_model_input(z, 1000) is z
    sched.set_timesteps(4)
    out = sched.step(torch.randn(SHAPE), sched.timesteps[0], z)
    assert isinstance(out, PeRFlowSchedulerOutput) and out.prev_sample.shape == SHAPE
    tup = sched.step(torch.randn(SHAPE), sched.timesteps[0], z, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 2


# ---------------------------------------------------------------- step robustness


def test_foreign_timestep_steps_to_next_scheduled_time():
    path = random_path([1.0, 0.75, 0.5, 0.25, 0.0], "diff_eps", seed=4)
    sched = PeRFlowScheduler(prediction_type="diff_eps")
    sched.set_timesteps(4)  # [1000, 750, 500, 250]
    z = path.at(0.64)
    expected = path.at(0.5)  # largest scheduled time strictly below 0.64 is 500
    for timestep in (640, 640.0, torch.tensor(640), torch.tensor([640]), torch.tensor(640.0, dtype=torch.float16)):
        got = sched.step(path(z, torch.tensor(640)), timestep, z).prev_sample
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-9)
    # below the last scheduled time the step goes to t = 0, the path's end
    z = path.at(0.1)
    torch.testing.assert_close(sched.step(path(z, torch.tensor(100)), 100, z).prev_sample, path.points[-1], rtol=0, atol=1e-9)
    # at t = 0 the flow has arrived: nothing moves, nothing is NaN
    out = sched.step(torch.randn(SHAPE, dtype=torch.float64), 0, path.points[-1])
    assert torch.equal(out.prev_sample, path.points[-1]) and torch.equal(out.pred_original_sample, path.points[-1])


@pytest.mark.parametrize("prediction_type", TYPES)
def test_per_sample_timesteps(prediction_type):
    sched = PeRFlowScheduler(prediction_type=prediction_type)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 4, 5, 5, generator=g)
    out = torch.randn(4, 4, 5, 5, generator=g)
    ts = torch.tensor([1000, 640, 250, 875])  # mixed windows, one foreign
    batched = sched.step(out, ts, z)
    for b in range(4):
        single = sched.step(out[b : b + 1], ts[b], z[b : b + 1])
        torch.testing.assert_close(batched.prev_sample[b : b + 1], single.prev_sample, rtol=0, atol=0)
        torch.testing.assert_close(
            batched.pred_original_sample[b : b + 1], single.pred_original_sample, rtol=0, atol=0
        )


def test_half_precision_sample_computed_in_float32():
    sched = PeRFlowScheduler(prediction_type="ddim_eps")
    sched.set_timesteps(4)
    z = torch.randn(SHAPE).half()
    out = torch.randn(SHAPE).half()
    got = sched.step(out, sched.timesteps[1], z)
    ref = sched.step(out.float(), sched.timesteps[1], z.float())
    assert got.prev_sample.dtype == torch.float16 and got.pred_original_sample.dtype == torch.float16
    assert torch.equal(got.prev_sample, ref.prev_sample.half())


def test_add_noise_index_rule_and_timestep_zero():
    sched = PeRFlowScheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([0, 1, 1000, 500])
    a = torch.from_numpy(ABAR[[0, 0, 999, 499]]).view(4, 1, 1, 1)  # index clamp(t - 1, 0, T - 1): no wrap at 0
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(sched.add_noise(x0, noise, timesteps), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sched.add_noise(x0, noise, 0), ABAR[0] ** 0.5 * x0 + (1 - ABAR[0]) ** 0.5 * noise)


def test_step_compiles_fullgraph_without_sync():
    """torch.compile(fullgraph=True) fails on any graph break: .item(), Python scalars from tensors, data-dependent
    control flow. The dynamo capture is the check; the eager backend keeps it fast on a CPU."""
    sched = PeRFlowScheduler(prediction_type="diff_eps")
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    z, out = torch.randn(2, *SHAPE, generator=g)

    def one_step(model_output, timestep, sample):
        return sched.step(model_output, timestep, sample, return_dict=False)

    compiled = torch.compile(one_step, fullgraph=True, backend="eager")
    for timestep in (sched.timesteps[2], torch.tensor([1000, 640])):
        got = compiled(out, timestep, z)
        ref = one_step(out, timestep, z)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_loop_has_no_host_sync():
    """Under sync debug mode "error", any device-to-host synchronisation inside step raises."""
    z0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = []
    for device in ("cuda", "cpu"):
        sched = PeRFlowScheduler(prediction_type="diff_eps")
        sched.set_timesteps(6, device=device)
        assert sched.timesteps.device.type == device
        z = z0.to(device)
        per_sample = torch.full((SHAPE[0],), 640, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                z = sched.step(0.5 * z, t, z).prev_sample
            z = sched.step(0.5 * z, per_sample, z).prev_sample
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        results.append(z.cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_lookup_tolerance_of_released_scheduler():
    """A time within 0.1/T above a boundary starts that window (released: `while t_c - 1e-4 <= end`).

    With K = 11, t_c = 0.091 lies 9.1e-5 above the boundary 1/11, so it uses window (1/11, 0): from a point on
    that window's line, with that window's exact target, the step stays on the line."""
    K, t_c = 11, 0.091
    t_s, t_e = 1 / K, 0.0
    g = torch.Generator().manual_seed(0)
    z_s, z_e = torch.randn(2, *SHAPE, generator=g, dtype=torch.float64)
    lam, eta = coefficients(t_s, t_e, "diff_eps")
    line = lambda t: z_s + (z_e - z_s) * ((t - t_s) / (t_e - t_s))  # noqa: E731
    sched = PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=K)
    sched.set_timesteps(K)
    assert 91 not in sched.timesteps.tolist() and 90 in sched.timesteps.tolist()
    out = sched.step((z_e - lam * z_s) / eta, 91, line(t_c))
    torch.testing.assert_close(out.prev_sample, line(0.090), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.pred_original_sample, z_e, rtol=0, atol=1e-9)


def test_from_config_keeps_an_in_memory_teachers_defaults():
    """A scheduler built in code lists its defaulted arguments in ``_use_default_values``; diffusers'
    ``from_config`` would drop them for this class's SD defaults. The teacher's own values are kept: its betas
    (abar equal), clip_sample, its flow-matching kind and shift (also a flow-mode UniPC's ``flow_shift``)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    teacher = DDPMScheduler()  # linear 1e-4..0.02, clip_sample True: all defaults
    with pytest.raises(ValueError, match="teacher's .* prediction_type='diff_eps'"):
        PeRFlowScheduler.from_config(teacher.config)  # its epsilon is not a student's parameterization
    s = PeRFlowScheduler.from_config(teacher.config, prediction_type="ddim_eps")
    assert torch.equal(s.alphas_cumprod, teacher.alphas_cumprod) and s.config.clip_sample is True
    flow = PeRFlowScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, prediction_type="velocity")
    assert flow.config.schedule_kind == "flow_matching" and flow.config.shift == 1.0
    unipc = UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction").config
    with pytest.raises(ValueError, match="prediction_type='velocity'"):
        PeRFlowScheduler.from_config(unipc)
    s = PeRFlowScheduler.from_config(unipc, prediction_type="velocity")
    assert s.config.schedule_kind == "flow_matching" and s.config.shift == 3.0
    own = PeRFlowScheduler(prediction_type="ddim_eps", num_time_windows=3)
    assert dict(PeRFlowScheduler.from_config(own.config).config) == dict(own.config)
