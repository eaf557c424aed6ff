"""PSDL: patchwise sparse dictionary learning on a pre-trained network's activation maps (PSDL_SPEC.md 2-4).

A signal is the d^2-channel vector at one position of one image's map. Each position p gets its own
dictionary, initialised with the complete 2-D DCT-II and trained by approximate K-SVD (20 iterations,
OMP with s = round(0.25 d^2) atoms). Each training signal's (L1 norm of its code, squared
reconstruction error) is summarised per position by a mean and a 2x2 covariance (+ 0.01 I). A test
position is sparse-coded on its dictionary by OMP; its score is the Mahalanobis distance of its
(L1, error) pair. The grid of scores is upsampled bicubic, smoothed (Gaussian, sigma 4); the image
score is the map's maximum.

SINGLE keeps the first d^2 = floor(sqrt(C))^2 channels of one layer. MULTIPLE puts layer1-3 on
layer3's grid (layer2 and the first C1 - surplus channels of layer1 average-pooled) and keeps all
d^2 = C1 + C2 + C3 - surplus channels. The K-SVD and OMP themselves are in codes/sparse_coding.py.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import LAYERS
from ..errors import UserError
from .base import FeaturesOf
from ..gaussians import fit_gaussians, mahalanobis
from ..score_maps import smooth, upsample
from ..sparse_coding import approximate_ksvd, dct_dictionary, omp
from ..threads import one_thread

KINDS = ('single', 'multiple')
SPARSITY = 0.25
ITERATIONS = 20
COV_EPS = 0.01


def signal_size(channels: tuple[int, int, int], kind: str, layer: str) -> int:
    """d: the signals have d^2 dimensions (SINGLE: floor(sqrt(C_layer)); MULTIPLE: floor(sqrt(C1+C2+C3)))."""
    total = channels[LAYERS.index(layer)] if kind == 'single' else sum(channels)
    return math.isqrt(total)


def pool_to(x: torch.Tensor, grid: tuple[int, int], name: str) -> torch.Tensor:
    """Average-pools `x` by the whole factor that brings it onto `grid` (none if it is already there)."""
    if x.shape[-2:] == grid:
        return x
    fh, fw = x.shape[-2] // grid[0], x.shape[-1] // grid[1]
    if fh < 1 or (x.shape[-2], x.shape[-1]) != (fh * grid[0], fw * grid[1]):
        raise UserError(f'--psdl_type multiple needs {name}\'s grid {tuple(x.shape[-2:])} to be a whole multiple of '
                        f'layer3\'s {grid}: choose an input size divisible by 16, or --psdl_type single')
    return F.avg_pool2d(x, (fh, fw), (fh, fw))


def activation_vectors(features: dict[str, torch.Tensor], channels: tuple[int, int, int], kind: str,
                       layer: str) -> torch.Tensor:
    """(N, d^2, H, W): the channel vectors PSDL codes, in the repository's channel order."""
    d = signal_size(channels, kind, layer)
    if kind == 'single':
        return features[layer][:, :d * d]
    surplus = sum(channels) - d * d
    grid = tuple(features['layer3'].shape[-2:])
    return torch.cat([features['layer3'], pool_to(features['layer2'], grid, 'layer2'),
                      pool_to(features['layer1'][:, :channels[0] - surplus], grid, 'layer1')], dim=1)


def as_signals(vectors: torch.Tensor) -> torch.Tensor:
    """(N, n, H, W) -> (P = H*W, n, N) float64: one signal matrix per position."""
    return vectors.double().flatten(2).permute(2, 1, 0).contiguous()


def code_pairs(dictionary: torch.Tensor, signals: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(P, N, 2): each signal's (L1 norm of its code, squared reconstruction error)."""
    l1 = codes.abs().sum(dim=1)
    error = ((dictionary @ codes - signals) ** 2).sum(dim=1)
    return torch.stack([l1, error], dim=-1)


class PSDL:
    name = 'psdl'
    resize_filter = 'bicubic'
    held_out_rule = 'held-out folds (K-SVD refitted without them)'

    def __init__(self, channels: tuple[int, int, int], kind: str = 'single', layer: str = 'layer3',
                 iterations: int = ITERATIONS, image_size: int = 224) -> None:
        if kind not in KINDS:
            raise UserError(f'--psdl_type must be one of {", ".join(KINDS)}, not {kind!r}')
        if layer not in LAYERS:
            raise UserError(f'--layer must be one of {", ".join(LAYERS)}, not {layer!r}')
        self.channels, self.kind, self.layer = tuple(channels), kind, layer
        self.d = signal_size(self.channels, kind, layer)
        self.n_nonzero = round(SPARSITY * self.d * self.d)
        self.iterations = iterations
        self.image_size = image_size
        self.times: dict[str, float] = {}
        self.dictionaries: torch.Tensor | None = None

    def settings(self) -> dict:
        return {'type': self.kind, 'layer': self.layer if self.kind == 'single' else None, 'd': self.d,
                'n_nonzero': self.n_nonzero, 'iterations': self.iterations, 'cov_eps': COV_EPS}

    def fit(self, features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        vectors = activation_vectors(features, self.channels, self.kind, self.layer)
        signals = as_signals(vectors)                                               # (P, n, N)
        n = signals.shape[1]
        init = torch.from_numpy(dct_dictionary(self.d)).to(signals).expand(len(signals), n, n).contiguous()
        started = time.perf_counter()
        with one_thread():
            dictionaries, codes = approximate_ksvd(signals, init, self.n_nonzero, self.iterations)
        self.times['ksvd'] = time.perf_counter() - started
        # The repository's statistics come from the codes after K-SVD's last update step, not from
        # re-coding the training set with OMP (spec oddity 2, kept).
        mean, cov = fit_gaussians(code_pairs(dictionaries, signals, codes), COV_EPS)
        return {'dictionaries': dictionaries.numpy(), 'mean': mean.numpy(), 'cov': cov.numpy(),
                'grid': np.array(vectors.shape[-2:])}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.dictionaries = torch.from_numpy(state['dictionaries'])
        self.mean, self.cov = torch.from_numpy(state['mean']), torch.from_numpy(state['cov'])
        self.grid = tuple(int(v) for v in state['grid'])

    def valid(self, state: dict[str, np.ndarray]) -> bool:
        n = self.d * self.d
        return ({'dictionaries', 'mean', 'cov', 'grid'} <= set(state) and state['dictionaries'].shape[1:] == (n, n)
                and state['mean'].shape[1:] == (2,) and len(state['mean']) == len(state['dictionaries']))

    def patch_scores(self, features: dict[str, torch.Tensor]) -> np.ndarray:
        """(N, H, W) Mahalanobis distances of the test positions' OMP (L1, error) pairs."""
        vectors = activation_vectors(features, self.channels, self.kind, self.layer)
        n, _, h, w = vectors.shape
        if (h, w) != self.grid:
            raise UserError(f'the test maps are {h}x{w} but the PSDL model was fitted on {self.grid[0]}x{self.grid[1]}')
        signals = as_signals(vectors)
        with one_thread():
            codes = omp(self.dictionaries, signals, self.n_nonzero)
        dist = mahalanobis(code_pairs(self.dictionaries, signals, codes), self.mean, self.cov)
        return dist.T.reshape(n, h, w).numpy()

    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, None]:
        """(maps (N, size, size), None: the image score is the map's maximum)."""
        return smooth(upsample(self.patch_scores(features), self.image_size, 'bicubic')), None

    def held_out(self, features_of: FeaturesOf, which: np.ndarray, n_train: int) -> tuple[np.ndarray, None]:
        """Maps of the training images `which` by held-out folds: each fold is scored by dictionaries refitted
        (K-SVD) on the other training images. A fold is at most a fifth of them, so that every refit sees
        at least 80% of the data; `which` of 20 out of 200 is one fold, one refit."""
        which = np.asarray(which)
        fold_size = max(1, n_train // 5)
        features = features_of(np.arange(n_train))
        maps = []
        for fold in np.array_split(which, -(-len(which) // fold_size)):
            keep = np.setdiff1d(np.arange(n_train), fold)
            if len(keep) < 2:
                raise UserError('PSDL\'s held-out thresholds need at least 2 training images outside each fold')
            refit = PSDL(self.channels, self.kind, self.layer, self.iterations, self.image_size)
            refit.load_state(refit.fit({k: v[keep] for k, v in features.items()}))
            maps.append(refit.score({k: v[fold] for k, v in features.items()})[0])
        return np.concatenate(maps), None
