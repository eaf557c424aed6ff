"""Exact nearest-neighbour search that prunes: the bank is cut into k-means cells, and a query scans
only the cells that could hold a row nearer than the best it has found.

Why it is exact. A cell c (centroid c, radius r_c) is skipped for query q only when a rigorous lower
bound on ||q - x|| for every row x of c reaches the best distance already found: the triangle bound
||q - c|| - r_c, and the Voronoi bound (every row of c is nearer c than any other centroid j, so q is
at least (||q-c||^2 - ||q-j||^2) / (2 ||c-j||) from c's rows). Distances are computed in float32 for
speed, but always in coordinates centred on a nearby centroid (so float32 keeps the small distances
between near-identical patches), and every comparison carries the worst-case float32 error of that
computation (`GAMMA`). A query whose best and second-best rows are closer than that error is settled
again in float64 over the same cells. The answer: the truly nearest row (ties may pick another row at
the same distance), the same on every run and with any number of threads.

Why it is fast. Queries are handled in groups that share a cell, so each visited cell costs one
matrix product; identical bank rows (uniform background) are stored once; most queries settle after
their nearest cell and one or two more.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

INDEX_FORMAT = 1
# Worst-case relative error of a float32 squared distance ||a||^2 + ||b||^2 - 2 a.b in D dimensions,
# as a fraction of ||a||^2 + ||b||^2 (a dot product of D terms loses at most about D ulps).
def gamma(D: int) -> float:
    return (2 * D + 16) * 2.0 ** -24


ROW_CHUNK = 1 << 16     # rows per step when centring the bank (bounds the float64 temporaries)
# (query, cell) pairs held at once: queries are taken a round of groups at a time so that the pairs stay
# within this, however little the cells prune (a barely trained encoder's nearly constant codes: ~340
# cells per query); a bank whose cells prune well (~8 per query) is done in one round.
PAIR_BUDGET = 8_000_000
SCAN_BLOCK = 1 << 18    # distances per matrix product when scanning a cell (1 MB: measured best of 64k-1M)
FEW_QUERIES = 32        # cells with at most this many queries to scan are scanned several at a time
WINDOW_QUERIES = 32768  # queries whose candidates are computed together (in parallel), a group or more at a time
# Below this many queries per cell (up to a few dozen images' on bottle), queries are grouped by one of about
# sqrt(k) tops rather than by a near centroid: a group's set-up (~40 torch calls) is then paid ~sqrt(k) times,
# not k (bottle, 8 images: the search 2.9 -> 1.6 s); at evaluation's size both ways take the same time
SPARSE_QUERIES = 128
EARLY_CELLS = 2         # cells each query scans right after its nearest, before the rest are pruned
SLOW_SEARCH_S = 60.0    # an exact search estimated to take longer than this suggests --nn approx (one line)


def row_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bits (a random odd multiplier per 32-bit word; equal rows, equal hashes)."""
    words = np.ascontiguousarray(x).view(np.uint32).reshape(len(x), -1)
    multipliers = np.random.default_rng(12345).integers(1, 2 ** 32, words.shape[1], dtype=np.uint32) | np.uint32(1)
    out = np.empty(len(x), np.uint64)
    for sl in _chunks(len(x), 8192):            # in cache-sized pieces; uint32 products wrap around
        w = words[sl] * multipliers
        out[sl] = w.sum(1, dtype=np.uint64) ^ (w[:, ::2].sum(1, dtype=np.uint64) << np.uint64(32))
    return out


def unique_rows(x: np.ndarray, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(keep, inverse): ascending indices of the first occurrence of each distinct row (of each distinct
    (row, group) pair), and for every row the position in `keep` of a row equal to it."""
    n = len(x)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    h = row_hashes(x)
    if groups is not None:
        h = h * np.uint64(0x9E3779B97F4A7C15) + np.asarray(groups).astype(np.uint64)
    order = np.argsort(h, kind='stable')
    same = h[order[1:]] == h[order[:-1]]
    pairs = np.flatnonzero(same)          # rows are compared only where hashes agree, a chunk at a time
    for sl in _chunks(len(pairs)):
        p = pairs[sl]
        same[p] = np.all(x[order[p + 1]] == x[order[p]], axis=1)
    if groups is not None:
        same &= groups[order[1:]] == groups[order[:-1]]
    starts_run = np.r_[True, ~same]              # equal neighbours in hash order collapse onto the first
    run = np.cumsum(starts_run) - 1
    firsts = order[starts_run]
    by_index = np.argsort(firsts, kind='stable')
    rank = np.empty_like(by_index)
    rank[by_index] = np.arange(len(by_index))
    inverse = np.empty(n, np.int64)
    inverse[order] = rank[run]
    return firsts[by_index], inverse


@dataclass
class CellIndex:
    """The bank's rows sorted by cell and centred on their centroid, with what the bounds need."""
    centroids: np.ndarray     # (k, D) float64
    radius: np.ndarray        # (k,) float64: max distance of a cell's rows to its centroid
    home_gap: np.ndarray      # (k,) float64: max distance of a cell's centroid to the centroid its rows were
                              #   compared from (see `assign`); enters the Voronoi bound's error margin
    rows: np.ndarray          # (n,) int64: bank row of each sorted position (the first copy of duplicates)
    starts: np.ndarray        # (k + 1,) int64: cell c holds sorted positions starts[c]:starts[c+1]
    n_bank: int               # rows of the bank it was built from
    centred: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # ^ the sorted rows minus their centroid (float32) and their squared norms, made on first search
    coarse: Coarse | None = field(default=None, repr=False)     # groups of centroids, made on first search

    # ---- building
    @classmethod
    def build(cls, bank: np.ndarray, groups: np.ndarray | None = None, seed: int = 0,
              cells: int | None = None, background: bool = False) -> CellIndex:
        """k-means cells (about sqrt(n) of them, seeded) over the distinct rows of `bank` (M, D) float32.
        `background`: built beside other torch work, so torch's thread count is left as it is."""
        import faiss
        bank = np.ascontiguousarray(bank, np.float32)
        keep = unique_rows(bank, groups)[0]
        n, D = len(keep), bank.shape[1]
        k = max(1, min(n, cells or round(math.sqrt(n))))
        # the mean in float64, a chunk at a time (a float64 copy of a 3M-row bank would be 1.6 GB)
        mean = sum((bank[keep[sl]].sum(0, dtype=np.float64) for sl in _chunks(n)), np.zeros(D)) / max(n, 1)
        if k == 1:
            centroids = mean[None, :]
        else:
            sample = np.random.default_rng(seed).choice(n, min(n, 32 * k), replace=False)
            train = (bank[keep[np.sort(sample)]] - mean).astype(np.float32)
            km = faiss.Kmeans(D, k, niter=10, seed=seed, max_points_per_centroid=32, min_points_per_centroid=1,
                              verbose=False)
            km.train(train)
            centroids = km.centroids.astype(np.float64) + mean
        # float32-representable centroids: rows and queries are centred on them in float32 without rounding
        # the centroid (a float32 difference of nearby float32 numbers is exact or nearly so)
        centroids = centroids.astype(np.float32).astype(np.float64)
        with worker_pool(set_threads=not background) as pmap:
            cell, home_gap = assign(bank, keep, centroids, pmap)
        used = np.bincount(cell, minlength=len(centroids)) > 0      # drop empty cells: the rest stay Voronoi cells
        remap = np.cumsum(used) - 1
        centroids, cell = centroids[used], remap[cell]
        order = np.argsort(cell, kind='stable')
        rows, cell = keep[order], cell[order]
        starts = np.searchsorted(cell, np.arange(len(centroids) + 1))
        radius = np.zeros(len(centroids))
        gap = np.zeros(len(centroids))
        np.maximum.at(gap, cell, home_gap[order])
        index = cls(centroids, radius, gap, rows, starts, len(bank))
        for sl in _chunks(len(rows)):
            d = np.linalg.norm(bank[rows[sl]] - centroids[cell[sl]], axis=1)
            np.maximum.at(radius, cell[sl], d)
        return index

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild the index around the same bank (for caching, no pickle)."""
        return {'centroids': self.centroids, 'radius': self.radius, 'home_gap': self.home_gap, 'rows': self.rows,
                'starts': self.starts, 'meta': np.array([INDEX_FORMAT, self.n_bank], np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], bank_rows: int) -> CellIndex | None:
        """The index saved by `arrays()`, or None if it is of another format or another bank's size."""
        try:
            fmt, n_bank = (int(v) for v in arrays['meta'])
            index = cls(arrays['centroids'], arrays['radius'], arrays['home_gap'], arrays['rows'], arrays['starts'],
                        n_bank)
        except (KeyError, ValueError, TypeError):
            return None
        k = len(index.centroids)
        if (fmt != INDEX_FORMAT or n_bank != bank_rows or index.starts.shape != (k + 1,) or index.starts[-1] !=
                len(index.rows) or len(index.rows) and (index.rows.min() < 0 or index.rows.max() >= n_bank)):
            return None
        return index

    # ---- searching
    def centre(self, bank: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The sorted bank rows minus their cell's centroid (computed in float64, kept in float32), and
        their squared norms: made once, on first use."""
        if self.centred is None:
            cell = np.repeat(np.arange(len(self.centroids)), np.diff(self.starts))
            out = np.empty((len(self.rows), bank.shape[1]), np.float32)
            c32 = self.centroids.astype(np.float32)
            for sl in _chunks(len(self.rows)):
                np.subtract(bank[self.rows[sl]], c32[cell[sl]], out=out[sl])
            self.centred = torch.from_numpy(out), torch.from_numpy(np.einsum('ij,ij->i', out, out))
        return self.centred

    def coarse_groups(self) -> Coarse:
        if self.coarse is None:
            self.coarse = Coarse.of(self.centroids)
        return self.coarse

    def search(self, bank: np.ndarray, queries: np.ndarray, query_groups: np.ndarray | None = None,
               bank_groups: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
        """Index of a nearest bank row for each query row (float32 (n, D)); with groups, rows of the query's
        own group are never its neighbour (-1 where no row is left). eps > 0: a row at most (1 + eps) times
        as far as the nearest (certified: a cell is skipped only when (1 + eps) times a rigorous lower bound
        on its rows' distances reaches the found row's rigorous upper bound); eps = 0: exact."""
        return _Search(self, bank, queries, query_groups, bank_groups, eps).run()


@contextlib.contextmanager
def worker_pool(set_threads: bool = True):
    """A map over as many single-threaded workers as torch has threads. The work here is many modest
    matrix products: torch's own intra-op threads would meet at a barrier after each, which costs more
    than the work (and far more when the CPU is shared); a pool keeps every core busy instead.
    set_threads=False leaves torch's (process-wide) thread count alone, for work beside other torch work."""
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        if set_threads:
            torch.set_num_threads(1)
        try:
            yield pool.map
        finally:
            if set_threads:
                torch.set_num_threads(threads)


def _chunks(n: int, size: int = ROW_CHUNK):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def relative_sqdist(points: np.ndarray, origin: np.ndarray, centroids: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared distances (n, k) float32 from `points` to `centroids`, computed with `origin` subtracted
    first (in float64) so that float32 keeps the small differences; also ||p - o||^2 (n,) and ||c - o||^2 (k,)."""
    o = origin.astype(np.float32)
    p = torch.from_numpy(np.asarray(points, np.float32)) - torch.from_numpy(o)
    c = torch.from_numpy((centroids - o).astype(np.float32))
    pn, cn = (p * p).sum(1), (c * c).sum(1)
    d = torch.addmm(cn[None, :], p, c.T, alpha=-2).add_(pn[:, None]).clamp_(min=0)
    return d, pn, cn


@dataclass
class Coarse:
    """About sqrt(k) groups of centroids (k-means over the centroids): `tops` (t, D) float64, and the group
    of each centroid. A cheap way to a centroid near a point, and origins for queries spread thin."""
    origin: np.ndarray        # (D,) the centroids' mean
    tops: np.ndarray | None   # (t, D) float64; None when k <= 64 (every centroid is compared directly)
    group_of: np.ndarray | None

    @classmethod
    def of(cls, centroids: np.ndarray, seed: int = 0) -> Coarse:
        k, origin = len(centroids), centroids.mean(0)
        if k <= 64:
            return cls(origin, None, None)
        import faiss
        km = faiss.Kmeans(centroids.shape[1], round(math.sqrt(k)), niter=10, seed=seed, verbose=False,
                          min_points_per_centroid=1)
        km.train((centroids - origin).astype(np.float32))
        tops = km.centroids.astype(np.float64) + origin
        return cls(origin, tops, relative_sqdist(centroids, origin, tops)[0].numpy().argmin(1))

    def top(self, source: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """The nearest top of each point source[idx] (tops must exist)."""
        return np.concatenate([relative_sqdist(source[idx[sl]], self.origin, self.tops)[0].numpy().argmin(1)
                               for sl in _chunks(len(idx))] or [np.zeros(0, np.int64)])

    def home(self, source: np.ndarray, idx: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        """A centroid near each point source[idx] (not necessarily the nearest): the nearest of the tops, then
        the nearest centroid of that top's group. It only serves as an origin for `relative_sqdist`."""
        if self.tops is None:
            return np.concatenate([relative_sqdist(source[idx[sl]], self.origin, centroids)[0].numpy().argmin(1)
                                   for sl in _chunks(len(idx))] or [np.zeros(0, np.int64)])
        top = self.top(source, idx)
        out = np.empty(len(idx), np.int64)
        for t in np.unique(top):
            members = np.flatnonzero(self.group_of == t)
            if len(members) == 0:
                members = np.arange(len(centroids))
            pts = np.flatnonzero(top == t)
            for sl in _chunks(len(pts)):
                near = relative_sqdist(source[idx[pts[sl]]], self.tops[t], centroids[members])[0].numpy().argmin(1)
                out[pts[sl]] = members[near]
        return out


def assign(bank: np.ndarray, keep: np.ndarray, centroids: np.ndarray, pmap=map) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid of each kept bank row, computed relative to a nearby centroid (so its float32
    error is small), and the distance from that nearby centroid to the chosen one (the error margin's scale)."""
    home = Coarse.of(centroids).home(bank, keep, centroids)
    order = np.argsort(home, kind='stable')
    bounds = np.searchsorted(home[order], np.arange(len(centroids) + 1))
    groups = [(a, order[bounds[a]:bounds[a + 1]][sl]) for a in range(len(centroids))
              for sl in _chunks(int(bounds[a + 1] - bounds[a]))]

    def nearest(a: int, rows: np.ndarray) -> np.ndarray:
        return relative_sqdist(bank[keep[rows]], centroids[a], centroids)[0].numpy().argmin(1)

    cell = np.empty(len(keep), np.int64)
    gap = np.empty(len(keep))
    for (a, rows), found in zip(groups, pmap(nearest, [a for a, _ in groups], [r for _, r in groups])):
        cell[rows] = found
        gap[rows] = np.linalg.norm(centroids[found] - centroids[a], axis=1)
    return cell, gap


class _Search:
    """One search's state: each query's best and second-best float32 squared distance (relative to the
    scanned cell's centroid), their error bounds, and every (query, cell) pair that may hold its neighbour."""

    def __init__(self, index: CellIndex, bank: np.ndarray, queries: np.ndarray,
                 query_groups: np.ndarray | None, bank_groups: np.ndarray | None, eps: float = 0.0):
        self.ix = index
        if not eps >= 0:
            raise ValueError(f'eps must be >= 0, not {eps}')
        self.eps = float(eps)
        # float32 factor with fl(bound * relax) <= bound * (1 + eps): the two roundings (of the factor and of
        # the product, 2^-24 each) are covered by the 2^-21 taken off
        self.relax = np.float32((1 + self.eps) * (1 - 2.0 ** -21)) if self.eps > 0 else None
        self.bank = np.ascontiguousarray(bank, np.float32)
        self.D = self.bank.shape[1]
        self.gamma = gamma(self.D)
        queries = np.ascontiguousarray(queries, np.float32)
        if query_groups is None:
            self.keep, self.inverse = unique_rows(queries)       # identical queries are answered once
            self.qgroups = self.bgroups = None
        else:
            self.keep, self.inverse = np.arange(len(queries)), np.arange(len(queries))
            self.qgroups = np.asarray(query_groups, np.int64).reshape(-1)
            self.bgroups = np.asarray(bank_groups, np.int64).reshape(-1)[index.rows]
        self.q = queries[self.keep]
        n = len(self.q)
        self.best = np.full(n, np.inf, np.float32)
        self.second = np.full(n, np.inf, np.float32)
        self.best_err = np.zeros(n, np.float32)         # float32 error bound of `best`
        self.max_err = np.zeros(n, np.float32)          # largest error bound of any row scanned for the query
        self.best_pos = np.full(n, -1, np.int64)        # sorted position of the best row
        self.rows, self.row_norms = index.centre(self.bank)
        self.qt = torch.from_numpy(self.q)
        self.c32 = torch.from_numpy(index.centroids.astype(np.float32))
        self.radius = torch.from_numpy(index.radius).float()
        self.between = torch.cdist(torch.from_numpy(index.centroids), torch.from_numpy(index.centroids)).float()
        self.margin = self.gamma * (4 * torch.from_numpy(index.radius) ** 2
                                    + 7 * torch.from_numpy(index.home_gap) ** 2).float()

    def scan_cell(self, c: int, qi: np.ndarray) -> tuple[np.ndarray, ...]:
        """Queries `qi` against every row of cell c: float32 matrix products of at most SCAN_BLOCK distances
        (a popular cell can have 100k queries); for each query the smallest squared distance, its sorted
        position, the second smallest and their float32 error bound.
        Reads only what does not change during a search, so cells can be scanned in parallel."""
        lo, hi = int(self.ix.starts[c]), int(self.ix.starts[c + 1])
        v1, i1, v2 = (np.empty(len(qi), t) for t in (np.float32, np.int64, np.float32))
        qn = np.empty(len(qi), np.float32)
        rows, norms = self.rows[lo:hi].T, self.row_norms[None, lo:hi]
        for sl in _chunks(len(qi), max(64, SCAN_BLOCK // max(hi - lo, 1))):   # 64: a product, not a vector
            part = qi[sl]
            q = self.qt[torch.from_numpy(part)] - self.c32[c]
            qn[sl] = (q * q).sum(1).numpy()
            # ||q||^2 is added after the minimum: it does not change which row is nearest
            s = torch.addmm(norms, q, rows, alpha=-2).numpy()
            if self.bgroups is not None:
                s[self.qgroups[part][:, None] == self.bgroups[None, lo:hi]] = np.inf
            # NumPy's row-wise argmin is vectorised (an order of magnitude faster than torch's min with indices)
            best = s.argmin(1)
            r = np.arange(len(part))
            v1[sl] = s[r, best]
            s[r, best] = np.inf
            v2[sl] = s.min(1) if hi - lo > 1 else np.inf
            i1[sl] = best
        err = (qn + np.float32(self.ix.radius[c]) ** 2) * np.float32(self.gamma)
        return qi, v1 + qn, i1 + lo, v2 + qn, err

    def scan_cells(self, cells: np.ndarray, parts: list[np.ndarray]) -> tuple[np.ndarray, ...]:
        """scan_cell for several cells with few queries each, in one batched product: the cells' rows padded
        to the longest (padding at infinite distance), their queries to the most numerous."""
        ix, m = self.ix, len(cells)
        lo, sizes = ix.starts[cells], ix.starts[cells + 1] - ix.starts[cells]
        counts = np.array([len(p) for p in parts])
        L, Q = int(sizes.max()), int(counts.max())
        valid = np.arange(L) < sizes[:, None]
        idx = np.where(valid, lo[:, None] + np.arange(L), lo[:, None])         # (m, L) sorted positions
        tidx, tcells = torch.from_numpy(idx), torch.from_numpy(cells)
        norms = self.row_norms[tidx].masked_fill_(torch.from_numpy(~valid), float('inf'))
        qvalid = np.arange(Q) < counts[:, None]
        qidx = np.zeros((m, Q), np.int64)
        qidx[qvalid] = np.concatenate(parts)
        q = self.qt[torch.from_numpy(qidx)] - self.c32[tcells][:, None, :]      # (m, Q, D)
        qn = (q * q).sum(2).numpy()
        s = torch.baddbmm(norms[:, None, :], q, self.rows[tidx].transpose(1, 2), alpha=-2).numpy()   # (m, Q, L)
        if self.bgroups is not None:
            s[self.qgroups[qidx][:, :, None] == self.bgroups[idx][:, None, :]] = np.inf
        best = s.argmin(2)
        v1 = np.take_along_axis(s, best[..., None], 2)[..., 0]
        np.put_along_axis(s, best[..., None], np.float32(np.inf), 2)
        v2 = s.min(2)
        err = (qn + ix.radius[cells].astype(np.float32)[:, None] ** 2) * np.float32(self.gamma)
        return qidx[qvalid], (v1 + qn)[qvalid], (best + lo[:, None])[qvalid], (v2 + qn)[qvalid], err[qvalid]

    def merge(self, qi: np.ndarray, v1: np.ndarray, pos: np.ndarray, v2: np.ndarray, err: np.ndarray) -> None:
        """Folds scan results (a query may appear several times) into the queries' state. As if merged one row
        at a time in sorted order: on equal distances the earlier row (lower position) is kept."""
        if len(qi) == 0:
            return
        order = np.lexsort((pos, v1, qi))
        qi, v1, pos, v2, err = qi[order], v1[order], pos[order], v2[order], err[order]
        first = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
        uq, b1 = qi[first], v1[first]
        # the second smallest of the new values: the best entry's own second, or the next entry's best
        nxt = np.minimum(first + 1, len(qi) - 1)
        b2 = np.minimum(v2[first], np.where((first + 1 < len(qi)) & (qi[nxt] == uq), v1[nxt], np.float32(np.inf)))
        old1, old2 = self.best[uq], self.second[uq]
        better = b1 < old1
        self.second[uq] = np.where(better, np.minimum(old1, b2), np.minimum(old2, b1))
        self.best[uq] = np.where(better, b1, old1)
        self.best_pos[uq] = np.where(better, pos[first], self.best_pos[uq])
        self.best_err[uq] = np.where(better, err[first], self.best_err[uq])
        self.max_err[uq] = np.maximum(self.max_err[uq], np.maximum.reduceat(err, first))

    def scan_pairs(self, pq: np.ndarray, pc: np.ndarray) -> None:
        """Scans every (query, cell) pair: a cell with many queries in its own products, cells with few
        together (grouped by size so that little is padded), jobs in parallel, merged at once."""
        if len(pq) == 0:
            return
        order = np.argsort(pc, kind='stable')
        pq, pc = pq[order], pc[order]
        cuts = np.flatnonzero(np.diff(pc)) + 1
        cells, parts = pc[np.r_[0, cuts]], np.split(pq, cuts)
        counts = np.diff(np.r_[0, cuts, len(pq)])
        sizes = self.ix.starts[cells + 1] - self.ix.starts[cells]
        jobs = [(self.scan_cell, (int(c), p)) for c, p, n in zip(cells, parts, counts) if n > FEW_QUERIES]
        few = np.flatnonzero(counts <= FEW_QUERIES)
        # by query count (in powers of two), then size: what a batch pads is small
        few = few[np.lexsort((sizes[few], np.ceil(np.log2(counts[few]))))]
        start, L, Q = 0, 0, 0
        for i, j in enumerate(few):
            L2, Q2 = max(L, int(sizes[j])), max(Q, int(counts[j]))
            if i > start and (i - start + 1) * L2 * max(Q2, self.D // 4) > SCAN_BLOCK:
                jobs.append((self.scan_cells, (cells[few[start:i]], [parts[t] for t in few[start:i]])))
                start, L2, Q2 = i, int(sizes[j]), int(counts[j])
            L, Q = L2, Q2
        if len(few) > start:
            jobs.append((self.scan_cells, (cells[few[start:]], [parts[t] for t in few[start:]])))
        results = list(self.map(lambda job: job[0](*job[1]), jobs))
        self.merge(*(np.concatenate(x) for x in zip(*results)))

    def relaxed(self, bound):
        """The lower bound as the stopping rule uses it: times (1 + eps) (rounded down) when approximate."""
        return bound if self.relax is None else bound * self.relax

    def limit(self, t: np.ndarray | slice = slice(None)) -> np.ndarray:
        """No row nearer than this can exist for the query beyond what it has found (float32 error included)."""
        return np.sqrt(self.best[t] + self.best_err[t])

    def nearest_cells(self, qi: np.ndarray, origin: np.ndarray) -> np.ndarray:
        """Each query's nearest centroid, from distances taken relative to centroid `origin` (near them)."""
        return relative_sqdist(self.q[qi], origin, self.ix.centroids)[0].numpy().argmin(1)

    def next_cells(self, qi: np.ndarray, origin: np.ndarray, count: int = 8) -> np.ndarray:
        """The `count` nearest centroids of each query (for queries whose nearest cell held no usable row)."""
        d = relative_sqdist(self.q[qi], origin, self.ix.centroids)[0]
        return torch.topk(d, min(count, len(self.ix.centroids)), dim=1, largest=False)[1].numpy()

    def candidates(self, qi: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, ...]:
        """(query, cell, lower bound, stage) of every cell that may still hold a row nearer than what each query
        has found; stage 1: scan next, 2: scan if still needed. Reads the state, writes nothing."""
        ix, g = self.ix, self.gamma
        d, qn, cn = relative_sqdist(self.q[qi], origin, ix.centroids)
        jn = d.numpy().argmin(1)
        j = torch.from_numpy(jn)
        limit = torch.from_numpy(self.limit(qi))
        rows = torch.arange(len(qi))
        # d less its float32 error: a lower bound on the true squared distance to each centroid
        low = d.sub_(cn[None, :] * g).sub_(qn[:, None] * g)
        up_j = low[rows, j] + 2 * g * (qn + cn[j])          # an upper bound on the distance to j
        tri = low.clamp(min=0).sqrt_().sub_(self.radius[None, :])       # triangle bound, densely
        r, c = torch.nonzero(tri < limit[:, None], as_tuple=True)
        jr = j[r]
        between = self.between[jr, c]
        # Voronoi bound against j for the survivors: rows of c are nearer c than j (up to the assignment's error)
        vor = (low[r, c] - up_j[r] - self.margin[c] - 2 * g * between ** 2) / (2 * between)
        bound = torch.maximum(tri[r, c], torch.nan_to_num(vor, nan=0.0, posinf=0.0, neginf=0.0)).clamp_(min=0)
        bound = bound * (1 - 2.0 ** -20) - 2.0 ** -20 * self.radius[c]        # the bound's own rounding
        keep = (self.relaxed(bound) < limit[r]) & (c != jr)
        r, c, bound = r[keep].numpy(), c[keep].numpy(), bound[keep].numpy()
        # the EARLY_CELLS most promising cells of each query are scanned first, to tighten its limit
        order = np.lexsort((bound, r))
        r, c, bound = r[order], c[order], bound[order]
        first_of = np.searchsorted(r, r)
        stage = np.where(np.arange(len(r)) - first_of < EARLY_CELLS, 1, 2).astype(np.int8)
        return qi[r], c, bound.astype(np.float32), stage

    def run(self) -> np.ndarray:
        ix, n, k = self.ix, len(self.q), len(self.ix.centroids)
        with worker_pool() as pmap:
            self.map = pmap
            # queries in groups, each computed relative to one origin near its members (float32 keeps the
            # small differences): a near centroid, or for queries spread thin a top
            coarse = ix.coarse_groups()
            if coarse.tops is not None and n < SPARSE_QUERIES * k:
                key, origin_of = coarse.top(self.q, np.arange(n)), coarse.tops
            else:
                key, origin_of = coarse.home(self.q, np.arange(n), ix.centroids), ix.centroids
            order = np.argsort(key, kind='stable')
            cuts = np.searchsorted(key[order], np.arange(len(origin_of) + 1))
            groups = [(origin_of[a], order[cuts[a]:cuts[a + 1]][sl]) for a in range(len(origin_of))
                      for sl in _chunks(int(cuts[a + 1] - cuts[a]), 8192)]
            origins, members = [a for a, _ in groups], [m for _, m in groups]
            # 1. each query's nearest cell
            nearest = list(pmap(self.nearest_cells, members, origins))
            done_q, done_c = list(members), list(nearest)
            self.scan_pairs(np.concatenate(members or [np.zeros(0, np.int64)]),
                            np.concatenate(nearest or [np.zeros(0, np.int64)]))
            # 2. queries whose nearest cell held nothing usable (leave-one-out): their next cells
            lost = [(a, m[np.isinf(self.best[m])]) for a, m in groups]
            lost = [(a, m) for a, m in lost if len(m)]
            if lost and k > 1:
                nxt = list(pmap(self.next_cells, [m for _, m in lost], [a for a, _ in lost]))
                lq = [np.repeat(m, c.shape[1]) for (_, m), c in zip(lost, nxt)]
                lc = [c.ravel() for c in nxt]
                self.scan_pairs(np.concatenate(lq), np.concatenate(lc))
                done_q += lq
                done_c += lc
            # 3. every other cell that may hold a nearer row: the most promising first, then the rest;
            # 4. near-ties, in float64, over every cell that may hold the neighbour. A round of query groups at a time.
            empty = np.zeros(0, np.int64)
            done_q, done_c = np.concatenate(done_q or [empty]), np.concatenate(done_c or [empty])
            # one cell: nothing is left to scan, one round settles every query
            rounds = (self.candidate_rounds(members, origins) if k > 1 else
                      [(np.arange(n), (empty, empty, np.zeros(0, np.float32), np.zeros(0, np.int8)))])
            started, answered, warned = time.perf_counter(), 0, False
            for queries, (pq, pc, plb, stage) in rounds:
                self.scan_pairs(pq[stage == 1], pc[stage == 1])
                rest = (stage == 2) & (self.relaxed(plb) < self.limit()[pq])
                self.scan_pairs(pq[rest], pc[rest])
                self.settle_round(queries, done_q, done_c, pq, pc, plb)
                answered += len(queries)
                warned = warned or self.warn_if_slow(time.perf_counter() - started, answered, n)
        pos = self.best_pos
        ids = np.where(pos >= 0, ix.rows[np.maximum(pos, 0)], -1)
        return ids[self.inverse]

    def warn_if_slow(self, elapsed: float, answered: int, n: int) -> bool:
        """After a round: one line on stderr when the exact search's remaining time, extrapolated from the
        queries answered so far, exceeds SLOW_SEARCH_S. True once it has spoken (or never will)."""
        remaining = elapsed * (n - answered) / max(answered, 1)
        if self.eps > 0 or answered >= n:
            return True
        if remaining <= SLOW_SEARCH_S:
            return False
        print(f'exact search: about {remaining:.0f} s left for {n - answered:,} of {n:,} distinct queries '
              f'(the cells barely prune on this bank); --nn approx with a loose --nn_eps (0.2 to 0.5: every distance '
              f'certified within 1.2 to 1.5 times the nearest) measured 1.2 to 2.4x faster on such banks',
              file=sys.stderr, flush=True)
        return True

    def candidate_rounds(self, members: list[np.ndarray], origins: list[np.ndarray]):
        """(queries, (query, cell, lower bound, stage) pairs) for runs of consecutive query groups whose pairs
        together reach PAIR_BUDGET; each group's candidates are computed once its own nearest cell is scanned.
        Groups are computed (in parallel) a window of at most WINDOW_QUERIES queries at a time."""
        held: list[tuple[np.ndarray, tuple[np.ndarray, ...]]] = []
        count, start = 0, 0
        while start < len(members):
            stop, size = start + 1, len(members[start])
            while stop < len(members) and size + len(members[stop]) <= WINDOW_QUERIES:
                size += len(members[stop])
                stop += 1
            for m, part in zip(members[start:stop], self.map(self.candidates, members[start:stop],
                                                              origins[start:stop])):
                held.append((m, part))
                count += len(part[0])
                if count >= PAIR_BUDGET:
                    yield self._round(held)
                    held, count = [], 0
            start = stop
        if held:
            yield self._round(held)

    @staticmethod
    def _round(held: list[tuple[np.ndarray, tuple[np.ndarray, ...]]]) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        return np.concatenate([m for m, _ in held]), tuple(np.concatenate(x) for x in zip(*(part for _, part in held)))

    def settle_round(self, queries: np.ndarray, done_q: np.ndarray, done_c: np.ndarray, pq: np.ndarray,
                     pc: np.ndarray, plb: np.ndarray) -> None:
        """Settles the near-ties among `queries`, whose every possible cell is in (done_q, done_c) (scanned
        first, bound 0) or in (pq, pc) with lower bounds plb."""
        mine = np.zeros(len(self.q), bool)
        mine[queries] = True
        first = mine[done_q]
        self.settle_ties(np.concatenate([done_q[first], pq]), np.concatenate([done_c[first], pc]),
                         np.concatenate([np.zeros(int(first.sum()), np.float32), plb]), mine)

    def settle_ties(self, pq: np.ndarray, pc: np.ndarray, plb: np.ndarray, among: np.ndarray) -> None:
        """Queries (of the mask `among`) whose best row is within float32 error of another are settled in
        float64 over every cell that may hold their neighbour; float64 ties go to the lowest sorted position,
        whatever the order."""
        tie = (self.second - self.best <= self.best_err + self.max_err) & np.isfinite(self.best) & among
        if self.eps > 0:
            # approx: no settling where float32 already certifies the ratio: the row found is within
            # best + best_err, every scanned row beyond best - max_err, every skipped one beyond limit / (1 + eps)
            hi = (self.best.astype(np.float64) + self.best_err) * (1 + 2.0 ** -20)
            tie &= ~(hi <= (1 + self.eps) ** 2 * (self.best.astype(np.float64) - self.max_err))
        if not tie.any():
            return
        # <=: a query whose best is an exact match (limit 0) keeps its own cells (bound 0)
        sel = tie[pq] & (plb <= self.limit()[pq])
        pq, pc = pq[sel], pc[sel]
        order = np.argsort(pc, kind='stable')
        pq, pc = pq[order], pc[order]
        best = np.full(len(self.q), np.inf)
        best_pos = self.best_pos.copy()
        best_pos[tie] = np.iinfo(np.int64).max
        cuts = np.flatnonzero(np.diff(pc)) + 1
        for qall, c in zip(np.split(pq, cuts), pc[np.r_[0, cuts]]):
            lo, hi = int(self.ix.starts[c]), int(self.ix.starts[c + 1])
            rows = torch.from_numpy(self.bank[self.ix.rows[lo:hi]].astype(np.float64) - self.ix.centroids[c])
            norms = (rows * rows).sum(1)
            for sl in _chunks(len(qall), 4096):
                qi = np.unique(qall[sl])
                q = torch.from_numpy(self.q[qi].astype(np.float64) - self.ix.centroids[c])
                s = torch.addmm(norms[None, :], q, rows.T, alpha=-2).add_((q * q).sum(1)[:, None])
                if self.bgroups is not None:
                    s.masked_fill_(torch.from_numpy(self.qgroups[qi][:, None] == self.bgroups[None, lo:hi]),
                                   float('inf'))
                v, m = s.min(1)
                v, m = v.numpy(), m.numpy() + lo
                better = (v < best[qi]) | ((v == best[qi]) & (m < best_pos[qi]))
                best[qi[better]] = v[better]
                best_pos[qi[better]] = m[better]
        self.best_pos = best_pos
