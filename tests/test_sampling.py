"""The training pairs: where patches are cut, what noise they get, how the four datasets zip."""
import numpy as np
import pytest

from codes.datasets import (POS_TO_DIFF, DictionaryConcatDataset, PositionDataset, SVDD_Dataset,
                            generate_coords, generate_coords_position, generate_coords_svdd, training_datasets)


@pytest.mark.parametrize('K', [64, 32])
def test_coords_cover_the_whole_valid_range(K):
    rng = np.random.default_rng(0)
    hs, ws = zip(*(generate_coords(256, 256, K, rng) for _ in range(20000)))
    assert min(hs) == 0 and max(hs) == 256 - K
    assert min(ws) == 0 and max(ws) == 256 - K


@pytest.mark.parametrize('K', [64, 32])
def test_position_pairs_follow_the_eight_directions(K):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(5000):
        (h1, w1), (h2, w2), pos = generate_coords_position(256, 256, K, rng)
        seen.add(pos)
        assert 0 <= h2 <= 256 - K and 0 <= w2 <= 256 - K
        dh, dw = POS_TO_DIFF[pos]
        if K <= h1 <= 256 - 2 * K and K <= w1 <= 256 - 2 * K:   # far from the border: no clipping
            for d, delta in ((dh, h2 - h1), (dw, w2 - w1)):
                if d == 0:
                    assert delta == 0
                else:
                    assert np.sign(delta) == d and 3 * K // 4 <= abs(delta) < K
    assert seen == set(range(8))
    assert POS_TO_DIFF == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def test_position_pairs_are_clipped_at_the_border():
    rng = np.random.default_rng(2)
    clipped = 0
    for _ in range(3000):
        (h1, w1), (h2, w2), pos = generate_coords_position(256, 256, 64, rng)
        assert 0 <= h2 <= 192 and 0 <= w2 <= 192
        clipped += (h2 in (0, 192) and POS_TO_DIFF[pos][0] != 0) or (w2 in (0, 192) and POS_TO_DIFF[pos][1] != 0)
    assert clipped > 0


@pytest.mark.parametrize('K,J', [(64, 2), (32, 1)])
def test_svdd_jitter_is_never_zero_and_at_most_J(K, J):
    rng = np.random.default_rng(3)
    jitters = set()
    for _ in range(5000):
        (h1, w1), (h2, w2) = generate_coords_svdd(256, 256, K, rng)
        assert 0 <= h2 <= 256 - K and 0 <= w2 <= 256 - K
        if 0 < h1 < 256 - K - J and 0 < w1 < 256 - K - J and h1 >= J and w1 >= J:
            jitters.add((h2 - h1, w2 - w1))
    expected = {(a, b) for a in range(-J, J + 1) for b in range(-J, J + 1)} - {(0, 0)}
    assert jitters == expected


def _constant_images(n=3, value=0.25):
    return np.full((n, 3, 256, 256), value, np.float32)


def test_position_items_have_noise_svdd_items_do_not():
    x = _constant_images()
    pos = PositionDataset(x, K=32, repeat=2, seed=0)
    svdd = SVDD_Dataset(x, K=64, repeat=2, seed=0)
    assert len(pos) == len(svdd) == 6
    p1, p2, label = pos[4]
    assert p1.shape == p2.shape == (3, 32, 32) and p1.dtype == np.float32
    assert label.shape == () and 0 <= int(label) < 8
    for p in (p1, p2):
        std = float((p - 0.25).std())
        assert 0.015 < std < 0.03     # shift and per-pixel noise, each N(0, 0.02)
    s1, s2 = svdd[4]
    assert s1.shape == s2.shape == (3, 64, 64) and s1.dtype == np.float32
    assert np.array_equal(s1, x[0, :, :64, :64]) and np.array_equal(s2, s1)


def test_items_are_functions_of_seed_epoch_and_index():
    x = np.random.default_rng(0).normal(size=(2, 3, 256, 256)).astype(np.float32)
    a, b = PositionDataset(x, K=64, seed=5), PositionDataset(x, K=64, seed=5)
    assert all(np.array_equal(u, v) for u, v in zip(a[1], b[1]))
    b.set_epoch(1)
    assert not np.array_equal(a[1][0], b[1][0])


def test_training_datasets_zip_the_four_kinds():
    x = _constant_images(2)
    ds = training_datasets(x, repeat=3, seed=0)
    assert isinstance(ds, DictionaryConcatDataset) and len(ds) == 6
    item = ds[5]
    assert list(item) == ['pos_64', 'pos_32', 'svdd_64', 'svdd_32']
    assert [a.shape for a in item['svdd_32']] == [(3, 32, 32)] * 2
    assert list(training_datasets(x, repeat=1, seed=0, with_svdd=False)[0]) == ['pos_64', 'pos_32']
