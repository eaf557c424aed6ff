"""Per-position Gaussians (PaDiM's features, PSDL's (L1, error) pairs), batched over positions."""
from __future__ import annotations

import torch

from .threads import one_thread


def fit_gaussians(x: torch.Tensor, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """x (P, N, d) -> mean (P, d) and unbiased covariance + eps * I (P, d, d), as np.mean / np.cov per position."""
    n, d = x.shape[1:]
    mean = x.mean(dim=1)
    centred = x - mean[:, None, :]
    cov = centred.transpose(1, 2) @ centred / (n - 1)
    return mean, cov + eps * torch.eye(d, dtype=x.dtype, device=x.device)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """x (P, N, d), mean (P, d), covariance (P, d, d) -> (P, N) distances sqrt((x - m)^T cov^-1 (x - m)),
    scipy's `mahalanobis` at every position and sample at once. Through the Cholesky factor L of cov:
    the distance is |L^-1 (x - m)|, with no explicit inverse (faster and better conditioned)."""
    x, mean, cov = x.double(), mean.double(), cov.double()
    with one_thread():
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, (x - mean[:, None, :]).transpose(1, 2), upper=False)
    return z.square().sum(dim=1).sqrt()
