"""An analytic teacher: 2-D Gaussian-mixture data whose exact epsilon-prediction is known.

Data ``x0 ~ sum_k pi_k N(mu_k, S_k)``. Under the forward process
``z = sqrt(abar) x0 + sqrt(1 - abar) eps`` the noised marginal is again a mixture,

    p_abar(z) = sum_k pi_k N(z; sqrt(abar) mu_k, abar S_k + (1 - abar) I),

with score ``grad log p = sum_k r_k(z) C_k^{-1} (sqrt(abar) mu_k - z)`` (``r_k`` the posterior
responsibilities, ``C_k = abar S_k + (1 - abar) I``) and the exact epsilon-prediction
``eps(z) = E[eps | z] = -sqrt(1 - abar) grad log p_abar(z)``. So the teacher's
probability-flow ODE is known exactly and its (curved) trajectories can be drawn.
:meth:`GaussianMixture.denoiser` is the callable :func:`perflow.solver.solve_window` takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from perflow.solver import Denoiser


@dataclass
class GaussianMixture:
    """Mixture weights ``(M,)``, means ``(M, D)`` and covariances ``(M, D, D)`` (float64)."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    def __post_init__(self) -> None:
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.covariances = torch.as_tensor(self.covariances, dtype=torch.float64)
        m, d = self.means.shape
        if self.weights.shape != (m,) or self.covariances.shape != (m, d, d):
            raise ValueError(
                f"a mixture of {m} components in {d}-D needs weights ({m},) and covariances ({m}, {d}, {d}); "
                f"got {tuple(self.weights.shape)} and {tuple(self.covariances.shape)}"
            )
        if (self.weights < 0).any() or abs(self.weights.sum().item() - 1.0) > 1e-6:
            raise ValueError(f"mixture weights must be >= 0 and sum to 1, got {self.weights.tolist()}")
        torch.linalg.cholesky(self.covariances)  # raises if a covariance is not positive definite
        # S_k = U_k diag(s_k) U_k^T, so C_k = abar S_k + (1 - abar) I = U_k diag(abar s_k + 1 - abar) U_k^T
        self._evals, self._evecs = torch.linalg.eigh(self.covariances)  # (M, D), (M, D, D)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num`` exact samples ``(num, D)`` float64."""
        comp = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covariances)[comp]  # (N, D, D)
        noise = torch.randn(num, self.dim, 1, generator=generator, dtype=torch.float64)
        return self.means[comp] + (chol @ noise).squeeze(-1)

    def _noised(self, abar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Means ``(B, M, D)`` and covariances ``(B, M, D, D)`` of the marginal at ``abar`` ``(B,)``."""
        a = abar.to(torch.float64).view(-1, 1, 1)
        eye = torch.eye(self.dim, dtype=torch.float64)
        means = a.sqrt() * self.means.unsqueeze(0)
        covs = a.unsqueeze(-1) * self.covariances.unsqueeze(0) + (1 - a.unsqueeze(-1)) * eye
        return means, covs

    def log_prob(self, z: torch.Tensor, abar: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``log p_abar(z)`` ``(B,)`` of the noised marginal (``abar = 1``: the data density)."""
        z64 = z.to(torch.float64)
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(z64.shape[0])
        means, covs = self._noised(abar)
        dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)
        logp = dist.log_prob(z64.unsqueeze(1)) + self.weights.log()  # (B, M)
        return torch.logsumexp(logp, dim=1)

    def score(self, z: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """``grad_z log p_abar(z) = sum_k r_k(z) C_k^{-1} (sqrt(abar) mu_k - z)`` ``(B, D)`` float64.

        ``C_k^{-1}`` and ``log det C_k`` come from the eigen-decomposition of ``S_k`` (no solves)."""
        z64 = z.to(torch.float64)
        a = torch.as_tensor(abar, dtype=torch.float64).expand(z64.shape[0]).view(-1, 1, 1)  # (B, 1, 1)
        diff = a.sqrt() * self.means.unsqueeze(0) - z64.unsqueeze(1)  # (B, M, D): m_k - z
        lam = a * self._evals.unsqueeze(0) + (1 - a)  # (B, M, D): eigenvalues of C_k
        coords = torch.einsum("mdj,bmd->bmj", self._evecs, diff)  # U_k^T (m_k - z)
        prec_diff = torch.einsum("mdj,bmj->bmd", self._evecs, coords / lam)  # C_k^{-1} (m_k - z)
        logp = self.weights.log() - 0.5 * (coords.pow(2) / lam).sum(-1) - 0.5 * lam.log().sum(-1)
        r = torch.softmax(logp, dim=1)  # (B, M) responsibilities
        return (r.unsqueeze(-1) * prec_diff).sum(1)

    def eps(self, z: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        """Exact epsilon-prediction ``-sqrt(1 - abar) grad log p_abar(z)`` ``(B, D)`` float64."""
        a = torch.as_tensor(abar, dtype=torch.float64).expand(z.shape[0]).view(-1, 1)
        return -(1 - a).sqrt() * self.score(z, abar)

    def denoiser(self, alphas_cumprod: torch.Tensor) -> Denoiser:
        """``denoiser(z, i) -> eps`` at the discrete levels ``alphas_cumprod[i]``, in ``z``'s dtype."""
        ac = alphas_cumprod.to(torch.float64)

        def denoiser(z: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            idx = torch.as_tensor(i).long().expand(z.shape[0])
            return self.eps(z, ac[idx.cpu()]).to(device=z.device, dtype=z.dtype)

        return denoiser


def default_mixture() -> GaussianMixture:
    """The demo's distribution: six anisotropic Gaussians on a ring of radius 1.5, tangentially
    elongated, with unequal weights (so that the flow from noise is visibly curved)."""
    m = 6
    angles = torch.arange(m, dtype=torch.float64) * (2 * math.pi / m)
    radial = torch.stack([angles.cos(), angles.sin()], dim=1)  # (M, 2)
    tangent = torch.stack([-angles.sin(), angles.cos()], dim=1)
    covs = 0.08**2 * radial.unsqueeze(-1) * radial.unsqueeze(1) + 0.3**2 * tangent.unsqueeze(-1) * tangent.unsqueeze(1)
    weights = torch.tensor([3, 1, 2, 1, 3, 2], dtype=torch.float64)
    return GaussianMixture(weights / weights.sum(), 1.5 * radial, covs)
