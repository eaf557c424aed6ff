"""PaDiM without all the images in float64 at once: per-chunk Gaussian sums, per-layer upsampling and batched
Mahalanobis scores against the plain computation (every image's embedding at once, as the code was before)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import mahalanobis as scipy_mahalanobis

from codes.methods import padim
from codes.gaussians import GaussianSums, fit_gaussians, mahalanobis, whitened_distances, whitening


def plain_embedding(features: dict[str, torch.Tensor], idx: list[int]) -> torch.Tensor:
    """Every layer upsampled whole to layer1's grid, all channels concatenated, then `idx` picked."""
    grid = features['layer1'].shape[-2:]
    parts = [x if x.shape[-2:] == grid else F.interpolate(x, size=grid, mode='bicubic', align_corners=False)
             for x in (features['layer1'], features['layer2'], features['layer3'])]
    return torch.cat(parts, dim=1)[:, idx]


def lite0_like(n: int, seed: int, grid: int = 16) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0's channels (24, 40, 112) on a smaller grid; layer3 with a large mean."""
    g = torch.Generator().manual_seed(seed)
    return {'layer1': torch.rand(n, 24, grid, grid, generator=g) * 3,
            'layer2': torch.randn(n, 40, grid // 2, grid // 2, generator=g).relu(),
            'layer3': torch.randn(n, 112, grid // 4, grid // 4, generator=g) * 0.5 + 6}


@pytest.mark.parametrize('chunk', [1, 7, 64])
def test_gaussian_sums_over_chunks_equal_the_plain_fit(chunk):
    """Chunked one-pass sums give np.cov's covariance, also for data far from zero (shifted sums)."""
    rng = np.random.default_rng(chunk)
    x = torch.from_numpy(1e4 + rng.normal(size=(5, 50, 6)) * rng.uniform(0.01, 3, size=6))
    sums = GaussianSums()
    for start in range(0, 50, chunk):
        sums.add(x[:, start:start + chunk])
    mean, cov = sums.gaussians(0.01)
    want_mean, want_cov = fit_gaussians(x, 0.01)
    np.testing.assert_allclose(mean.numpy(), want_mean.numpy(), rtol=1e-14)
    np.testing.assert_allclose(cov.numpy(), want_cov.numpy(), rtol=1e-9, atol=1e-12 * float(want_cov.abs().max()))
    for p in range(5):
        np.testing.assert_allclose(cov[p].numpy(), np.cov(x[p].numpy(), rowvar=False) + 0.01 * np.eye(6), rtol=1e-9)


def test_gaussian_sums_need_two_samples():
    sums = GaussianSums()
    sums.add(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match='at least 2 samples'):
        sums.gaussians()


def test_whitened_distances_equal_mahalanobis_and_scipy():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(4, 40, 5)))
    mean, cov = fit_gaussians(x, 0.01)
    queries = torch.from_numpy(rng.normal(size=(4, 7, 5)) * 2)
    got = whitened_distances(queries, mean, whitening(cov)).numpy()
    np.testing.assert_allclose(got, mahalanobis(queries, mean, cov).numpy(), rtol=1e-12)
    want = [[scipy_mahalanobis(q, mean[p].numpy(), np.linalg.inv(cov[p].numpy())) for q in queries[p].numpy()]
            for p in range(4)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_embedding_chunks_equal_the_plain_embedding():
    """Upsampling only the chosen channels, chunk by chunk, gives the plain embedding bit for bit."""
    features = lite0_like(11, 0)
    idx = padim.channel_subset(176, 100)
    chunks = list(padim.embedding_chunks(features, torch.tensor(idx), chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 3]
    assert torch.equal(torch.cat(chunks), plain_embedding(features, idx))
    assert torch.equal(padim.embedding(features, torch.tensor(idx)), plain_embedding(features, idx))


def test_padim_fit_and_scores_equal_the_plain_computation():
    """The stored (float32) mean and covariance and the distances equal those of every image's embedding in
    float64 at once (fit_gaussians and mahalanobis on it) to 1e-6 relative."""
    model = padim.PaDiM((24, 40, 112), 100, image_size=32)
    train, test = lite0_like(150, 1), lite0_like(40, 2)     # 150 images: 5 chunks of 32, the last partial
    state = model.fit(train)
    emb = plain_embedding(train, model.idx).double()
    mean, cov = fit_gaussians(emb.flatten(2).permute(2, 0, 1), padim.COV_EPS)
    assert state['mean'].dtype == np.float32 and tuple(state['grid']) == (16, 16)
    np.testing.assert_allclose(state['mean'], mean.float().numpy(), rtol=1e-6)
    np.testing.assert_allclose(state['cov'], cov.float().numpy(), rtol=1e-6, atol=1e-6 * float(cov.abs().max()))
    model.load_state(state)
    got = model.patch_scores(test)
    emb = plain_embedding(test, model.idx).double()
    want = mahalanobis(emb.flatten(2).permute(2, 0, 1), torch.from_numpy(state['mean']), torch.from_numpy(state['cov']))
    np.testing.assert_allclose(got, want.T.reshape(40, 16, 16).numpy(), rtol=1e-6)
    maps, scores = model.score(test)
    assert maps.shape == (40, 32, 32) and scores is None
