"""Sample-quality and trajectory metrics, as plain tensor functions.

- :func:`frechet_distance`: ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})`` between two
  Gaussians (FID's formula), with the matrix square root taken through symmetric
  eigen-decompositions in float64 (stable for singular covariances);
  :func:`frechet_distance_features` fits the Gaussians to two feature sets.
- :func:`sliced_wasserstein`: ``SW_p`` between two point clouds (exact 1-D Wasserstein
  per random direction, by sorting / quantiles).
- :func:`paired_mse`: mean squared distance between paired samples (same initial noise); :func:`paired_errors`
  per sample, :func:`paired_difference` two samplers' difference with its standard error.
- :func:`straightness`: how far a trajectory's velocity strays from its average velocity.
"""

from __future__ import annotations


import torch


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``features`` ``(N, D)``, in float64."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(
            f"need a (N, D) feature matrix with N >= 2 samples, got shape {tuple(features.shape)}"
        )
    f = features.to(torch.float64)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, S1)`` and ``N(mu2, S2)``:
    ``||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.

    ``tr((S1 S2)^{1/2}) = tr((A S2 A)^{1/2})`` with ``A = S1^{1/2}``: ``A S2 A`` is symmetric
    PSD, so both roots are eigen-decompositions (no complex round-off as with ``sqrtm(S1 S2)``).
    """
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(
            f"mismatched Gaussian statistics: means {tuple(mu1.shape)}, {tuple(mu2.shape)}; "
            f"covariances {tuple(s1.shape)}, {tuple(s2.shape)}"
        )
    a = _sqrt_psd(s1)
    eig = torch.linalg.eigvalsh(a @ s2 @ a)
    tr_covmean = eig.clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return max(value.item(), 0.0)


def frechet_distance_features(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N1, D)``, ``(N2, D)``."""
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def random_directions(num_projections: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``(P, D)`` unit vectors, uniform on the sphere, from a seeded generator (float64)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(num_projections, dim, generator=g, dtype=torch.float64)
    return d / d.norm(dim=1, keepdim=True)


def _quantiles(sorted_proj: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Empirical quantile functions of sorted ``(P, N)`` projections at ``levels`` ``(L,)``."""
    n = sorted_proj.shape[1]
    idx = (levels * n).floor().long().clamp(max=n - 1)
    return sorted_proj[:, idx]


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    num_projections: int = 256,
    p: int = 2,
    seed: int = 0,
    directions: torch.Tensor | None = None,
) -> float:
    """Sliced Wasserstein distance ``SW_p(x, y) = (mean_theta W_p^p(theta.x, theta.y))^{1/p}``.

    ``x`` ``(N, D)``, ``y`` ``(M, D)``. Each 1-D ``W_p`` is exact: with ``N = M`` it pairs sorted
    projections; otherwise it integrates the two empirical quantile functions over the
    merged grid of their jump points. ``directions`` ``(P, D)`` overrides the random ones.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need point clouds (N, D) and (M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if directions is None:
        directions = random_directions(num_projections, x.shape[1], seed)
    th = directions.to(torch.float64)
    px = (x.to(torch.float64) @ th.T).T.sort(dim=1).values  # (P, N)
    py = (y.to(torch.float64) @ th.T).T.sort(dim=1).values  # (P, M)
    if px.shape[1] == py.shape[1]:
        wpp = (px - py).abs().pow(p).mean(1)
    else:
        n, m = px.shape[1], py.shape[1]
        grid = torch.cat([torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(m + 1, dtype=torch.float64) / m])
        grid = grid.unique().sort().values  # jump points of both quantile functions
        mids, widths = (grid[1:] + grid[:-1]) / 2, grid[1:] - grid[:-1]
        wpp = ((_quantiles(px, mids) - _quantiles(py, mids)).abs().pow(p) * widths).sum(1)
    return wpp.mean().pow(1.0 / p).item()


def paired_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error ``e_b = mean_i (sample_bi - reference_bi)^2`` of paired ``(B, ...)`` tensors
    (the same initial noise and condition produced both), float64 ``(B,)``."""
    if samples.shape != reference.shape:
        raise ValueError(f"paired samples must have equal shapes, got {tuple(samples.shape)} and {tuple(reference.shape)}")
    return (samples.to(torch.float64) - reference.to(torch.float64)).pow(2).flatten(1).mean(1)


def paired_mse(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples and elements of ``(sample - reference)^2``: ``mean_b e_b`` of :func:`paired_errors`."""
    return paired_errors(samples, reference).mean().item()


def paired_difference(errors: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """``(mean_b d_b, std_b d_b / sqrt(B))`` of ``d_b = errors_b - other_b``: the difference of two samplers'
    paired MSE on the same noises and its standard error. Pairing removes the spread the noises share (a sample
    hard for one sampler is hard for the other), so it is the error bar on "A is closer to the reference than B"."""
    if errors.shape != other.shape or errors.dim() != 1:
        raise ValueError(f"per-sample errors must be two (B,) tensors, got {tuple(errors.shape)} and {tuple(other.shape)}")
    d = errors.to(torch.float64) - other.to(torch.float64)
    se = d.std().item() / d.numel() ** 0.5 if d.numel() > 1 else float("nan")
    return d.mean().item(), se


def straightness(trajectory: torch.Tensor, times: torch.Tensor, boundaries: torch.Tensor | None = None) -> float:
    """Relative straightness of discrete trajectories: 0 for straight, constant-speed paths.

    ``trajectory`` ``(S+1, B, ...)`` holds the states ``z_0..z_S`` at ``times`` ``(S+1,)``. With
    segment velocities ``v_j = (z_{j+1} - z_j) / (t_{j+1} - t_j)`` and the average velocity
    ``vbar = (z_S - z_0) / (t_S - t_0)`` (Liu et al.'s straightness, made scale-free):

        S = mean_b [ sum_j |dt_j| ||v_j - vbar||^2 / (|t_S - t_0| ||vbar||^2) ]

    It is the relative error of replacing the path by one Euler step. With window
    ``boundaries`` ``[t_K, ..., t_0]`` the segments are grouped by the window holding their
    midpoint, ``vbar`` is taken per window and the sums run over all windows (so a
    piecewise-straight path with constant speed in each window scores 0).
    """
    if trajectory.dim() < 2 or trajectory.shape[0] != times.numel() or times.numel() < 2:
        raise ValueError(
            f"need trajectory (S+1, B, ...) and times (S+1,) with S >= 1, got {tuple(trajectory.shape)} and {tuple(times.shape)}"
        )
    z = trajectory.to(torch.float64).flatten(2)  # (S+1, B, D)
    t = times.to(torch.float64)
    dt = t[1:] - t[:-1]  # (S,)
    v = (z[1:] - z[:-1]) / dt.view(-1, 1, 1)  # (S, B, D)
    if boundaries is None:
        group = torch.zeros_like(dt, dtype=torch.long)
    else:
        from perflow.windows import window_index

        group = window_index((t[1:] + t[:-1]) / 2, torch.as_tensor(boundaries, dtype=torch.float64))
    dev = torch.zeros(z.shape[1], dtype=torch.float64)
    norm = torch.zeros(z.shape[1], dtype=torch.float64)
    for g in group.unique():
        m = group == g
        w = dt[m].abs().view(-1, 1, 1)  # (S_g, 1, 1)
        vbar = (v[m] * w).sum(0) / w.sum()  # (B, D): displacement / duration of the group
        dev += ((v[m] - vbar).pow(2).sum(-1) * w.view(-1, 1)).sum(0)
        norm += vbar.pow(2).sum(-1) * w.sum()
    return (dev / norm.clamp(min=1e-300)).mean().item()


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose classifier arg-max equals the label they were generated for."""
    return (logits.argmax(-1) == labels.to(logits.device)).float().mean().item()


__all__ = [
    "gaussian_stats",
    "frechet_distance",
    "frechet_distance_features",
    "random_directions",
    "sliced_wasserstein",
    "paired_errors",
    "paired_mse",
    "paired_difference",
    "straightness",
    "label_accuracy",
]
