"""The pruned k-center greedy picks exactly the plain greedy's sequence (codes/coreset.py)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from codes.coreset import BLOCK, _Distances, _full_distances, k_center_greedy_plain, k_center_greedy_pruned
from codes.methods.patchcore import PatchCore, as_rows, k_center_greedy, patch_features



def clustered(rng: np.random.Generator, n: int, dim: int, n_clusters: int) -> np.ndarray:
    """Gaussian clusters of varied spread, with blocks of exact duplicates."""
    centres = rng.normal(size=(n_clusters, dim)) * 4
    x = centres[rng.integers(0, n_clusters, n)] + rng.normal(size=(n, dim)) * rng.uniform(0.05, 1, (n, 1))
    x[n // 10:n // 10 + n // 20] = x[3]                         # many copies of one point
    x[n // 2:n // 2 + 7] = x[(n // 2 + 100) % n]
    return x.astype(np.float32)


def same_picks(x: np.ndarray, n_select: int, first: int = 0) -> None:
    points = torch.from_numpy(x)
    want = k_center_greedy_plain(points, n_select, first)
    got = k_center_greedy_pruned(points, n_select, first)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize('n, dim, n_select', [(5000, 16, 300), (4001, 3, 1000), (997, 40, 997), (1500, 8, 1)])
def test_pruned_equals_plain_on_clustered_data_with_duplicates(n: int, dim: int, n_select: int) -> None:
    same_picks(clustered(np.random.default_rng(n), n, dim, 30), n_select)


def test_pruned_equals_plain_with_exact_ties() -> None:
    # small integers: every distance is exact, so many distinct points tie and the lowest index must win
    rng = np.random.default_rng(2)
    x = rng.integers(0, 5, size=(3000, 3)).astype(np.float32)
    same_picks(x, 400)
    same_picks(x, 3000, first=17)       # n_select == n: once all are covered, the argmax of zeros is index 0


def test_pruned_equals_plain_where_the_cells_cannot_prune(monkeypatch) -> None:
    # texture-like features: distances alike (noise around one point in 64 dims) for the first picks, so they
    # take the pass over every point; a few far clusters later let the cells prune. Both ways must give the
    # plain loop's picks, and both must have run.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6000, 64)) * 0.01
    x[:600] += rng.normal(size=(6, 64))[rng.integers(0, 6, 600)] * 3
    x[4000:4010] = x[4321]
    used = {'full': 0, 'gathered': 0}
    full, gathered = _Distances.full, _Distances.__call__

    def count_full(self, centre):
        used['full'] += 1
        return full(self, centre)

    def count_gathered(self, rows, centre):
        used['gathered'] += 1
        return gathered(self, rows, centre)

    monkeypatch.setattr(_Distances, 'full', count_full)
    monkeypatch.setattr(_Distances, '__call__', count_gathered)
    same_picks(x.astype(np.float32), 700)
    assert used['full'] > 1 and used['gathered'] > 1, used


@pytest.mark.parametrize('n', [1, 2, 3, BLOCK - 1, BLOCK, BLOCK + 5])
def test_pruned_equals_plain_on_tiny_inputs(n: int) -> None:
    x = clustered(np.random.default_rng(n), max(n, 40), 5, 3)[:n]
    for n_select in {1, max(1, n // 2), n}:
        same_picks(x, n_select)


@pytest.mark.parametrize('threads', [None, 1, 2])
@pytest.mark.parametrize('n', [2 * BLOCK * 50 + 13, 2 * BLOCK * 50, BLOCK - 3])
def test_recomputed_rows_get_the_full_products_floats(threads: int | None, n: int) -> None:
    # the caller's thread count must not matter: with MKL on two threads a full product's rows near the
    # threads' split (n / 2, not a multiple of 4) go through its one-row tail kernel and change floats
    rng = np.random.default_rng(3)
    x = torch.from_numpy(clustered(rng, n, 152, 20))
    norms = (x * x).sum(1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        wants = {centre: _full_distances(x, norms, centre).numpy() for centre in (0, 7, n - 1)}
        torch.set_num_threads(threads or before)
        dist = _Distances(x)
        for centre, want in wants.items():
            full = _full_distances(x, norms, centre).numpy()
            assert np.array_equal(full, want)
            for k in (1, 3, 5, 100, 1001, n):
                rows = rng.choice(n, min(k, n), replace=False)
                assert np.array_equal(dist(rows, centre), full[rows])
    finally:
        torch.set_num_threads(before)


def test_patchcore_greedy_by_hand_and_on_cpu_is_the_pruned() -> None:
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [5.0]])
    assert k_center_greedy(points, 4).tolist() == [0, 4, 5, 2]
    assert k_center_greedy_pruned(points, 4).tolist() == [0, 4, 5, 2]


def test_pruned_equals_plain_on_real_patchcore_features(mvtec_root) -> None:
    from codes.backbones import Backbone
    from codes.mvtecad import find_class, load_images_cropped
    files = find_class(mvtec_root, 'bottle')
    images = load_images_cropped(files.train[:10], PatchCore.resize_filter, 'train')
    rows = as_rows(patch_features(Backbone('efficientnet_lite0', None, 'cpu').features(images, 10))).contiguous()
    assert rows.shape == (7840, 152)
    for n_select in (78, 800):          # PatchCore's 1 %, and ten times more picks
        want = k_center_greedy_plain(rows, n_select)
        assert k_center_greedy_pruned(rows, n_select).tolist() == want.tolist()
        assert k_center_greedy(rows, n_select).tolist() == want.tolist()
