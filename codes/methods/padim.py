"""PaDiM as the PSDL repository's MVTec variant (`padim/padim_main.py`, PSDL_SPEC.md section 5).

Each position of the layer1 grid gets one vector: layer1 with layer2 and layer3 upsampled bicubic
to its grid, of which d channels chosen by Python's `random.sample` seeded with 1024 (unsorted) are
kept. Fitting: the per-position mean and unbiased covariance + 0.01 I over the training images.
Scoring: the Mahalanobis distance of each test position to its Gaussian (batched over positions),
upsampled bicubic to the input size, smoothed with a Gaussian of sigma 4; the image score is the
map's maximum.
Both go a chunk of images at a time: the fit accumulates float64 sums per position (codes/gaussians.py
GaussianSums), the scores are one batched product per chunk with the inverse Cholesky factors, so
memory does not grow with the images beyond the backbone's float32 maps.
"""
from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import LAYERS
from ..errors import UserError
from .base import FeaturesOf
from ..gaussians import GaussianSums, whitened_distances, whitening
from ..score_maps import smooth, upsample

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


def embedding_chunks(features: dict[str, torch.Tensor], idx: torch.Tensor, chunk: int = 32) -> Iterator[torch.Tensor]:
    """(n, d, H, W) float32 on layer1's grid, `chunk` images at a time: [layer1, up(layer2), up(layer3)]
    channels `idx`. Upsampling is per channel, so only each layer's chosen channels are upsampled."""
    idx = torch.as_tensor(idx)
    grid = features['layer1'].shape[-2:]
    ends = torch.tensor(np.cumsum([features[name].shape[1] for name in LAYERS]))
    layer = torch.bucketize(idx, ends, right=True)                # each chosen channel's layer
    picks = [idx[layer == i] - (ends[i - 1] if i else 0) for i in range(len(LAYERS))]
    # the picks concatenated in layer order are idx[by_layer]; `back` puts them in idx's order again
    by_layer = torch.argsort(layer, stable=True)
    back = torch.argsort(by_layer)
    for first in range(0, len(features['layer1']), chunk):
        parts = []
        for name, pick in zip(LAYERS, picks):
            x = features[name][first:first + chunk, pick]
            if x.shape[-2:] != grid:
                x = F.interpolate(x, size=grid, mode='bicubic', align_corners=False)
            parts.append(x)
        yield torch.cat(parts, dim=1)[:, back]


def embedding(features: dict[str, torch.Tensor], idx: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """(N, d, H, W) on layer1's grid: `embedding_chunks` of all the images."""
    return torch.cat(list(embedding_chunks(features, idx, chunk)))


def by_position(emb: torch.Tensor) -> torch.Tensor:
    """(n, d, H, W) -> (H * W, n, d) float64, contiguous (one copy)."""
    n, d, h, w = emb.shape
    out = torch.empty((h * w, n, d), dtype=torch.float64, device=emb.device)
    out.copy_(emb.flatten(2).permute(2, 0, 1))
    return out


class PaDiM:
    name = 'padim'
    resize_filter = 'lanczos'       # padim_main.py reads MVTec with LANCZOS (the PSDL loader uses BICUBIC)
    held_out_rule = 'leave-one-image-out (Gaussians without the image, closed form)'

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
        # per image chunk: float64 sums of x and x x^T per position (one batched product), so no float64 copy
        # of all the images' embeddings is made
        sums = GaussianSums()
        for emb in embedding_chunks(features, torch.tensor(self.idx)):
            sums.add(by_position(emb))
            grid = emb.shape[-2:]
        mean, cov = sums.gaussians(COV_EPS)
        # the repository stores float32; so do we, and every later use starts from those values
        return {'mean': mean.float().numpy(), 'cov': cov.float().numpy(), 'grid': np.array(grid)}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.mean, self.cov, self.grid = state['mean'], state['cov'], tuple(int(v) for v in state['grid'])
        self._whitening: tuple[torch.Tensor, torch.Tensor] | None = None

    def position_whitening(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, inverse Cholesky factor) per position in float64, made once per loaded state: a scoring call
        of one image would otherwise pay for 3,136 factorisations each time."""
        if self._whitening is None:
            self._whitening = torch.from_numpy(self.mean).double(), whitening(torch.from_numpy(self.cov))
        return self._whitening

    def valid(self, state: dict[str, np.ndarray]) -> bool:
        return ({'mean', 'cov', 'grid'} <= set(state) and state['mean'].shape[1:] == (self.d,)
                and state['cov'].shape[1:] == (self.d, self.d) and len(state['mean']) == int(np.prod(state['grid'])))

    def patch_scores(self, features: dict[str, torch.Tensor]) -> np.ndarray:
        """(N, H, W) Mahalanobis distances on layer1's grid, a chunk of images at a time."""
        mean, inverse_factor = self.position_whitening()
        out = []
        for emb in embedding_chunks(features, torch.tensor(self.idx)):
            n, _, h, w = emb.shape
            out.append(whitened_distances(by_position(emb), mean, inverse_factor).T.reshape(n, h, w))
        return torch.cat(out).numpy()

    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]:
        """(maps (N, size, size), None: the image score is the map's maximum)."""
        return smooth(upsample(self.patch_scores(features), self.image_size, 'bicubic')), None

    def held_out(self, features_of: FeaturesOf, which: np.ndarray, n_train: int) -> tuple[np.ndarray, None]:
        """Maps of the training images `which`, each against the Gaussians fitted without it (closed form).

        Without sample x, the mean is m' = m - v / (N - 1) (v = x - m) and the scatter loses N / (N - 1) v v^T,
        so cov' + eps I = B - c v v^T with B = (N - 1) / (N - 2) (cov - eps I) + eps I, c = N / ((N - 1)(N - 2)),
        the same B for every sample. With q = v^T B^-1 v (Sherman-Morrison), the squared distance of x to
        its left-out Gaussian is (N / (N - 1))^2 q / (1 - c q): one whitening for all the training images."""
        N = n_train
        if N < 3:
            raise UserError('PaDiM\'s leave-one-out thresholds need at least 3 training images')
        mean = torch.from_numpy(self.mean).double()
        eye = torch.eye(self.d, dtype=torch.float64)
        B = (torch.from_numpy(self.cov).double() - COV_EPS * eye) * ((N - 1) / (N - 2)) + COV_EPS * eye
        inverse_factor = whitening(B)
        c = N / ((N - 1) * (N - 2))
        out = []
        for emb in embedding_chunks(features_of(which), torch.tensor(self.idx)):
            n, _, h, w = emb.shape
            q = whitened_distances(by_position(emb), mean, inverse_factor).square()
            out.append((q / (1 - c * q)).sqrt().mul(N / (N - 1)).T.reshape(n, h, w))
        return smooth(upsample(torch.cat(out).numpy(), self.image_size, 'bicubic')), None
