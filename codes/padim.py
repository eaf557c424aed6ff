"""PaDiM as the PSDL repository's MVTec variant (`padim/padim_main.py`, PSDL_SPEC.md section 5).

Each position of the layer1 grid gets one vector: layer1 with layer2 and layer3 upsampled bicubic
to its grid, of which d channels chosen by Python's `random.sample` seeded with 1024 (unsorted) are
kept. Fitting: the per-position mean and unbiased covariance + 0.01 I over the training images.
Scoring: the Mahalanobis distance of each test position to its Gaussian (batched over positions),
upsampled bicubic to the input size, smoothed with a Gaussian of sigma 4; the image score is the
map's maximum.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import LAYERS
from .errors import UserError
from .gaussians import fit_gaussians, mahalanobis
from .score_maps import smooth, upsample

SEED = 1024
# d per backbone: the repository's 100 of R18's 448 and 550 of WRN50-2's 1792; for EfficientNet-Lite0's
# 176 channels this project chooses 100 (fewer than bottle's 209 training images, so the covariance is
# estimated from more samples than dimensions).
DEFAULT_D = {'resnet18': 100, 'wide_resnet50_2': 550, 'efficientnet_lite0': 100}
COV_EPS = 0.01


def channel_subset(total: int, d: int, seed: int = SEED) -> list[int]:
    """The repository's `random.seed(1024); random.sample(range(t_d), d)`, from a private generator."""
    if not 1 <= d <= total:
        raise UserError(f'--padim_d must be between 1 and {total} (the backbone\'s layer1-3 channels), not {d}')
    return random.Random(seed).sample(range(total), d)


def embedding(features: dict[str, torch.Tensor], idx: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """(N, d, H, W) on layer1's grid: [layer1, up(layer2), up(layer3)] channels `idx` (upsampling is per
    channel, so each layer's chosen channels are upsampled alone, in chunks of images to bound memory)."""
    sizes = [features[name].shape[1] for name in LAYERS]
    offsets = np.cumsum([0] + sizes)
    grid = features['layer1'].shape[-2:]
    out = []
    for start in range(0, len(features['layer1']), chunk):
        parts = []
        for name, lo, hi in zip(LAYERS, offsets[:-1], offsets[1:]):
            x = features[name][start:start + chunk]
            if x.shape[-2:] != grid:
                x = F.interpolate(x, size=grid, mode='bicubic', align_corners=False)
            parts.append(x)
        out.append(torch.cat(parts, dim=1)[:, idx])
    return torch.cat(out)


class PaDiM:
    name = 'padim'
    resize_filter = 'lanczos'       # padim_main.py reads MVTec with LANCZOS (the PSDL loader uses BICUBIC)

    def __init__(self, channels: tuple[int, ...], d: int, image_size: int = 224) -> None:
        self.idx = channel_subset(sum(channels), d)
        self.d = d
        self.image_size = image_size
        self.mean: np.ndarray | None = None
        self.cov: np.ndarray | None = None
        self.grid: tuple[int, int] | None = None

    def settings(self) -> dict:
        return {'d': self.d, 'seed': SEED, 'cov_eps': COV_EPS}

    def fit(self, features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        emb = embedding(features, torch.tensor(self.idx)).double()      # (N, d, H, W)
        mean, cov = fit_gaussians(emb.flatten(2).permute(2, 0, 1), COV_EPS)     # positions (P, N, d)
        # the repository stores float32; so do we, and every later use starts from those values
        return {'mean': mean.float().numpy(), 'cov': cov.float().numpy(), 'grid': np.array(emb.shape[-2:])}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean, self.cov, self.grid = state['mean'], state['cov'], tuple(int(v) for v in state['grid'])

    def valid(self, state: dict[str, np.ndarray]) -> bool:
        return ({'mean', 'cov', 'grid'} <= set(state) and state['mean'].shape[1:] == (self.d,)
                and state['cov'].shape[1:] == (self.d, self.d) and len(state['mean']) == int(np.prod(state['grid'])))

    def patch_scores(self, features: dict[str, torch.Tensor]) -> np.ndarray:
        """(N, H, W) Mahalanobis distances on layer1's grid."""
        emb = embedding(features, torch.tensor(self.idx)).double()
        n, _, h, w = emb.shape
        dist = mahalanobis(emb.flatten(2).permute(2, 0, 1), torch.from_numpy(self.mean), torch.from_numpy(self.cov))
        return dist.T.reshape(n, h, w).numpy()

    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        """(maps (N, size, size), None: the image score is the map's maximum)."""
        return smooth(upsample(self.patch_scores(features), self.image_size, 'bicubic')), None
