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


class GaussianSums:
    """Per-position sums of x and of x x^T in float64, added chunk by chunk of samples: the mean and the
    unbiased covariance + eps * I (as `fit_gaussians` of all the samples at once) from one batched product
    per chunk, without all the samples in float64 at once. The sums are of x minus the first chunk's
    mean (per position): so the one-pass covariance does not cancel away digits when the mean is large
    against the spread."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None      # (P, d)
        self.sum: torch.Tensor | None = None        # (P, d)
        self.outer: torch.Tensor | None = None      # (P, d, d)

    def add(self, x: torch.Tensor) -> None:
        """x (P, n, d), any float dtype."""
        x = x.to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=1)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(*self.shift.shape, self.shift.shape[1], dtype=torch.float64, device=x.device)
        x = x - self.shift[:, None, :]
        self.sum += x.sum(dim=1)
        self.outer.baddbmm_(x.transpose(1, 2), x)
        self.n += x.shape[1]

    def gaussians(self, eps: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """mean (P, d) and unbiased covariance + eps * I (P, d, d), float64."""
        if self.n < 2:
            raise ValueError(f'a covariance needs at least 2 samples, not {self.n}')
        offset = self.sum / self.n
        cov = torch.baddbmm(self.outer, offset[:, :, None], offset[:, None, :], alpha=-self.n).div_(self.n - 1)
        cov.diagonal(dim1=1, dim2=2).add_(eps)
        return self.shift + offset, cov


def whitening(cov: torch.Tensor) -> torch.Tensor:
    """(P, d, d) covariances -> (P, d, d) inverse Cholesky factors L^-1 (cov = L L^T): the Mahalanobis
    distance of x to mean is |L^-1 (x - m)|, so each batch of samples is one batched product."""
    cov = cov.double()
    with one_thread():      # batched small factorisations: see codes/threads.py
        chol = torch.linalg.cholesky(cov)
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
        return torch.linalg.solve_triangular(chol, eye, upper=False)


def whitened_distances(x: torch.Tensor, mean: torch.Tensor, inverse_factor: torch.Tensor) -> torch.Tensor:
    """x (P, n, d), mean (P, d), `whitening(cov)` (P, d, d) -> (P, n) Mahalanobis distances, in float64."""
    z = (x.double() - mean.double()[:, None, :]) @ inverse_factor.transpose(1, 2)
    return torch.linalg.vector_norm(z, dim=2)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """x (P, N, d), mean (P, d), covariance (P, d, d) -> (P, N) distances sqrt((x - m)^T cov^-1 (x - m)),
    scipy's `mahalanobis` at every position and sample at once. Through the Cholesky factor L of cov:
    the distance is |L^-1 (x - m)|, with no explicit inverse (faster and better conditioned)."""
    x, mean, cov = x.double(), mean.double(), cov.double()
    with one_thread():
        chol = torch.linalg.cholesky(cov)
        z = torch.linalg.solve_triangular(chol, (x - mean[:, None, :]).transpose(1, 2), upper=False)
    return z.square().sum(dim=1).sqrt()
