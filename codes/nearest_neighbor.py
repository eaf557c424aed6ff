"""Nearest-neighbour patch scoring: the L2 distance from each test embedding to the closest bank row.

One function, `nearest_distances`, and one small search object per method (fit / nearest_ids / arrays):
- `exact` (default): on the CPU, the pruned exact search of `cell_index.py` (k-means cells, bounds,
  float32 scans settled in float64): the truly nearest row, the same on every run and thread count;
  on CUDA, brute force in large float64 blocks on the GPU (23.5 TFLOP for bottle is seconds there);
- `approx`: the same cells with the relaxed stopping rule `(1 + eps) * bound >= best` (eps: `--nn_eps`):
  every returned distance is certified to be at most (1 + eps) times the nearest one (float32 errors
  included); faster only where the cells barely prune (nearly constant codes, texture-like classes), and there
  only with a loose eps (1.2-2.4x at eps 0.2-0.5; docs/search.md);
- `brute`: blockwise float64 brute force on any device, the test oracle;
- `ngt`: NGT's graph index (ANNG, L2, edge sizes 10/40: the original's settings), approximate; it
  replays the original's search for the paper's figures.
Each finds the nearest row; the distance to it is then computed exactly in float64.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .cell_index import CellIndex
from .embeddings import iter_batches
from .errors import UserError
from .state_cache import warn

METHODS = ('exact', 'approx', 'ngt', 'brute')
DEFAULT_EPS = 0.01        # approx: certified distance ratio 1 + eps
# Blocks of queries x bank rows for brute force: small enough to stay in cache on a CPU, large on a GPU.
CPU_BLOCKS = (1024, 1024)
CUDA_BLOCKS = (8192, 65536)
NGT_QUERY_CHUNK = 16384


def as_rows(embeddings: np.ndarray) -> np.ndarray:
    """(..., D) -> contiguous float32 (M, D)."""
    return np.ascontiguousarray(embeddings.reshape(-1, embeddings.shape[-1]), dtype=np.float32)


class BruteForceSearch:
    """Every query against every bank row, blockwise in float64 on `device`."""
    name = 'brute'

    def __init__(self, device: torch.device | str = 'cpu'):
        self.device = torch.device(device)
        self.bank: np.ndarray | None = None

    def fit(self, bank: np.ndarray) -> BruteForceSearch:
        self.bank = as_rows(bank)
        return self

    @torch.no_grad()
    def nearest_ids(self, queries: np.ndarray, query_groups: np.ndarray | None = None,
                    bank_groups: np.ndarray | None = None, desc: str = 'search') -> np.ndarray:
        # float64: in float32, ||q||^2 + ||b||^2 - 2 q.b loses the small distances that matter most.
        device = self.device
        q_block, b_block = CUDA_BLOCKS if device.type == 'cuda' else CPU_BLOCKS
        # centred on the bank's mean: the expansion's rounding scales with the norms, and near-identical
        # codes far from the origin would otherwise pick a row 1e-9 away over an identical one
        bank_t = torch.from_numpy(self.bank).to(device, torch.float64)
        centre = bank_t.mean(0)
        bank_t -= centre
        bank_sq = (bank_t ** 2).sum(1)
        qg = None if query_groups is None else torch.from_numpy(np.asarray(query_groups, np.int64)).to(device)
        bg = None if bank_groups is None else torch.from_numpy(np.asarray(bank_groups, np.int64)).to(device)
        ids = np.empty(len(queries), np.int64)
        for qs in tqdm(list(iter_batches(len(queries), q_block)), desc=desc, unit='block', leave=False, disable=None):
            q = torch.from_numpy(queries[qs]).to(device, torch.float64) - centre
            best = torch.full((len(q),), float('inf'), dtype=torch.float64, device=device)
            best_id = torch.full((len(q),), -1, dtype=torch.int64, device=device)
            for bs in iter_batches(len(bank_t), b_block):
                # ||b||^2 - 2 q.b: the squared distance less ||q||^2, which does not change the argmin
                value = torch.addmm(bank_sq[bs], q, bank_t[bs].T, alpha=-2)
                if qg is not None:
                    value.masked_fill_(qg[qs][:, None] == bg[bs][None, :], float('inf'))
                value, idx = value.min(1)
                better = value < best
                best = torch.where(better, value, best)
                best_id = torch.where(better, idx + bs.start, best_id)
            ids[qs] = best_id.cpu().numpy()
        return ids


class ExactSearch:
    """Exact nearest neighbours: the pruned cell index on the CPU, brute force on a GPU."""
    name = 'exact'
    eps = 0.0

    def __init__(self, device: torch.device | str = 'cpu', index: CellIndex | None = None):
        self.device = torch.device(device)
        self.index = index
        self.bank: np.ndarray | None = None
        self.groups: np.ndarray | None = None

    def fit(self, bank: np.ndarray, groups: np.ndarray | None = None, background: bool = False) -> ExactSearch:
        """Builds the cell index (CPU only; a few seconds for bottle's 679k rows). With `groups` (one per
        bank row), rows equal in value but of different groups are kept apart for leave-one-out search.
        `background`: built beside other torch work (torch's thread count is left alone)."""
        self.bank = as_rows(bank)
        self.groups = None if groups is None else np.asarray(groups, np.int64).reshape(-1)
        if self.device.type != 'cuda' and self.index is None:
            self.index = CellIndex.build(self.bank, self.groups, background=background)
        return self

    def prepare(self) -> ExactSearch:
        """Makes what the first query would otherwise make (the index's centred rows); NumPy only."""
        if self.index is not None:
            self.index.centre(self.bank)
        return self

    def nearest_ids(self, queries: np.ndarray, query_groups: np.ndarray | None = None,
                    bank_groups: np.ndarray | None = None, desc: str = 'search') -> np.ndarray:
        if self.device.type == 'cuda':
            return BruteForceSearch(self.device).fit(self.bank).nearest_ids(queries, query_groups, bank_groups, desc)
        if query_groups is not None and (self.groups is None or not np.array_equal(self.groups, bank_groups)):
            # the cached index merged equal rows of different groups: leave-one-out needs them apart
            other = ExactSearch(self.device).fit(self.bank, bank_groups)
            return other.index.search(self.bank, queries, query_groups, bank_groups, self.eps)
        return self.index.search(self.bank, queries, query_groups, bank_groups, self.eps)

    def arrays(self) -> dict[str, np.ndarray] | None:
        """The index's arrays, for caching beside the bank (None on a GPU, where no index is needed)."""
        return None if self.index is None else self.index.arrays()

    @classmethod
    def from_arrays(cls, bank: np.ndarray, arrays: dict[str, np.ndarray], device: torch.device | str = 'cpu'
                    ) -> ExactSearch | None:
        """The search over `bank` with a saved index, or None if the arrays do not fit this bank."""
        index = CellIndex.from_arrays(arrays, len(as_rows(bank)))
        if index is None:
            return None
        search = cls(device, index)
        search.bank = as_rows(bank)
        return search


class ApproxSearch(ExactSearch):
    """The exact search's cells with the relaxed stopping rule: every returned row is at most (1 + eps) times
    as far as the nearest (certified, float32 errors included), deterministic; eps = 0 is the exact search.
    It shares the exact search's cell index (and its cache file). On a GPU: brute force (exact)."""
    name = 'approx'

    def __init__(self, device: torch.device | str = 'cpu', index: CellIndex | None = None, eps: float = DEFAULT_EPS):
        super().__init__(device, index)
        if not eps >= 0:
            raise UserError(f'--nn_eps must be >= 0, not {eps}')
        self.eps = float(eps)

    @classmethod
    def of(cls, exact: ExactSearch, eps: float = DEFAULT_EPS) -> ApproxSearch:
        """The approximate search over a fitted exact search's bank and index (nothing is rebuilt)."""
        search = cls(exact.device, exact.index, eps)
        search.bank, search.groups = exact.bank, exact.groups
        return search


class NGTSearch:
    """An NGT graph index with the original's settings (ANNG, L2, edge sizes 10 for creation, 40 for search),
    kept on disk at `path` when given (opened if it holds the bank's rows, else built there)."""
    name = 'ngt'

    def __init__(self, path: Path | None = None):
        self.path = path
        self.index = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def fit(self, bank: np.ndarray) -> NGTSearch:
        bank = as_rows(bank)
        if self.path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix='patchsvdd-ngt-')
            self.index = self.build(bank, Path(self._tmp.name) / 'index')
        else:
            try:
                self.index = self.cached(bank, self.path)
            except (OSError, RuntimeError) as e:    # ngtpy reports a failed write as RuntimeError
                warn(f'cannot write the NGT index {self.path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}; '
                     'this run builds it in a temporary folder (or pass --no_cache)')
                self.path = None
                return self.fit(bank)
        return self

    @staticmethod
    def build(bank: np.ndarray, path: Path, save: bool = False):
        import ngtpy
        ngtpy.create(str(path), bank.shape[1])   # the defaults are the original's settings
        index = ngtpy.Index(str(path), log_disabled=True)
        index.batch_insert(as_rows(bank), num_threads=os.cpu_count() or 1)
        if save:
            index.save()
        return index

    @staticmethod
    def open(path: Path):
        import ngtpy
        return ngtpy.Index(str(path), read_only=True, log_disabled=True)

    @classmethod
    def cached(cls, bank: np.ndarray, path: Path):
        """Opens the index saved at `path` if it holds `bank`'s rows; else builds it beside and renames it there."""
        if path.exists():
            try:
                index = cls.open(path)
                if index.get_num_of_objects() == len(bank):
                    return index
            except RuntimeError:
                pass
            shutil.rmtree(path)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
        try:
            cls.build(bank, tmp / 'index', save=True).close()
            os.replace(tmp / 'index', path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    def nearest_ids(self, queries: np.ndarray, query_groups: np.ndarray | None = None,
                    bank_groups: np.ndarray | None = None, desc: str = 'search') -> np.ndarray:
        """Batch queries in chunks (for the progress bar), one result each."""
        import ngtpy
        if query_groups is not None:
            raise UserError("leave-one-out search needs --nn exact, not 'ngt'")
        ids = np.empty(len(queries), np.int64)
        results = ngtpy.BatchResults()
        for qs in tqdm(list(iter_batches(len(queries), NGT_QUERY_CHUNK)), desc=desc, unit='chunk', leave=False,
                       disable=None):
            self.index.batch_search(queries[qs], results, 1)
            found = results.get_indexed_ids()
            if len(found) != qs.stop - qs.start:
                raise RuntimeError(f'NGT returned {len(found)} results for {qs.stop - qs.start} queries')
            ids[qs] = found
        return ids

    def arrays(self) -> None:
        return None


def make_search(method: str, device: torch.device | str = 'cpu', ngt_path: Path | None = None,
                eps: float = DEFAULT_EPS):
    """An unfitted search object for `method` (`eps`: approx's certified ratio 1 + eps)."""
    if method == 'exact':
        return ExactSearch(device)
    if method == 'approx':
        return ApproxSearch(device, eps=eps)
    if method == 'brute':
        return BruteForceSearch(device)
    if method == 'ngt':
        return NGTSearch(ngt_path)
    raise UserError(f'--nn must be one of {", ".join(METHODS)}, not {method!r}')


def nearest_distances(queries: np.ndarray, bank: np.ndarray, method: str = 'exact',
                      device: torch.device | str = 'cpu', desc: str = 'search',
                      ngt_path: Path | None = None, query_groups: np.ndarray | None = None,
                      bank_groups: np.ndarray | None = None, search=None, eps: float = DEFAULT_EPS) -> np.ndarray:
    """For embeddings `queries` (..., D) and `bank` (M, D): the distance to the nearest bank row, float32 (...).

    `search`: a search object already fitted on `bank` (e.g. cached with the memory bank), else one is
    fitted here. With `ngt_path`, the NGT index is opened from there if it exists, else built there.
    With `query_groups` (one int per query row) and `bank_groups` (one per bank row), a bank row is never
    the neighbour of a query of the same group (leave-one-image-out scoring; `exact` and `brute` only);
    a query left with no row gets infinity. `eps`: approx's certified ratio (other methods ignore it).
    """
    flat = as_rows(queries)
    bank = as_rows(bank)
    if (query_groups is None) != (bank_groups is None):
        raise ValueError('query_groups and bank_groups go together')
    if query_groups is not None:
        query_groups = np.asarray(query_groups, np.int64).reshape(-1)
        bank_groups = np.asarray(bank_groups, np.int64).reshape(-1)
    if search is None:
        search = make_search(method, device, ngt_path, eps)
        if isinstance(search, ExactSearch) and query_groups is not None:
            search.fit(bank, bank_groups)
        else:
            search.fit(bank)
    ids = search.nearest_ids(flat, query_groups, bank_groups, desc)
    return distances_to(flat, bank, ids).reshape(queries.shape[:-1])


def distances_to(queries: np.ndarray, bank: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact L2 distances from each query to its chosen bank row (float64 arithmetic, float32 result);
    infinity where no row was chosen (id -1)."""
    out = np.empty(len(queries), np.float32)
    for sl in iter_batches(len(queries), 1 << 16):
        chosen = ids[sl]
        diff = queries[sl].astype(np.float64) - bank[np.maximum(chosen, 0)]
        out[sl] = np.where(chosen >= 0, np.sqrt(np.einsum('ij,ij->i', diff, diff)), np.inf)
    return out
