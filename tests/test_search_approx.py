"""The certified approximate search (`--nn approx`): every distance within [d, (1 + eps) d] of float64
brute force, on random, clustered and nearly constant banks; eps = 0 is the exact search; leave-one-out."""
from __future__ import annotations

import numpy as np
import pytest

from codes.cell_index import CellIndex
from codes.nearest_neighbor import ApproxSearch, BruteForceSearch, ExactSearch, distances_to, nearest_distances


def banks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    D = 16
    out = {'random': (rng.normal(size=(6000, D)), rng.normal(size=(1500, D)))}
    centres = rng.normal(size=(20, D)) * 3
    clustered = centres[rng.integers(0, 20, 6000)] + rng.normal(size=(6000, D)) * 0.05
    out['clustered'] = (clustered, centres[rng.integers(0, 20, 1500)] + rng.normal(size=(1500, D)) * 0.06)
    # nearly constant codes far from the origin (a barely trained encoder), with exact duplicates
    base = rng.normal(size=D) * 10
    flat = base + rng.normal(size=(6000, D)) * 1e-3
    flat[::7] = flat[0]
    out['nearly constant'] = (flat, base + rng.normal(size=(1500, D)) * 1.2e-3)
    return {k: (b.astype(np.float32), q.astype(np.float32)) for k, (b, q) in out.items()}


def truth(queries: np.ndarray, bank: np.ndarray, qg=None, bg=None) -> np.ndarray:
    """Float64 brute-force nearest distances, computed directly (no expansion)."""
    q, b = queries.astype(np.float64), bank.astype(np.float64)
    d = np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    if qg is not None:
        d[qg[:, None] == bg[None, :]] = np.inf
    return d.min(1)


@pytest.mark.parametrize('name', ['random', 'clustered', 'nearly constant'])
@pytest.mark.parametrize('eps', [0.01, 0.1, 0.5])
def test_within_certified_ratio(name: str, eps: float) -> None:
    bank, queries = banks()[name]
    d = truth(queries, bank)
    found = nearest_distances(queries, bank, 'approx', eps=eps).astype(np.float64)
    # float32 rounding of the returned distance itself: 2^-23 relative
    assert np.all(found >= d * (1 - 2 ** -22) - 1e-12)
    assert np.all(found <= d * (1 + eps) * (1 + 2 ** -22) + 1e-12)


@pytest.mark.parametrize('name', ['random', 'clustered', 'nearly constant'])
def test_eps_zero_is_exact(name: str) -> None:
    bank, queries = banks()[name]
    index = CellIndex.build(bank)
    exact = index.search(bank, queries)
    assert np.array_equal(ApproxSearch(index=index, eps=0.0).fit(bank).nearest_ids(queries), exact)
    assert np.array_equal(ExactSearch(index=index).fit(bank).nearest_ids(queries), exact)


def test_deterministic() -> None:
    bank, queries = banks()['nearly constant']
    a = ApproxSearch(eps=0.1).fit(bank).nearest_ids(queries)
    b = ApproxSearch(eps=0.1).fit(bank).nearest_ids(queries)
    assert np.array_equal(a, b)


@pytest.mark.parametrize('name', ['clustered', 'nearly constant'])
def test_leave_one_group_out(name: str) -> None:
    bank, queries = banks()[name]
    bg = np.repeat(np.arange(30), len(bank) // 30)
    qg = np.repeat(np.arange(30), len(queries) // 30)
    eps = 0.05
    d = truth(queries, bank, qg, bg)
    found = nearest_distances(queries, bank, 'approx', query_groups=qg, bank_groups=bg, eps=eps).astype(np.float64)
    assert np.all(found >= d * (1 - 2 ** -22) - 1e-12)
    assert np.all(found <= d * (1 + eps) * (1 + 2 ** -22) + 1e-12)
    ids = ApproxSearch(eps=eps).fit(bank, bg).nearest_ids(queries, qg, bg)
    assert np.all(bg[ids] != qg)
    brute = BruteForceSearch().fit(bank).nearest_ids(queries, qg, bg)
    assert np.allclose(distances_to(queries, bank, brute), d, rtol=1e-6)
