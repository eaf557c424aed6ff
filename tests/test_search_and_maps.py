"""Nearest-neighbour backends, the memory bank cache and the score maps."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from codes import mvtecad
from codes.errors import UserError
from codes.inspection import distribute_scores, score_maps
from codes.memory_bank import load_or_build
from codes.nearest_neighbor import NGTIndex, nearest_distances
from codes.networks import EncoderHier


def brute_force(queries, bank):
    d = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    return np.sqrt(d.min(1))


@pytest.fixture(scope='module')
def points():
    rng = np.random.default_rng(0)
    bank = np.tanh(rng.normal(size=(3000, 16))).astype(np.float32)
    queries = np.concatenate([bank[:50], bank[50:300] + rng.normal(0, 0.05, (250, 16)).astype(np.float32)])
    return queries, bank


def test_exact_search_is_exact_in_blocks(points, monkeypatch):
    queries, bank = points
    monkeypatch.setattr('codes.nearest_neighbor.CPU_BLOCKS', (64, 256))   # many blocks on both axes
    d = nearest_distances(queries.reshape(10, 30, 16), bank, 'exact')
    assert d.shape == (10, 30) and d.dtype == np.float32
    np.testing.assert_allclose(d.ravel(), brute_force(queries, bank), rtol=1e-6)
    assert np.all(d.ravel()[:50] == 0)      # identical rows give exactly 0, not float round-off


def test_ngt_finds_nearly_all_nearest_neighbours(points, tmp_path):
    queries, bank = points
    d = nearest_distances(queries, bank, 'ngt')
    exact = brute_force(queries, bank)
    assert np.mean(d <= exact + 1e-6) >= 0.95 and np.all(d >= exact - 1e-6)   # approximate, never below exact
    path = tmp_path / 'ngt32'
    nearest_distances(queries, bank, 'ngt', ngt_path=path)
    assert path.is_dir() and [p.name for p in tmp_path.iterdir()] == ['ngt32']
    built_at = path.stat().st_mtime_ns
    again = nearest_distances(queries, bank, 'ngt', ngt_path=path)     # opened, not rebuilt
    assert path.stat().st_mtime_ns == built_at and NGTIndex.open(path).index.get_num_of_objects() == len(bank)
    assert np.mean(again <= exact + 1e-6) >= 0.95   # NGT's answers may vary slightly from call to call


def test_faiss_backend_is_exact_or_says_how_to_install(points):
    queries, bank = points
    if importlib.util.find_spec('faiss') is None:
        with pytest.raises(UserError, match='--nn faiss needs faiss: pip install faiss-cpu'):
            nearest_distances(queries, bank, 'faiss')
    else:
        np.testing.assert_allclose(nearest_distances(queries, bank, 'faiss'), brute_force(queries, bank), rtol=1e-5,
                                   atol=1e-3)


def distribute_loop(scores, K, S, side=256):
    """The original's loop, as the oracle."""
    out = []
    for s in scores:
        total, count = np.zeros((side, side)), np.zeros((side, side))
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                total[i * S:i * S + K, j * S:j * S + K] += s[i, j]
                count[i * S:i * S + K, j * S:j * S + K] += 1
        out.append(total / np.maximum(count, 1))
    return np.asarray(out)


@pytest.mark.parametrize('K,S,n', [(64, 16, 13), (32, 4, 57), (32, 8, 20)])
def test_box_filter_maps_equal_the_loop(K, S, n):
    scores = np.random.default_rng(K + S).random((2, n, n)).astype(np.float32)
    np.testing.assert_allclose(distribute_scores(scores, K, S), distribute_loop(scores, K, S), rtol=1e-12)


def test_score_maps_sum_and_mult():
    rng = np.random.default_rng(0)
    maps = score_maps(rng.random((1, 13, 13)), rng.random((1, 57, 57)))
    assert set(maps) == {'64', '32', 'sum', 'mult'} and maps['mult'].shape == (1, 256, 256)
    np.testing.assert_array_equal(maps['sum'], maps['64'] + maps['32'])
    np.testing.assert_array_equal(maps['mult'], maps['64'] * maps['32'])


def test_memory_bank_is_cached_and_never_used_stale(synthetic_root, tmp_path):
    from codes.checkpoints import save_module
    import shutil
    root = tmp_path / 'data'
    shutil.copytree(synthetic_root, root)
    torch.manual_seed(0)
    enc = EncoderHier(64, 64).eval()
    ckpt = tmp_path / 'enchier.pkl'
    save_module(enc, ckpt)
    cache = tmp_path / 'cache'
    files = mvtecad.find_class(root, 'synthetic')

    bank, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    assert how == 'built' and bank.emb64.shape == (6, 13, 13, 64) and bank.emb32.shape == (6, 57, 57, 64)
    entries = list(cache.iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == ['bank.npz', 'key.json']
    again, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    assert how == 'cached' and np.array_equal(again.emb32, bank.emb32) and np.array_equal(again.mean, bank.mean)

    assert load_or_build(enc, ckpt, files, 'bicubic', 'cpu', cache)[1] == 'built'      # another filter
    first_train = files.train[0]
    mvtecad.Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(first_train)         # a training image changed
    changed, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    assert how == 'built' and not np.array_equal(changed.mean, bank.mean)
    assert len(list(cache.iterdir())) == 3

    entry = changed.ngt32.parent
    (entry / 'bank.npz').write_bytes(b'not an npz')                                   # a damaged entry
    rebuilt, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    assert how == 'rebuilt' and np.array_equal(rebuilt.emb64, changed.emb64)
    key = json.loads((entry / 'key.json').read_text())
    key['resize'] = 'bicubic'
    (entry / 'key.json').write_text(json.dumps(key))                                   # a key that does not match
    assert load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)[1] == 'rebuilt'
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]                  # no temporaries left
