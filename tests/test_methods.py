"""PaDiM, PatchCore, PSDL's own parts and the state cache, checked against independent computations."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from codes import state_cache
from codes.gaussians import fit_gaussians, mahalanobis
from codes.methods.padim import PaDiM, channel_subset
from codes.methods import patchcore as patchcore_module
from codes.methods.patchcore import PatchCore, k_center_greedy, patch_features, reweight
from codes.nearest_neighbor import BruteForceSearch, ExactSearch
from codes.methods.psdl import PSDL, activation_vectors, code_pairs


def test_gaussians_and_mahalanobis_match_numpy_and_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 20, 4))                   # 3 positions, 20 samples, 4 dims
    mean, cov = fit_gaussians(torch.from_numpy(x), eps=0.01)
    for p in range(3):
        np.testing.assert_allclose(cov[p].numpy(), np.cov(x[p], rowvar=False) + 0.01 * np.eye(4), atol=1e-12)
    queries = rng.normal(size=(3, 5, 4)) * 2
    got = mahalanobis(torch.from_numpy(queries), mean, cov).numpy()
    want = [[scipy_mahalanobis(q, mean[p].numpy(), np.linalg.inv(cov[p].numpy())) for q in queries[p]] for p in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_padim_channel_subset_is_the_repositorys():
    assert channel_subset(1792, 550)[:5] == [1632, 39, 990, 1740, 797]    # PSDL_SPEC.md, WRN50-2
    assert channel_subset(448, 100)[:5] == [408, 9, 247, 435, 199]         # R18
    random.seed(1024)
    assert channel_subset(176, 100) == random.sample(range(176), 100)      # same as the global-state call


def test_padim_distances_equal_scipy_on_a_small_case():
    g = torch.Generator().manual_seed(0)
    channels = (3, 4, 5)
    feats = lambda n: {'layer1': torch.randn(n, 3, 4, 4, generator=g), 'layer2': torch.randn(n, 4, 2, 2, generator=g),
                       'layer3': torch.randn(n, 5, 1, 1, generator=g)}
    padim = PaDiM(channels, 6, image_size=8)
    train, test = feats(30), feats(2)
    padim.load_state(padim.fit(train))
    got = padim.patch_scores(test)
    # independent: concatenate with explicit bicubic upsampling, pick channels, np.cov and scipy per position
    def emb(f):
        up = [f['layer1'], F.interpolate(f['layer2'], size=(4, 4), mode='bicubic', align_corners=False),
              F.interpolate(f['layer3'], size=(4, 4), mode='bicubic', align_corners=False)]
        return torch.cat(up, 1)[:, padim.idx].double().numpy()
    tr, te = emb(train), emb(test)
    for i, j in [(0, 0), (1, 3), (3, 2)]:
        cov = np.cov(tr[:, :, i, j], rowvar=False) + 0.01 * np.eye(6)
        mean = tr[:, :, i, j].mean(0)
        # the state is stored in float32, as the repository's
        want = [scipy_mahalanobis(te[n, :, i, j], mean.astype(np.float32), np.linalg.inv(cov.astype(np.float32)))
                for n in range(2)]
        np.testing.assert_allclose(got[:, i, j], want, rtol=1e-4)


def test_k_center_greedy_by_hand():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [5.0]])
    # start at index 0; farthest from {0}: 11 (index 4); from {0, 11}: 5 (index 5, distance 5);
    # from {0, 11, 5}: 2 (index 2, distance 2; 1 and 10 are at 1)
    assert k_center_greedy(points, 4).tolist() == [0, 4, 5, 2]


def test_k_center_greedy_equals_a_plain_loop():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)).astype(np.float64)
    chosen = [0]
    d = np.linalg.norm(x - x[0], axis=1)
    for _ in range(29):
        chosen.append(int(np.argmax(d)))
        d = np.minimum(d, np.linalg.norm(x - x[chosen[-1]], axis=1))
    assert k_center_greedy(torch.from_numpy(x), 30).tolist() == chosen


def test_patchcore_features_and_image_weight():
    g = torch.Generator().manual_seed(0)
    f = {'layer2': torch.rand(2, 3, 8, 8, generator=g), 'layer3': torch.rand(2, 4, 4, 4, generator=g)}
    out = patch_features(f)
    assert out.shape == (2, 7, 8, 8)
    # 3x3 average with zero padding counted: a corner is the sum of its 2x2 neighbourhood / 9
    assert torch.isclose(out[0, 0, 0, 0], f['layer2'][0, 0, :2, :2].sum() / 9)
    knn = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    e = np.exp(knn.numpy())
    want = (1 - e.max(1) / e.sum(1)) * np.array([1.0, 0.5])
    np.testing.assert_allclose(reweight(knn, torch.tensor([1.0, 0.5], dtype=torch.float64)).numpy(), want)


def test_patchcore_scores_an_odd_patch_highest():
    g = torch.Generator().manual_seed(0)
    train = {'layer2': torch.rand(6, 3, 8, 8, generator=g), 'layer3': torch.rand(6, 4, 4, 4, generator=g)}
    test = {'layer2': torch.rand(2, 3, 8, 8, generator=g), 'layer3': torch.rand(2, 4, 4, 4, generator=g)}
    test['layer2'][1, :, 4, 4] += 5
    core = PatchCore(0.25, image_size=32)
    state = core.fit(train)
    assert state['coreset'].shape == (96, 7) and state['selected'][0] == 0
    core.load_state(state)
    maps, scores = core.score(test)
    assert maps.shape == (2, 32, 32) and scores[1] > scores[0]
    assert np.unravel_index(maps[1].argmax(), maps[1].shape) in [(16 + a, 16 + b) for a in range(-3, 4) for b in range(-3, 4)]


def test_psdl_multiple_vector_layout():
    g = torch.Generator().manual_seed(0)
    f = {'layer1': torch.rand(1, 64, 8, 8, generator=g), 'layer2': torch.rand(1, 128, 4, 4, generator=g),
         'layer3': torch.rand(1, 256, 2, 2, generator=g)}
    v = activation_vectors(f, (64, 128, 256), 'multiple', 'layer3')
    assert v.shape == (1, 441, 2, 2)          # R18: 256 + 128 + 57 = 441 = 21^2
    l2 = f['layer2'].numpy().reshape(1, 128, 2, 2, 2, 2).mean(axis=(3, 5))
    l1 = f['layer1'][:, :57].numpy().reshape(1, 57, 2, 4, 2, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(v.numpy(), np.concatenate([f['layer3'].numpy(), l2, l1], 1), rtol=1e-6)
    single = activation_vectors(f, (64, 128, 256), 'single', 'layer2')
    assert torch.equal(single, f['layer2'][:, :121])           # first floor(sqrt(128))^2 channels


def test_psdl_fit_and_score():
    g = torch.Generator().manual_seed(0)
    # 16 channels (d=4) on a 2x2 grid; normal signals are sparse in the DCT basis
    from codes.sparse_coding import dct_dictionary
    basis = torch.from_numpy(dct_dictionary(4)).float()
    def feats(n, odd=False):
        codes = torch.zeros(n, 16, 2, 2)
        codes[:, :3] = torch.randn(n, 3, 2, 2, generator=g)
        x = torch.einsum('ck,nkhw->nchw', basis, codes)
        if odd:
            x[0, :, 1, 1] = torch.randn(16, generator=g) * 3
        return {'layer1': torch.zeros(n, 1, 8, 8), 'layer2': torch.zeros(n, 1, 4, 4), 'layer3': x}
    psdl = PSDL((1, 1, 16), 'single', 'layer3', iterations=3, image_size=16)
    assert (psdl.d, psdl.n_nonzero) == (4, 4)
    state = psdl.fit(feats(40))
    assert state['dictionaries'].shape == (4, 16, 16) and state['cov'].shape == (4, 2, 2)
    # the statistics are the mean and unbiased covariance (+0.01 I) of (L1, error) pairs
    psdl.load_state(state)
    scores = psdl.patch_scores(feats(2, odd=True))
    assert scores[0, 1, 1] == scores.max() and scores[0, 1, 1] > 3 * scores[1].max()
    d = torch.from_numpy(state['dictionaries'][:1]).double()
    y = torch.randn(1, 16, 5, dtype=torch.float64, generator=g)
    x = torch.randn(1, 16, 5, dtype=torch.float64, generator=g)
    pairs = code_pairs(d, y, x)[0].numpy()
    np.testing.assert_allclose(pairs[:, 0], np.abs(x[0].numpy()).sum(0))
    np.testing.assert_allclose(pairs[:, 1], ((d[0].numpy() @ x[0].numpy() - y[0].numpy()) ** 2).sum(0))


def test_state_cache_builds_reuses_and_rebuilds(tmp_path):
    calls = []
    def fit():
        calls.append(1)
        return {'a': np.arange(3.0)}
    key = {'method': 'x', 'train': [['c/1.png', 'ab']]}
    state, how = state_cache.load_or_fit(tmp_path, key, fit)
    assert how == 'built' and state['a'].tolist() == [0, 1, 2]
    assert state_cache.load_or_fit(tmp_path, key, fit)[1] == 'cached' and len(calls) == 1
    folder = state_cache.entry_folder(tmp_path, key)
    (folder / 'state.npz').write_bytes(b'damaged')
    assert state_cache.load_or_fit(tmp_path, key, fit)[1] == 'rebuilt' and len(calls) == 2
    assert state_cache.load_or_fit(tmp_path, key, fit, valid=lambda s: s['a'].shape == (4,))[1] == 'rebuilt'
    np.savez(folder / 'state.npz', a=np.array([{'pickled': 1}], dtype=object))     # would need pickle
    assert state_cache.load_or_fit(tmp_path, key, fit)[1] == 'rebuilt'
    other = state_cache.load_or_fit(tmp_path, {**key, 'method': 'y'}, fit)
    assert other[1] == 'built' and sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith('.')) == \
        sorted([folder.name, state_cache.entry_folder(tmp_path, {**key, 'method': 'y'}).name])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]       # no temporary folder left


def test_patchcore_keeps_its_coreset_search_and_its_answers_are_brute_forces(monkeypatch):
    g = torch.Generator().manual_seed(3)
    feats = lambda n: {'layer1': torch.randn(n, 4, 8, 8, generator=g), 'layer2': torch.randn(n, 6, 8, 8, generator=g),
                       'layer3': torch.randn(n, 6, 4, 4, generator=g)}
    core = PatchCore(0.25, image_size=16)
    core.load_state(core.fit(feats(6)))
    test = feats(3)
    few = core.score(test)                               # 192 queries x 96 rows: the brute-force scan
    assert isinstance(core.coreset_search(192), BruteForceSearch)
    monkeypatch.setattr(patchcore_module, 'BRUTE_PAIRS', 0)
    first = core.score(test)                             # the cell index, made once per loaded state
    search = core.coreset_search(192)
    again = core.score(test)
    assert isinstance(search, ExactSearch) and core.coreset_search(192) is search
    for a, b in ((first, again), (first, few)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    # the patch distances behind the maps: the nearest coreset row by an independent brute force
    rows = patch_features(test).permute(0, 2, 3, 1).reshape(-1, core.coreset.shape[1]).double()
    nearest = torch.cdist(rows, torch.from_numpy(core.coreset).double()).min(1).values.numpy()
    top = nearest.reshape(3, -1).max(1)
    knn = torch.cdist(rows.reshape(3, -1, rows.shape[1])[torch.arange(3), torch.from_numpy(nearest.reshape(3, -1).argmax(1))],
                      torch.from_numpy(core.coreset).double()).topk(min(9, len(core.coreset)), largest=False).values
    np.testing.assert_allclose(first[1], reweight(knn, torch.from_numpy(top)).numpy(), rtol=1e-5)
    core.load_state({'coreset': core.coreset[:5], 'selected': core.selected[:5]})
    assert core.coreset_search(192) is not search        # a new state gets its own search
