"""Metrics on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from perflow.evaluation import metrics


def _spd(dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_frechet_identical_sets_is_zero():
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance_features(x, x.clone()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_gaussians_closed_form():
    # commuting covariances: tr((S1 S2)^{1/2}) = sum_i sqrt(d1_i d2_i), an independent formula
    d1 = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    d2 = torch.tensor([0.3, 2.0, 4.0, 1.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * (d1 * d2).sqrt()).sum()
    got = metrics.frechet_distance(mu1, torch.diag(d1), mu2, torch.diag(d2))
    assert got == pytest.approx(expected.item(), rel=1e-12)


def test_frechet_general_gaussians_match_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = _spd(6, 1), _spd(6, 2)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.arange(6, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    expected = float(((mu1 - mu2) ** 2).sum()) + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_shifted_samples_is_squared_shift():
    # y = x + d: identical covariance, means differ by d, so FD = ||d||^2 exactly
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = torch.linspace(-1, 1, 8, dtype=torch.float64)
    assert metrics.frechet_distance_features(x, x + d) == pytest.approx(float(d.pow(2).sum()), rel=1e-9)


def test_frechet_is_stable_for_singular_covariances():
    # rank-deficient (N < D): no NaN, no negative value, and zero for identical sets
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    assert metrics.frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-6)
    v = metrics.frechet_distance_features(x, x + 1.0)
    assert v == pytest.approx(64.0, rel=1e-6)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.frechet_distance_features(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="mismatched"):
        metrics.frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))


def test_sliced_wasserstein_identical_is_zero():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    assert metrics.sliced_wasserstein(x, x[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_shifted_cloud():
    # translating a cloud by d shifts every 1-D projection by theta.d, so
    # SW_2^2 = mean_theta (theta.d)^2 exactly (given the directions), and E_theta (theta.d)^2 = |d|^2 / D
    x = torch.randn(400, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta = metrics.random_directions(4000, 3, seed=7)
    exact = (theta @ d).pow(2).mean().sqrt().item()
    assert metrics.sliced_wasserstein(x, x + d, directions=theta) == pytest.approx(exact, rel=1e-10)
    # sample mean of (theta.d)^2 over P directions: relative std <= sqrt(Var/P)/mean; with P = 4000 well under 3 %
    assert metrics.sliced_wasserstein(x, x + d, num_projections=4000) == pytest.approx(
        math.sqrt(d.pow(2).sum().item() / 3), rel=0.03
    )
    # SW_1 of a shift: mean |theta.d|
    assert metrics.sliced_wasserstein(x, x + d, p=1, directions=theta) == pytest.approx((theta @ d).abs().mean().item(), rel=1e-10)


def test_sliced_wasserstein_unequal_sizes_uses_quantiles():
    # duplicating every point leaves the empirical distribution unchanged
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = torch.tensor([0.7, 0.1], dtype=torch.float64)
    theta = metrics.random_directions(64, 2, seed=0)
    same = metrics.sliced_wasserstein(x, x + d, directions=theta)
    dup = metrics.sliced_wasserstein(x, torch.cat([x, x]) + d, directions=theta)
    assert dup == pytest.approx(same, rel=1e-10)


def test_straightness_of_a_straight_path_is_zero():
    t = torch.linspace(1, 0, 11, dtype=torch.float64)
    a, b = torch.tensor([2.0, -1.0]), torch.tensor([-1.0, 3.0])
    traj = (b + (a - b) * t.view(-1, 1)).unsqueeze(1)  # (S+1, 1, 2), constant speed
    assert metrics.straightness(traj, t) == pytest.approx(0.0, abs=1e-20)


def test_straightness_of_a_quarter_circle():
    # N equal chords of the unit quarter circle traversed in unit time: |v_j| = 2 N sin(pi / 4N),
    # mean v = vbar = (-1, 1), so sum_j dt ||v_j - vbar||^2 = |v_j|^2 - |vbar|^2 and S = (|v_j|^2 - 2) / 2
    n = 50
    theta = torch.linspace(0, math.pi / 2, n + 1, dtype=torch.float64)
    traj = torch.stack([theta.cos(), theta.sin()], dim=-1).unsqueeze(1)
    expected = ((2 * n * math.sin(math.pi / (4 * n))) ** 2 - 2) / 2
    assert metrics.straightness(traj, torch.linspace(0, 1, n + 1)) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx((math.pi**2 / 4 - 2) / 2, rel=1e-3)  # the continuous curve's value


def test_straightness_within_windows_of_a_piecewise_straight_path():
    # straight at constant speed inside each of two windows, turning at t = 0.5
    t = torch.linspace(1, 0, 9, dtype=torch.float64)
    pts = [torch.tensor([1 - s, 0.0]) if s >= 0.5 else torch.tensor([0.5, 0.5 - s]) for s in t.tolist()]
    traj = torch.stack(pts).to(torch.float64).unsqueeze(1)
    assert metrics.straightness(traj, t, boundaries=torch.tensor([1.0, 0.5, 0.0])) == pytest.approx(0.0, abs=1e-20)
    # as one window: velocities (-1, 0) and (0, 1) against vbar = (-1/2, 1/2): S = (1/2) / (1/2) = 1
    assert metrics.straightness(traj, t) == pytest.approx(1.0, rel=1e-12)


def test_paired_mse_and_accuracy():
    a = torch.zeros(4, 1, 2, 2)
    assert metrics.paired_mse(a, a + 0.5) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="equal shapes"):
        metrics.paired_mse(a, torch.zeros(3, 1, 2, 2))
    x, y = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    e = metrics.paired_errors(x, y)
    assert e.shape == (5,) and torch.allclose(e, ((x - y) ** 2).mean((1, 2, 3)), rtol=0, atol=1e-15)
    assert metrics.paired_mse(x, y) == pytest.approx(((x - y) ** 2).mean().item(), rel=1e-14)
    # the paired difference: mean of d = (1, 2, 3) is 2, its standard error std(d) / sqrt(3) = 1 / sqrt(3)
    d, se = metrics.paired_difference(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3))
    assert d == pytest.approx(2.0, rel=1e-15) and se == pytest.approx(3 ** -0.5, rel=1e-14)
    with pytest.raises(ValueError, match=r"two \(B,\) tensors"):
        metrics.paired_difference(torch.zeros(3), torch.zeros(4))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert metrics.label_accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_metrics_public_names_are_its_all():
    """Every public function of the module is listed in ``__all__`` (no dead aliases such as the
    removed ``gaussian_w2_squared``, which duplicated :func:`frechet_distance`)."""
    import inspect

    public = {n for n, f in vars(metrics).items() if inspect.isfunction(f) and f.__module__ == metrics.__name__
              and not n.startswith("_")}
    assert public == set(metrics.__all__)
