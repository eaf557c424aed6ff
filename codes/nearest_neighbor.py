"""Nearest-neighbour patch scoring: L2 distance from each test embedding to the closest training embedding.

Backends (each finds the nearest training row, then the distance to it is computed exactly in float64):
- `exact`: blockwise float64 matrix products on the chosen device, never holding a full test x train matrix;
- `ngt`: NGT's graph index (ANNG, L2, edge sizes 10/40: the original's settings), approximate;
- `faiss`: faiss's flat L2 index (exact search), if faiss is installed.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .embeddings import iter_batches
from .errors import UserError

METHODS = ('exact', 'ngt', 'faiss')
# Blocks of queries x bank rows small enough to stay in cache on a CPU (measured: ~60 GFLOPS in
# float64 at 1024x1024 against ~12 at 1024x16384 on 2 cores); a GPU wants far larger blocks.
CPU_BLOCKS = (1024, 1024)
CUDA_BLOCKS = (8192, 65536)
NGT_QUERY_CHUNK = 16384


def nearest_distances(queries: np.ndarray, bank: np.ndarray, method: str = 'exact',
                      device: torch.device | str = 'cpu', desc: str = 'search',
                      ngt_path: Path | None = None, query_groups: np.ndarray | None = None,
                      bank_groups: np.ndarray | None = None) -> np.ndarray:
    """For embeddings `queries` (..., D) and `bank` (M, D): the distance to the nearest bank row, float32 (...).

    With `ngt_path`, the NGT index of `bank` is opened from there if it exists, else built there.
    With `query_groups` (one int per query row) and `bank_groups` (one per bank row), a bank row is
    never the neighbour of a query of the same group (leave-one-image-out scoring); exact search only.
    """
    flat = as_rows(queries)
    bank = as_rows(bank)
    if (query_groups is None) != (bank_groups is None):
        raise ValueError('query_groups and bank_groups go together')
    if query_groups is not None:
        if method != 'exact':
            raise UserError(f'leave-one-out search needs --nn exact, not {method!r}')
        ids = exact_ids(flat, bank, torch.device(device), desc, np.asarray(query_groups).reshape(-1),
                        np.asarray(bank_groups).reshape(-1))
    elif method == 'ngt' and ngt_path is not None:
        ids = NGTIndex.cached(bank, ngt_path).nearest_ids(flat, desc)
    else:
        ids = nearest_ids(flat, bank, method, device, desc)
    return distances_to(flat, bank, ids).reshape(queries.shape[:-1])


def as_rows(embeddings: np.ndarray) -> np.ndarray:
    """(..., D) -> contiguous float32 (M, D), as NGT and faiss want it."""
    return np.ascontiguousarray(embeddings.reshape(-1, embeddings.shape[-1]), dtype=np.float32)


def nearest_ids(queries: np.ndarray, bank: np.ndarray, method: str, device: torch.device | str = 'cpu',
                desc: str = 'search') -> np.ndarray:
    """Index of the nearest bank row for each query row."""
    if method == 'exact':
        return exact_ids(queries, bank, torch.device(device), desc)
    if method == 'ngt':
        with tempfile.TemporaryDirectory(prefix='patchsvdd-ngt-') as folder:
            return NGTIndex.build(bank, Path(folder) / 'index').nearest_ids(queries, desc)
    if method == 'faiss':
        return faiss_ids(queries, bank)
    raise UserError(f'--nn must be one of {", ".join(METHODS)}, not {method!r}')


def distances_to(queries: np.ndarray, bank: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Exact L2 distances from each query to its chosen bank row (float64 arithmetic, float32 result)."""
    out = np.empty(len(queries), np.float32)
    for sl in iter_batches(len(queries), 1 << 16):
        diff = queries[sl].astype(np.float64) - bank[ids[sl]]
        out[sl] = np.sqrt(np.einsum('ij,ij->i', diff, diff))
    return out


@torch.no_grad()
def exact_ids(queries: np.ndarray, bank: np.ndarray, device: torch.device, desc: str = 'search',
              query_groups: np.ndarray | None = None, bank_groups: np.ndarray | None = None) -> np.ndarray:
    # float64: in float32, ||q||^2 + ||b||^2 - 2 q.b loses the small distances that matter most.
    q_block, b_block = CUDA_BLOCKS if device.type == 'cuda' else CPU_BLOCKS
    bank_t = torch.from_numpy(bank).to(device, torch.float64)
    bank_sq = (bank_t ** 2).sum(1)
    ids = np.empty(len(queries), np.int64)
    for qs in tqdm(list(iter_batches(len(queries), q_block)), desc=desc, unit='block', leave=False, disable=None):
        q = torch.from_numpy(queries[qs]).to(device, torch.float64)
        best = torch.full((len(q),), float('inf'), dtype=torch.float64, device=device)
        best_id = torch.zeros(len(q), dtype=torch.int64, device=device)
        for bs in iter_batches(len(bank_t), b_block):
            # ||b||^2 - 2 q.b: the squared distance less ||q||^2, which does not change the argmin.
            value = torch.addmm(bank_sq[bs], q, bank_t[bs].T, alpha=-2)
            if query_groups is not None:
                same = torch.from_numpy(query_groups[qs][:, None] == bank_groups[bs][None, :]).to(device)
                value = value.masked_fill(same, float('inf'))
            value, idx = value.min(1)
            better = value < best
            best = torch.where(better, value, best)
            best_id = torch.where(better, idx + bs.start, best_id)
        ids[qs] = best_id.cpu().numpy()
    return ids


class NGTIndex:
    """An NGT graph index on disk with the original's settings (ANNG, L2, edge sizes 10 for creation, 40 for search)."""

    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, bank: np.ndarray, path: Path, save: bool = False) -> NGTIndex:
        import ngtpy
        ngtpy.create(str(path), bank.shape[1])   # the defaults are the original's settings
        index = ngtpy.Index(str(path), log_disabled=True)
        index.batch_insert(as_rows(bank), num_threads=os.cpu_count() or 1)
        if save:
            index.save()
        return cls(index)

    @classmethod
    def open(cls, path: Path) -> NGTIndex:
        import ngtpy
        return cls(ngtpy.Index(str(path), read_only=True, log_disabled=True))

    @classmethod
    def cached(cls, bank: np.ndarray, path: Path) -> NGTIndex:
        """Opens the index saved at `path` if it holds `bank`'s rows; else builds it beside and renames it there."""
        if path.exists():
            try:
                index = cls.open(path)
                if index.index.get_num_of_objects() == len(bank):
                    return index
            except RuntimeError:
                pass
            shutil.rmtree(path)
        tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', dir=path.parent))
        try:
            cls.build(bank, tmp / 'index', save=True).index.close()
            os.replace(tmp / 'index', path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path)

    def nearest_ids(self, queries: np.ndarray, desc: str = 'search') -> np.ndarray:
        """Batch queries in chunks (for the progress bar), one result each."""
        import ngtpy
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


def faiss_ids(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    try:
        import faiss
    except ImportError:
        raise UserError('--nn faiss needs faiss: pip install faiss-cpu') from None
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    _, ids = index.search(queries, 1)
    return ids[:, 0].astype(np.int64)
