"""The loss beside the objective: window_end_weight, reflow_loss and batch_loss.

``perflow.objective``'s weight and loss must give the trainer's numbers bit for bit
(its former copies, kept in tests/former_trainer_loss.py), and the window-end
weight must be what its name says: the squared derivative of the predicted window end.
"""

from __future__ import annotations

import pytest
import torch

from perflow.objective import ReflowExample, batch_loss, reflow_example, reflow_loss, window_end_weight
from perflow.parameterization import window_end_from_output
from perflow.schedule import DiscreteVPSchedule, alphas_cumprod_from_config
import former_trainer_loss as loop  # the trainer's former copies
from perflow.windows import equal_boundaries, window_of

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def random_windows(prediction_type: str, seed: int, table_dtype=torch.float64, n: int = 64):
    ac = alphas_cumprod_from_config(SD).to(table_dtype)
    g = torch.Generator().manual_seed(seed)
    b = torch.cat([torch.ones(1), torch.rand(3, generator=g).sort(descending=True).values * 0.98 + 0.01, torch.zeros(1)])
    b = b.to(torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    t[:4] = b[:4]  # window starts, where the weight is largest
    return ac, b, t, window_of(t, b, DiscreteVPSchedule(ac), prediction_type)


@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_end_weight_is_the_trainers_bit_for_bit(prediction_type, seed, table_dtype):
    ac, b, t, w = random_windows(prediction_type, seed, table_dtype)
    ex = ReflowExample(None, None, None, t, w.t_s, w.t_e, None, None)
    ours, trainers = window_end_weight(t, w), loop.window_end_weight(ex, ac, prediction_type)
    assert ours.dtype == trainers.dtype == torch.float32
    assert torch.equal(ours, trainers)


@pytest.mark.parametrize("kind", ["mse", "huber"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_reflow_loss_is_the_trainers_bit_for_bit(kind, dtype, weighted):
    g = torch.Generator().manual_seed(3)
    pred, target = (torch.randn(8, 2, 5, 5, generator=g).to(dtype) for _ in range(2))
    weight = torch.rand(8, generator=g) if weighted else None
    ours, trainers = reflow_loss(pred, target, kind, 0.001, weight), loop.reflow_loss(pred, target, kind, 0.001, weight)
    assert ours.dtype == trainers.dtype and torch.equal(ours, trainers)


def test_window_end_weight_is_the_squared_window_end_derivative():
    """z_e_hat is affine in the output: |z_e_hat(pred) - z_e_hat(target)|^2 = w |pred - target|^2 per sample."""
    _, _, t, w = random_windows("diff_eps", 5, n=6)
    g = torch.Generator().manual_seed(6)
    z, pred, target = (torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    err = window_end_from_output(pred, z, t, w) - window_end_from_output(target, z, t, w)
    per_sample = err.square().flatten(1).mean(1)
    torch.testing.assert_close(window_end_weight(t, w).double() * (pred - target).square().flatten(1).mean(1),
                               per_sample, rtol=1e-6, atol=0)


@pytest.mark.parametrize("weighting", ["none", "window_end"])
def test_batch_loss_composes_the_student_the_weight_and_the_loss(weighting):
    ac = alphas_cumprod_from_config(SD).double()
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    ex = reflow_example(lambda z, i: 0.1 * z, x0, equal_boundaries(4), DiscreteVPSchedule(ac), 2, "ddim_eps",
                        generator=g)
    student = lambda z, ts: 0.5 * z + 1e-3 * ts.view(-1, 1, 1, 1)  # noqa: E731
    weight = window_end_weight(ex.t, ex.window) if weighting == "window_end" else None
    expected = reflow_loss(student(ex.z_t, ex.timestep), ex.target, "huber", 0.01, weight)
    assert torch.equal(batch_loss(student, ex, "huber", 0.01, weighting), expected)


def test_loss_names_are_checked():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        reflow_loss(x, x, "l1", 0.0, None)
    ex = ReflowExample(x, torch.zeros(2), x, torch.zeros(2), torch.zeros(2), torch.zeros(2), x, x)
    with pytest.raises(ValueError, match="loss weighting"):
        batch_loss(lambda z, ts: z, ex, weighting="snr")
    with pytest.raises(ValueError, match="needs example.window"):
        batch_loss(lambda z, ts: z, ex, weighting="window_end")


def test_window_start_prob_moves_that_fraction_of_times_to_their_window_starts():
    """with_window_starts: p = 0 is the sampler itself; p = 1 gives only window starts, each the start of
    the window the sampled time fell in; p = 0.5 moves about half (binomial, 4096 draws: within 5 sigma)."""
    from perflow.time_sampling import make_time_sampler, uniform_times, with_window_starts

    b = torch.tensor([1.0, 0.7, 0.35, 0.1, 0.0], dtype=torch.float64)
    assert with_window_starts(uniform_times, b, 0.0) is uniform_times
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    t = uniform_times(4096, g1, torch.device("cpu"))
    s = make_time_sampler("uniform", b, window_start_prob=1.0)(4096, g2, torch.device("cpu"))
    starts = b[(t <= 0.7).long() + (t <= 0.35).long() + (t <= 0.1).long()]  # window j of t: b[j]
    assert torch.equal(s, starts)
    half = make_time_sampler("uniform", b, window_start_prob=0.5)(4096, torch.Generator().manual_seed(1), torch.device("cpu"))
    moved = torch.isin(half, b).double().mean().item()
    assert abs(moved - 0.5) < 5 * (0.25 / 4096) ** 0.5
    with pytest.raises(ValueError, match="window_start_prob"):
        with_window_starts(uniform_times, b, 1.5)
