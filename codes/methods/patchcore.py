"""PatchCore as the PSDL repository has it (`patchcore/patchcore.py`, PSDL_SPEC.md section 6).

Patch features: layer2 and layer3 each averaged over 3x3 neighbourhoods (stride 1, zero padding
counted), layer3 upsampled bicubic to layer2's grid, concatenated. The memory bank is every training
patch (image, row, col order), reduced to a coreset by k-center greedy selection (first centre: index
0; distances measured after a sparse random projection when that projection is smaller than the
features). Test: each patch's distance to its nearest coreset patch (this project's search module);
the image score re-weights the largest patch score by its k=9 nearest coreset distances.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..coreset import k_center_greedy_plain, k_center_greedy_pruned
from ..nearest_neighbor import BruteForceSearch, ExactSearch, nearest_distances
from ..score_maps import smooth
from .base import FeaturesOf

K_NEIGHBOURS = 9
BRUTE_PAIRS = 1 << 24   # (query, coreset row) pairs up to which a brute-force scan is faster than the cell index
PROJECTION_EPS = 0.9
PROJECTION_SEED = 0     # the repository's projection is unseeded; ours is fixed so that runs repeat


def patch_features(features: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, C2 + C3, h, w) on layer2's grid (the grid follows the input size: 28x28 at 224 px)."""
    l2 = F.avg_pool2d(features['layer2'], 3, 1, 1)          # count_include_pad: borders divided by 9
    l3 = F.avg_pool2d(features['layer3'], 3, 1, 1)
    l3 = F.interpolate(l3, size=l2.shape[-2:], mode='bicubic', align_corners=False)
    return torch.cat([l2, l3], dim=1)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N*h*w, C) in image, row, column order."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def project(rows: np.ndarray, seed: int = PROJECTION_SEED) -> np.ndarray:
    """SparseRandomProjection(n_components='auto', eps=0.9), only for the coreset's distances. When 'auto'
    asks for more components than there are features, the features themselves are used (exact distances)."""
    # imported here: scikit-learn takes most of a second to import, and only PatchCore's fit needs it
    from sklearn.random_projection import SparseRandomProjection, johnson_lindenstrauss_min_dim
    n_components = johnson_lindenstrauss_min_dim(len(rows), eps=PROJECTION_EPS)
    if n_components >= rows.shape[1]:
        return rows
    return SparseRandomProjection(n_components=n_components, eps=PROJECTION_EPS,
                                  random_state=seed).fit_transform(rows).astype(np.float32)


def k_center_greedy(points: torch.Tensor, n_select: int, first: int = 0) -> np.ndarray:
    """Indices of k-center greedy selection (L2): start at `first`, then repeatedly the point farthest
    from all selected ones (lowest index among equal distances). On the CPU the pruned greedy
    (codes/coreset.py), which picks the plain loop's sequence; elsewhere the plain loop."""
    if points.device.type == 'cpu':
        return k_center_greedy_pruned(points, n_select, first)
    return k_center_greedy_plain(points, n_select, first)


def reweight(knn: torch.Tensor, max_scores: torch.Tensor) -> torch.Tensor:
    """The repository's image score: (1 - exp(max N_b) / sum exp(N_b)) * max patch score, N_b (N, k) being
    the k nearest coreset distances of each image's highest-scoring patch. exp(max)/sum(exp) is computed
    as 1/sum(exp(N_b - max)): the same value, without overflow for large distances."""
    weight = 1 - 1 / torch.exp(knn - knn.max(dim=1, keepdim=True).values).sum(dim=1)
    return weight * max_scores


class PatchCore:
    name = 'patchcore'
    resize_filter = 'bicubic'
    held_out_rule = "leave-one-image-out (the coreset without the image's rows)"

    def __init__(self, coreset_ratio: float = 0.01, image_size: int = 224,
                 device: torch.device | str = 'cpu') -> None:
        self.coreset_ratio = coreset_ratio
        self.image_size = image_size
        self.device = torch.device(device)
        self.coreset: np.ndarray | None = None
        self._search: ExactSearch | None = None     # the coreset's exact search, made once per loaded state

    def settings(self) -> dict:
        return {'coreset_ratio': self.coreset_ratio, 'projection_seed': PROJECTION_SEED,
                'projection_eps': PROJECTION_EPS, 'first_centre': 0}

    def fit(self, features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        rows = as_rows(patch_features(features)).contiguous()
        n_select = max(1, int(len(rows) * self.coreset_ratio))
        selected = k_center_greedy(torch.from_numpy(project(rows.numpy())).to(self.device), n_select)
        return {'coreset': rows[selected].numpy().astype(np.float32), 'selected': selected}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.coreset = state['coreset']
        self.selected = state.get('selected')
        self._search = None

    def coreset_search(self, n_queries: int) -> ExactSearch | BruteForceSearch:
        """The exact search over the coreset for `n_queries` rows: a float64 scan of every row for few pairs
        (one image of bottle: 17 ms against the cell index's 56 ms), else the cell index, fitted on first
        use and kept (a scoring call would otherwise pay for building it each time). Both give the nearest
        row, and the distance is then recomputed from it in float64 (nearest_distances)."""
        if n_queries * len(self.coreset) <= BRUTE_PAIRS:
            return BruteForceSearch(self.device).fit(self.coreset)
        if self._search is None:
            self._search = ExactSearch(self.device).fit(self.coreset)
        return self._search

    def valid(self, state: dict[str, np.ndarray]) -> bool:
        return ('coreset' in state and state['coreset'].ndim == 2 and len(state['coreset']) >= 1
                and 'selected' in state and state['selected'].shape == (len(state['coreset']),))

    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(maps (N, size, size), image scores (N,))."""
        return self._score(patch_features(features))

    def held_out(self, features_of: FeaturesOf, which: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray]:
        """Maps and image scores of the training images `which`, each against the coreset without the rows
        taken from its own patches (leave-one-image-out; `selected` says which image each row came from)."""
        feats = patch_features(features_of(which))
        per_image = feats.shape[-2] * feats.shape[-1]
        return self._score(feats, np.asarray(which), self.selected // per_image)

    def _score(self, feats: torch.Tensor, groups: np.ndarray | None = None,
               coreset_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """With `groups` (one training image index per scored image), no image is scored against rows of its own."""
        n, _, h, w = feats.shape
        rows = as_rows(feats).numpy()
        query_groups = None if groups is None else np.repeat(groups, h * w)
        search = self.coreset_search(len(rows)) if groups is None else None   # leave-one-out: equal rows kept apart
        patch = nearest_distances(rows, self.coreset, 'exact', self.device, desc='search coreset',
                                  query_groups=query_groups, bank_groups=coreset_groups, search=search).reshape(n, h, w)
        # The k nearest coreset patches of each image's highest-scoring patch: a small exact search.
        top = rows.reshape(n, h * w, -1)[np.arange(n), patch.reshape(n, -1).argmax(1)]
        dist = torch.cdist(torch.from_numpy(top).double(), torch.from_numpy(self.coreset).double())
        k = min(K_NEIGHBOURS, len(self.coreset))
        if groups is not None:
            own = torch.from_numpy(np.asarray(groups)[:, None] == np.asarray(coreset_groups)[None, :])
            dist = dist.masked_fill(own, float('inf'))
            k = min(k, int((~own).sum(1).min()))
        knn = dist.topk(k, dim=1, largest=False).values
        image_scores = reweight(knn, torch.from_numpy(patch.reshape(n, -1).max(1)).double()).numpy()
        maps = np.stack([cv2.resize(m.astype(np.float32), (self.image_size, self.image_size),
                                    interpolation=cv2.INTER_LINEAR) for m in patch]).astype(np.float64)
        return smooth(maps), image_scores
