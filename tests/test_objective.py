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


def test_one_window_per_batch_keeps_positions_and_the_uniform_marginal():
    """one_window_per_batch: every batch lies in one window; each time keeps its relative position in its own
    window (a window start stays a start); on windows of unequal length the batch's window is drawn with the
    probability of its length (4000 batches: each window's frequency within 5 binomial sigma), so with the
    positions kept the marginal of t stays U[0, 1)."""
    from perflow.time_sampling import make_time_sampler, one_window_per_batch, uniform_times
    from perflow.windows import window_bounds, window_index

    b = torch.tensor([1.0, 0.7, 0.35, 0.1, 0.0], dtype=torch.float64)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = uniform_times(32, g1, torch.device("cpu"))
    moved = one_window_per_batch(uniform_times, b)(32, g2, torch.device("cpu"))
    j = window_index(moved, b)
    assert torch.all(j == window_index(t[:1], b))
    (s, e), (s2, e2) = window_bounds(t, b), window_bounds(moved, b)
    torch.testing.assert_close((moved - e2) / (s2 - e2), (t - e) / (s - e), rtol=0, atol=1e-12)
    starts = make_time_sampler("uniform", b, window_start_prob=1.0, batch_windows="single")
    for _ in range(5):
        x = starts(16, g2, torch.device("cpu"))
        assert torch.isin(x, b[:-1]).all() and (x == x[0]).all()
    single = make_time_sampler("uniform", b, batch_windows="single")
    windows = torch.stack([window_index(single(4, g2, torch.device("cpu"))[:1], b)[0] for _ in range(4000)])
    freq = torch.bincount(windows, minlength=4).double() / 4000
    lengths = b[:-1] - b[1:]
    assert torch.all((freq - lengths).abs() < 5 * (lengths * (1 - lengths) / 4000).sqrt())
    with pytest.raises(ValueError, match="batch_windows"):
        make_time_sampler("uniform", b, batch_windows="grouped")


# ---------------------------------------------------------------------------- per-window weights


def _ddim_factor(abar_a: torch.Tensor, abar_b: torch.Tensor, s: float) -> torch.Tensor:
    """One DDIM step of the exact N(0, s^2 I) teacher is the linear map ``z -> f z`` with
    ``f = (sqrt(abar_b abar_a) s^2 + sqrt((1 - abar_b)(1 - abar_a))) / (abar_a s^2 + 1 - abar_a)``
    (``x0_hat = sqrt(abar_a) s^2 z / v``, ``eps_hat = sqrt(1 - abar_a) z / v``, ``v = abar_a s^2 + 1 - abar_a``)."""
    return ((abar_b * abar_a).sqrt() * s**2 + ((1 - abar_b) * (1 - abar_a)).sqrt()) / (abar_a * s**2 + 1 - abar_a)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("s", [0.5, 2.0])
def test_window_error_gains_of_a_linear_teacher_are_the_later_windows_squared_gain(n, s):
    """For zero-mean Gaussian data every window solve is linear, ``z_{k+1} = A_k z_k`` (``A_k`` the product
    of its ``n`` DDIM factors), so an error at the end of window k reaches the end multiplied by
    ``prod_{j>k} A_j``: ``gain_k = prod_{j>k} A_j^2`` exactly, whatever the error."""
    from gaussian_helpers import gaussian_denoiser
    from perflow.objective import window_error_gains

    ac = alphas_cumprod_from_config(SD).to(torch.float64)
    schedule = DiscreteVPSchedule(ac)
    b = torch.tensor([1.0, 0.8, 0.45, 0.2, 0.0], dtype=torch.float64)
    noise = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gains = window_error_gains(gaussian_denoiser(0.0, s, ac), noise, b, schedule, n)
    A = []
    for k in range(4):
        times = [schedule.solver_time(b[k], b[k + 1], j, n) for j in range(n + 1)]
        abar = [schedule.abar(t.reshape(1)).double()[0] for t in times]
        A.append(torch.stack([_ddim_factor(abar[j], abar[j + 1], s) for j in range(n)]).prod())
    expected = torch.stack([torch.stack(A[k + 1:]).prod().square() if k < 3 else torch.tensor(1.0, dtype=torch.float64)
                            for k in range(4)])
    if n == 1:  # one DDIM step per window is the exact chain: no error to carry, every gain 1
        expected = torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(gains, expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_window_error_gains_of_a_gaussian_flow_matching_teacher(shift):
    """The same identity on a flow-matching teacher (``flow_prediction``, Euler steps on its shifted grid):
    for Gaussian data ``N(mu, s^2)`` each Euler step is affine, ``z_b = z_a + (b - a) v(z_a, a)`` with linear
    part ``A = 1 + (b - a) (a - (1 - a) s^2) / v(a)``, ``v(a) = (1 - a)^2 s^2 + a^2`` (tests/flow_helpers.py),
    so an error carries through the later windows multiplied by their factors: ``gain_k = prod_{j>k} A_j^2``."""
    from flow_helpers import S, gaussian_velocity, variance, window_solve_sigmas

    from perflow.objective import window_error_gains
    from perflow.schedule import FlowMatchSchedule

    n = 4
    b = [1.0, 0.8, 0.45, 0.2, 0.0]
    noise = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gains = window_error_gains(gaussian_velocity, noise, torch.tensor(b, dtype=torch.float64),
                               FlowMatchSchedule(shift=shift), n, "flow_prediction")
    A = []
    for k in range(4):
        sig = window_solve_sigmas(b[k], b[k + 1], n, shift)
        A.append(torch.tensor([1 + (q - p) * (p - (1 - p) * S**2) / variance(p) for p, q in zip(sig[:-1], sig[1:])],
                              dtype=torch.float64).prod())
    expected = torch.stack([torch.stack(A[k + 1:]).prod().square() for k in range(3)] + [torch.tensor(1.0, dtype=torch.float64)])
    torch.testing.assert_close(gains, expected, rtol=1e-9, atol=0)
    assert not torch.allclose(gains, torch.ones(4, dtype=torch.float64))  # the windows do differ


def test_window_weights_from_gains_have_mean_one_and_keep_every_window():
    from perflow.objective import window_weights_from_gains

    w = window_weights_from_gains(torch.tensor([8.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([8.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 3.0)
    w = window_weights_from_gains(torch.tensor([1000.0, 1e-3, 1.0], dtype=torch.float64), max_ratio=100.0)
    torch.testing.assert_close(w * (1020.0 / 3.0), torch.tensor([1000.0, 10.0, 10.0], dtype=torch.float64))
    assert float(w.mean()) == pytest.approx(1.0)
    # gains of several batches: their per-window median first (here [2, 3, 1] -> mean 2)
    per_batch = torch.tensor([[2.0, 30.0, 1.0], [1.0, 3.0, 1.0], [2.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(window_weights_from_gains(per_batch), torch.tensor([1.0, 1.5, 0.5], dtype=torch.float64))


def test_batch_loss_sample_weight_multiplies_each_example():
    from perflow.objective import batch_loss

    ac, b, t, window = random_windows("ddim_eps", 0, n=8)
    z = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    ex = ReflowExample(z_t=z, timestep=(t * 1000).float(), target=torch.zeros_like(z), t=t, t_s=window.t_s, t_e=window.t_e,
                       z_s=z, z_e=z, window=window)
    w = torch.arange(1.0, 9.0)
    got = batch_loss(lambda zz, ts: zz, ex, weighting="window_end", sample_weight=w)
    expected = (z.square().flatten(1).mean(1) * window_end_weight(t, window) * w).mean()
    torch.testing.assert_close(got, expected)


# ----------------------------------------------------------------------------- teacher steps per window


def _sd_abar():
    return alphas_cumprod_from_config({"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})


def test_solve_window_with_steps_per_sample_equals_each_rows_own_solve():
    """``n`` per sample: grouped on ``denoiser.rows`` (a conditional UNet) and, for a plain callable, on the whole
    batch; both equal solving each row alone with its own ``n``."""
    from perflow.denoisers import unet_denoiser
    from perflow.solver import solve_window
    from perflow.tiny import tiny_class_teacher

    teacher = tiny_class_teacher()
    cond = teacher.condition({"label": torch.tensor([0, 3, 5, 7, 9])}) if hasattr(teacher, "condition") else None
    den = unet_denoiser(teacher.unet, cond)
    assert callable(den.rows)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, teacher.unet.config.in_channels, 8, 8, generator=g)
    t_s = torch.tensor([1.0, 0.75, 1.0, 0.5, 0.25], dtype=torch.float64)
    t_e = t_s - 0.25
    steps = torch.tensor([3, 1, 3, 2, 1])
    abar = teacher.alphas_cumprod
    grouped = solve_window(den, z, t_s, t_e, steps, abar)
    plain = solve_window(lambda x, i: den(x, i), z, t_s, t_e, steps, abar)  # no rows: whole batch per n
    for b in range(5):
        one = unet_denoiser(teacher.unet, cond.select(torch.tensor([b])))
        alone = solve_window(one, z[b:b + 1], t_s[b:b + 1], t_e[b:b + 1], int(steps[b]), abar)
        torch.testing.assert_close(grouped[b:b + 1], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, grouped, rtol=1e-5, atol=1e-6)


def test_reflow_example_uses_each_windows_own_steps():
    from gaussian_helpers import gaussian_denoiser
    from perflow.solver import solve_window

    abar = _sd_abar()
    den = gaussian_denoiser(0.3, 0.5, abar)
    b = equal_boundaries(4)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3, 0.1, 1.0, 0.55], dtype=torch.float64)
    ex = reflow_example(den, x0, b, abar, [5, 3, 2, 1], "ddim_eps", noise=noise, t=t)
    for i, n in enumerate([5, 3, 2, 1, 5, 3]):
        want = solve_window(den, ex.z_s[i:i + 1], ex.t_s[i:i + 1], ex.t_e[i:i + 1], n, abar)
        torch.testing.assert_close(ex.z_e[i:i + 1], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per window \\(4 integers >= 1\\)"):
        reflow_example(den, x0, b, abar, [5, 3], "ddim_eps", noise=noise, t=t)


def test_window_solve_errors_are_first_order_and_find_the_curved_window():
    """DDIM is first order: a window's measured error ``E_k(n) = |Phi_n - Phi_2n|^2`` falls by a ratio that
    rises towards 4 as n doubles (2.9, 3.3, 3.6 from n = 4 to 32 on this Gaussian). For narrow data
    (s = 0.2) the last window, where the clean sample's scale takes over from the noise's, costs the most."""
    from gaussian_helpers import gaussian_denoiser
    from perflow.objective import window_solve_errors

    abar = _sd_abar()
    den = gaussian_denoiser(0.0, 0.2, abar)
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = equal_boundaries(4)
    e = [window_solve_errors(den, noise, b, abar, n) for n in (4, 8, 16, 32, 64)]
    ratios = torch.stack([e[i] / e[i + 1] for i in range(4)])  # (4 doublings, K)
    assert (ratios[1:] > ratios[:-1]).all() and (ratios < 4.05).all() and (ratios[-1] > 3.4).all(), ratios
    assert int(e[1].argmax()) == 3


def test_allocate_solver_steps_minimises_the_modelled_error():
    from perflow.objective import allocate_solver_steps

    assert allocate_solver_steps(torch.ones(4), 8) == [8, 8, 8, 8]
    assert allocate_solver_steps(torch.zeros(4), 8) == [8, 8, 8, 8]
    # E_k = c_k^3: n_k proportional to c_k when no bound binds; the total is kept
    assert allocate_solver_steps(torch.tensor([3.0, 2.0, 2.0, 1.0]) ** 3, 8) == [12, 8, 8, 4]
    got = allocate_solver_steps(torch.tensor([1.0, 0.0, 0.0, 0.0]), 8)  # floor ceil(n/2)
    assert got == [20, 4, 4, 4]
    assert allocate_solver_steps(torch.tensor([1.0, 0.0, 0.0, 0.0]), 8, max_steps=[10, 250, 250, 250]) == [10, 8, 7, 7]
    assert sum(allocate_solver_steps(torch.tensor([5.0, 1.0, 0.3]), 7)) == 21
    # the median over batches: one outlier batch does not move it
    rows = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1], [1000.0, 1, 1, 1]])
    assert allocate_solver_steps(rows, 8) == [8, 8, 8, 8]
    # no integer split of the same total has a lower modelled error sum_k E_k / n_k^2
    e = torch.tensor([2.0, 0.7, 0.4, 0.05])
    best = allocate_solver_steps(e, 6)
    cost = lambda n: float(sum(ek / nk**2 for ek, nk in zip(e.tolist(), n)))  # noqa: E731
    import itertools
    splits = [s for s in itertools.product(range(3, 25), repeat=4) if sum(s) == 24]
    assert cost(best) <= min(cost(s) for s in splits) * 1.02


def test_steps_per_sample_on_a_shifted_flow_matching_grid():
    """Per-sample n on a flow-matching teacher's shifted grid: each row is its own n-step Euler solve."""
    from perflow.schedule import FlowMatchSchedule
    from perflow.solver import solve_window

    schedule = FlowMatchSchedule.from_config({"shift": 3.0, "use_dynamic_shifting": False})

    def velocity(z, timestep):  # any smooth field of (z, sigma)
        sigma = (timestep.double() / 1000).view(-1, 1)
        return (torch.sin(3 * sigma) * z + sigma).to(z.dtype)

    z = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    t_s = torch.tensor([1.0, 1.0, 0.6, 0.6], dtype=torch.float64)
    t_e = torch.tensor([0.6, 0.6, 0.0, 0.0], dtype=torch.float64)
    steps = torch.tensor([5, 2, 1, 3])
    got = solve_window(velocity, z, t_s, t_e, steps, schedule, "flow_prediction")
    for b in range(4):
        alone = solve_window(velocity, z[b:b + 1], t_s[b:b + 1], t_e[b:b + 1], int(steps[b]), schedule, "flow_prediction")
        torch.testing.assert_close(got[b:b + 1], alone, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- window starts from the sampler


def test_sampler_window_starts_steps_each_row_through_its_own_windows():
    """Row b is stepped through windows 0..k_b - 1 in order, only the rows that need window j reach its step."""
    from perflow.objective import sampler_window_starts

    calls = []

    def window_step(z, j, rows):
        calls.append((j, rows.tolist()))
        return z * 10 + (j + 1)  # the digits record the windows crossed, in order

    noise = torch.zeros(5, 2)
    out = sampler_window_starts(window_step, noise, torch.tensor([0, 3, 1, 2, 0]))
    assert out[:, 0].tolist() == [0, 123, 1, 12, 0]
    assert calls == [(0, [1, 2, 3]), (1, [1, 3]), (2, [1])]
    assert torch.equal(sampler_window_starts(window_step, noise, torch.zeros(5, dtype=torch.long)), noise)


def test_reflow_example_starts_replace_the_marginal_where_masked():
    """``starts`` take the place of the forward marginal on the masked rows, and the teacher solves from them."""
    from gaussian_helpers import gaussian_denoiser
    from perflow.solver import solve_window

    abar = _sd_abar()
    den = gaussian_denoiser(0.3, 0.5, abar)
    b = equal_boundaries(4)
    g = torch.Generator().manual_seed(3)
    x0, noise, starts = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
    mask = torch.tensor([True, False, True, False])
    plain = reflow_example(den, x0, b, abar, 4, "ddim_eps", noise=noise, t=t)
    ex = reflow_example(den, x0, b, abar, 4, "ddim_eps", noise=noise, t=t, starts=starts, starts_mask=mask)
    assert torch.equal(ex.z_s[mask], starts[mask]) and torch.equal(ex.z_s[~mask], plain.z_s[~mask])
    torch.testing.assert_close(ex.z_e, solve_window(den, ex.z_s, ex.t_s, ex.t_e, 4, abar), rtol=0, atol=0)
    every = reflow_example(den, x0, b, abar, 4, "ddim_eps", noise=noise, t=t, starts=starts)  # no mask: every row
    assert torch.equal(every.z_s, starts)
    # start_states: the same starts from a function of the drawn noise and times, called once they are drawn
    given = {}

    def start_states(n, tt):
        given.update(noise=n, t=tt)
        return starts, mask
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    drawn = reflow_example(den, x0, b, abar, 4, "ddim_eps", generator=g1, start_states=start_states)
    fixed = reflow_example(den, x0, b, abar, 4, "ddim_eps", generator=g2, starts=starts, starts_mask=mask)
    assert torch.equal(drawn.z_s, fixed.z_s) and torch.equal(drawn.z_e, fixed.z_e) and torch.equal(given["t"], fixed.t)
    with pytest.raises(ValueError, match="starts or start_states"):
        reflow_example(den, x0, b, abar, 4, "ddim_eps", noise=noise, t=t, starts=starts, start_states=start_states)
