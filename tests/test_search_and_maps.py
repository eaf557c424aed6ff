"""Nearest-neighbour backends, the memory bank cache and the score maps."""
import json

import numpy as np
import pytest
import torch

from codes import mvtecad
from codes.errors import UserError
from codes.inspection import distribute_scores, score_maps
from codes.memory_bank import load_or_build
from codes.nearest_neighbor import NGTSearch, nearest_distances
from codes.networks import EncoderHier


def brute_force(queries, bank, query_groups=None, bank_groups=None):
    """Independent oracle: every squared distance in float64 by differences, then the minimum."""
    d = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    if query_groups is not None:
        d[query_groups[:, None] == bank_groups[None, :]] = np.inf
    return np.sqrt(d.min(1))


@pytest.fixture(scope='module')
def points():
    rng = np.random.default_rng(0)
    bank = np.tanh(rng.normal(size=(3000, 16))).astype(np.float32)
    queries = np.concatenate([bank[:50], bank[50:300] + rng.normal(0, 0.05, (250, 16)).astype(np.float32)])
    return queries, bank


def test_brute_force_is_exact_in_blocks(points, monkeypatch):
    queries, bank = points
    monkeypatch.setattr('codes.nearest_neighbor.CPU_BLOCKS', (64, 256))   # many blocks on both axes
    d = nearest_distances(queries.reshape(10, 30, 16), bank, 'brute')
    assert d.shape == (10, 30) and d.dtype == np.float32
    np.testing.assert_allclose(d.ravel(), brute_force(queries, bank), rtol=1e-6)
    assert np.all(d.ravel()[:50] == 0)      # identical rows give exactly 0, not float round-off


def random_banks():
    """(name, bank, queries): clustered and uniform, D=64 and D=2, duplicates and ties, one-row bank."""
    rng = np.random.default_rng(1)
    uniform = rng.random((4000, 64)).astype(np.float32)
    centres = rng.normal(size=(30, 64))
    clustered = (centres[rng.integers(0, 30, 5000)] + 0.02 * rng.normal(size=(5000, 64))).astype(np.float32)
    clustered = np.concatenate([clustered, clustered[:700], np.repeat(clustered[:1], 900, 0)])  # exact duplicates
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(40)), -1).reshape(-1, 2).astype(np.float32)  # D=2, ties
    tiny = (0.5 + 1e-4 * rng.normal(size=(3000, 64))).astype(np.float32)   # a barely trained encoder's codes
    cases = [
        ('uniform D=64', uniform, rng.random((600, 64)).astype(np.float32)),
        ('clustered with duplicates', clustered,
         np.concatenate([clustered[:200], clustered[200:400] + 1e-5 * rng.normal(size=(200, 64)).astype(np.float32),
                         (centres[:5] + rng.normal(size=(5, 64))).astype(np.float32)])),
        ('D=2 grid with ties', grid, (rng.random((500, 2)) * 41 - 0.5).round(1).astype(np.float32)),
        ('D=2 uniform', rng.random((5000, 2)).astype(np.float32), rng.random((800, 2)).astype(np.float32)),
        ('nearly constant codes', tiny, np.concatenate([tiny[:100], (0.5 + 1e-4 * rng.normal(size=(300, 64)))
                                                        .astype(np.float32)])),
        ('one-row bank', uniform[:1], uniform[:20]),
    ]
    return cases


@pytest.mark.parametrize('case', random_banks(), ids=lambda c: c[0])
def test_pruned_exact_search_equals_brute_force(case):
    _, bank, queries = case
    d = nearest_distances(queries, bank, 'exact')
    # the distance to the truly nearest row, exactly (float64 by differences, rounded to float32)
    np.testing.assert_array_equal(d, brute_force(queries, bank).astype(np.float32))


@pytest.mark.parametrize('case', [random_banks()[i] for i in (1, 4)], ids=lambda c: c[0])
def test_pruned_search_in_rounds_of_few_pairs_equals_brute_force(case, monkeypatch):
    """With a pair budget far below what the queries need, the queries go in many rounds (as a barely trained
    encoder's bank does at full size): every answer is still the nearest row, leave-one-out included."""
    from codes import cell_index
    _, bank, queries = case
    rounds = []
    original = cell_index._Search.candidate_rounds

    def counted(self, members, origins):
        for found in original(self, members, origins):
            rounds.append(len(found[0]))
            yield found
    monkeypatch.setattr(cell_index, 'PAIR_BUDGET', 1)
    monkeypatch.setattr(cell_index, 'WINDOW_QUERIES', 40)
    monkeypatch.setattr(cell_index._Search, 'candidate_rounds', counted)
    d = nearest_distances(queries, bank, 'exact')
    np.testing.assert_array_equal(d, brute_force(queries, bank).astype(np.float32))
    assert len(rounds) > 3 and sum(rounds) == len(np.unique(queries, axis=0))
    groups = np.arange(len(bank)) % 5
    d = nearest_distances(bank[:300], bank, 'exact', query_groups=groups[:300], bank_groups=groups)
    np.testing.assert_array_equal(d, brute_force(bank[:300], bank, groups[:300], groups).astype(np.float32))


@pytest.mark.parametrize('few, sparse', [(0, 0), (10 ** 9, 10 ** 9)], ids=['per cell, near origins',
                                                                        'batched cells, top origins'])
def test_either_way_of_scanning_and_grouping_equals_brute_force(few, sparse, monkeypatch):
    """Cells scanned one product each or several padded into one batched product, queries grouped around a
    near centroid or around one of the coarse tops (a single image's few queries): the same nearest rows,
    leave-one-out included."""
    from codes import cell_index
    monkeypatch.setattr(cell_index, 'FEW_QUERIES', few)
    monkeypatch.setattr(cell_index, 'SPARSE_QUERIES', sparse)
    for _, bank, queries in [random_banks()[i] for i in (1, 3)]:
        index = cell_index.CellIndex.build(bank)
        assert len(index.centroids) > 64        # so that the coarse tops exist
        d = nearest_distances(queries, bank, 'exact')
        np.testing.assert_array_equal(d, brute_force(queries, bank).astype(np.float32))
        groups = np.arange(len(bank)) % 5
        d = nearest_distances(bank[:300], bank, 'exact', query_groups=groups[:300], bank_groups=groups)
        np.testing.assert_array_equal(d, brute_force(bank[:300], bank, groups[:300], groups).astype(np.float32))


def test_leave_one_out_among_identical_rows_of_every_group():
    """Identical codes in every image (a flat background): each query's own row is excluded, an equal row of
    another image is at distance 0, and float32 ties at distance 0 are settled without a crash."""
    from codes.cell_index import CellIndex
    bank = np.concatenate([np.full((3, 4), 0.5, np.float32), np.random.default_rng(3).random((40, 4), np.float32)])
    groups = np.r_[0, 1, 2, np.arange(40) % 3]
    ids = CellIndex.build(bank, groups).search(bank, bank, groups, groups)
    assert np.all(groups[ids] != groups)
    d = np.sqrt(((bank.astype(np.float64) - bank[ids]) ** 2).sum(1))
    np.testing.assert_array_equal(d.astype(np.float32), brute_force(bank, bank, groups, groups).astype(np.float32))
    assert np.all(d[:3] == 0)
    assert len(CellIndex.build(bank[:0]).rows) == 0          # an empty bank gives an empty index


@pytest.mark.parametrize('case', random_banks()[:3], ids=lambda c: c[0])
def test_leave_one_group_out_equals_brute_force(case):
    _, bank, queries = case
    rng = np.random.default_rng(2)
    bank_groups = rng.integers(0, 7, len(bank))
    query_groups = rng.integers(0, 7, len(queries))
    # queries that are bank rows, with the row's own group: their own row must not count
    queries = np.concatenate([queries, bank[:100]])
    query_groups = np.concatenate([query_groups, bank_groups[:100]])
    d = nearest_distances(queries, bank, 'exact', query_groups=query_groups, bank_groups=bank_groups)
    np.testing.assert_array_equal(d, brute_force(queries, bank, query_groups, bank_groups).astype(np.float32))
    assert np.all(d[-100:] > 0) or len(np.unique(bank, axis=0)) < len(bank)


def test_exact_search_is_the_same_under_one_and_two_threads():
    import faiss
    _, bank, queries = random_banks()[1]
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        answers = []
        for n in (1, 2):
            torch.set_num_threads(n)
            faiss.omp_set_num_threads(n)
            answers.append(nearest_distances(queries, bank, 'exact'))
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
    np.testing.assert_array_equal(answers[0], answers[1])


def test_a_saved_cell_index_gives_the_same_answers(points):
    from codes.nearest_neighbor import ExactSearch
    queries, bank = points
    search = ExactSearch().fit(bank)
    again = ExactSearch.from_arrays(bank, {k: v.copy() for k, v in search.arrays().items()})
    np.testing.assert_array_equal(again.nearest_ids(queries), search.nearest_ids(queries))
    assert ExactSearch.from_arrays(bank[:-1], search.arrays()) is None          # another bank's size


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
    assert path.stat().st_mtime_ns == built_at and NGTSearch.open(path).get_num_of_objects() == len(bank)
    assert np.mean(again <= exact + 1e-6) >= 0.95   # NGT's answers may vary slightly from call to call


def test_unknown_search_method_is_refused(points):
    queries, bank = points
    with pytest.raises(UserError, match="--nn must be one of exact, approx, ngt, brute, not 'faiss'"):
        nearest_distances(queries, bank, 'faiss')


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

    entry = changed.folder
    (entry / 'bank.npz').write_bytes(b'not an npz')                                   # a damaged entry
    rebuilt, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    assert how == 'rebuilt' and np.array_equal(rebuilt.emb64, changed.emb64)
    key = json.loads((entry / 'key.json').read_text())
    key['resize'] = 'bicubic'
    (entry / 'key.json').write_text(json.dumps(key))                                   # a key that does not match
    assert load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)[1] == 'rebuilt'
    assert not [p for p in cache.iterdir() if p.name.startswith('.')]                  # no temporaries left


def test_exact_index_is_cached_in_the_entry_and_rebuilt_when_damaged(synthetic_root, tmp_path):
    from codes.checkpoints import save_module
    torch.manual_seed(0)
    enc = EncoderHier(64, 64).eval()
    ckpt = tmp_path / 'enchier.pkl'
    save_module(enc, ckpt)
    cache = tmp_path / 'cache'
    files = mvtecad.find_class(synthetic_root, 'synthetic')
    bank, _ = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    queries = bank.emb32[:2] + 0.01
    expected = nearest_distances(queries, bank.emb32.reshape(-1, 64), 'brute').ravel()
    np.testing.assert_array_equal(bank.distances('32', queries, 'exact').ravel(), expected)
    index = bank.folder / 'exact32.npz'
    assert index.is_file() and not [p for p in bank.folder.iterdir() if p.name.startswith('.')]
    written = index.stat().st_mtime_ns
    again, how = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    np.testing.assert_array_equal(again.distances('32', queries, 'exact').ravel(), expected)
    assert how == 'cached' and index.stat().st_mtime_ns == written                     # read, not rebuilt
    for damage in (b'not an npz', index.read_bytes()[:200]):                           # damaged, truncated
        index.write_bytes(damage)
        again, _ = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
        np.testing.assert_array_equal(again.distances('32', queries, 'exact').ravel(), expected)
        assert np.load(index, allow_pickle=False)['meta'][1] == bank.emb32.reshape(-1, 64).shape[0]
    # an index built on another bank of the same size is not used
    from codes.memory_bank import cached_exact_search
    other = bank.emb32.reshape(-1, 64)[::-1].copy()
    cached_exact_search(other, index, torch.device('cpu'))
    again, _ = load_or_build(enc, ckpt, files, 'nearest', 'cpu', cache)
    np.testing.assert_array_equal(again.distances('32', queries, 'exact').ravel(), expected)
