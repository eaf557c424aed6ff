"""k-center greedy selection (PatchCore's coreset): the plain loop, and a pruned one that picks the same sequence.

The plain greedy updates every point's minimum squared distance after each pick with one float32
matrix-vector product (`norms - 2 p.c + norms_c`, clamped at 0) and picks the argmax (lowest index among
equal maxima). The pruned greedy keeps each centre's Voronoi cell (the points whose current minimum is
their distance to that centre) and, after a pick c, recomputes only the points that c can bring closer:
by the triangle inequality a point p of cell s keeps its minimum when ||c - s||^2 >= 4 (min_p + E), E
being the float32 formula's error bound, so whole cells (by their largest minimum) and then single points
are skipped. The argmax comes from each cell's largest minimum and lowest index holding it. Where the
cells cannot prune (texture-like classes, whose patches are all about equally far apart), a pick whose
candidate cells hold a quarter of the points or more takes the plain loop's product over every point
instead of gathering them (KolektorSDD's 218k points: 167 s -> 26 s for 2,179 picks, the plain loop 21 s).

Same floats as the plain loop: the recomputed rows go through the same float32 formula with the same
norms, and every dot product, in the plain loop's full product and in the recompute, is taken the same
way (`_dots`): on one thread, in batches whose row count is a multiple of BLOCK (the rows past the last
whole BLOCK as a zero-padded batch of BLOCK rows). Measured with MKL's sgemv (AVX-512): each thread
takes its share of the rows in groups of 4 with one summation order, and its last share % 4 rows one at
a time with another (single-row products differ from the 4-row kernel's in ~3 of 4 rows). A row's float
thus depends on whether it is in a thread's ragged tail, not on its position, the batch's length or the
memory alignment (tested for dims 1..4099, up to 200,000 rows); with more threads the shares start at
unaligned rows (n / threads), so rows near a share's end change with n and the thread count. One thread
and whole blocks leave every row in the 4-row kernel. tests/test_coreset.py checks the recomputed floats
under 1 and 2 caller threads and the picks against the plain loop on random and real features.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from .threads import one_thread

BLOCK = 32                  # rows per padded batch: a multiple of every BLAS row unrolling seen (4 with MKL AVX-512)
FULL_SHARE = 4             # a pick whose candidate cells hold 1/FULL_SHARE of the points or more takes them all:
                            # gathering them costs more than the plain product (KolektorSDD's 218k: 60 ms against 7)
U32 = 2.0 ** -24            # float32 unit round-off
U64 = 2.0 ** -53


def _one_thread() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if torch.get_num_threads() == 1 else one_thread()


def _dots(batch: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """`batch @ c` for a batch of a multiple of BLOCK rows, on one thread: every row through BLAS's
    whole-block kernel, so a row's float does not depend on the batch."""
    with _one_thread():
        return batch @ c


def _full_distances(points: torch.Tensor, norms: torch.Tensor, centre: int) -> torch.Tensor:
    """The plain loop's float32 squared distances from `centre` to all points: the product over the rows
    before the last whole BLOCK in one batch, the rest zero-padded to a batch of BLOCK rows."""
    c = points[centre]
    n = len(points)
    n_main = n - n % BLOCK
    dots = torch.empty(n, device=points.device)
    if n_main:
        with _one_thread():
            torch.mv(points[:n_main], c, out=dots[:n_main])
    if n > n_main:
        tail = points.new_zeros((BLOCK, points.shape[1]))
        tail[:n - n_main] = points[n_main:]
        dots[n_main:] = _dots(tail, c)[:n - n_main]
    return (norms - 2 * dots + norms[centre]).clamp_min(0)


def k_center_greedy_plain(points: torch.Tensor, n_select: int, first: int = 0) -> np.ndarray:
    """The plain k-center greedy (L2): start at `first`, then repeatedly the point farthest from all selected
    ones. One vectorised float32 distance update per pick over all points."""
    points = points.float().contiguous()
    norms = (points * points).sum(1)
    selected = [first]
    min_dist = torch.full((len(points),), float('inf'), device=points.device)
    with one_thread():      # one matrix-vector product per pick: too small to share between threads
        for _ in range(n_select - 1):
            torch.minimum(min_dist, _full_distances(points, norms, selected[-1]), out=min_dist)
            selected.append(int(torch.argmax(min_dist)))
    return np.array(selected, dtype=np.int64)


class _Distances:
    """The plain loop's float32 squared distances from one point to chosen rows, the same floats as its
    full product (`_full_distances`) gives those rows: the rows gathered into a zero-padded batch of a
    multiple of BLOCK rows."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points
        self.norms = (points * points).sum(1)

    def full(self, centre: int) -> np.ndarray:
        """The distances from `centre` to every point (the plain loop's product itself)."""
        return _full_distances(self.points, self.norms, centre).numpy()

    def __call__(self, rows: np.ndarray, centre: int) -> np.ndarray:
        t_rows = torch.from_numpy(rows)
        batch = torch.empty((-(-len(rows) // BLOCK) * BLOCK, self.points.shape[1]))
        torch.index_select(self.points, 0, t_rows, out=batch[:len(rows)])
        batch[len(rows):] = 0
        dots = _dots(batch, self.points[centre])[:len(rows)]
        return (self.norms[t_rows] - 2 * dots + self.norms[centre]).clamp_min(0).numpy()


def k_center_greedy_pruned(points: torch.Tensor, n_select: int, first: int = 0) -> np.ndarray:
    """The picks of `k_center_greedy_plain` (CPU), recomputing only the points a new centre can bring closer."""
    points = points.float().cpu().contiguous()
    n, dim = points.shape
    distances = _Distances(points)
    norms = distances.norms.numpy().astype(np.float64)
    # |float32 formula - exact squared distance| <= (2 gamma_dim + 4u)(|p|^2 + |c|^2); 3 (dim + 4) u with slack
    err = 3 * (dim + 4) * U32 * 2 * float(norms.max()) * (1 + 1e-6)
    min_dist = np.full(n, np.inf, dtype=np.float32)
    cells: list[np.ndarray] = []
    cell_len = np.zeros(n_select, dtype=np.int64)
    owner = np.full(n, -1, dtype=np.int64)          # the cell of each point (-1 before the first pick)
    cell_max = np.full(n_select, -np.inf)           # each cell's largest minimum distance (float32 values)
    cell_arg = np.full(n_select, n, dtype=np.int64)  # the lowest index holding it
    centres = np.zeros((n_select, dim))
    centre_norms = np.zeros(n_select)
    selected = [first]

    def settle(cell: int, members: np.ndarray) -> None:
        cells[cell] = members
        cell_len[cell] = len(members)
        if len(members):
            k = int(np.argmax(min_dist[members]))      # members ascending: the first maximum is the lowest index
            cell_max[cell], cell_arg[cell] = min_dist[members[k]], members[k]
        else:
            cell_max[cell], cell_arg[cell] = -np.inf, n

    def update(c: int, t: int) -> None:
        cvec = points[c].double().numpy()
        centres[t], centre_norms[t] = cvec, norms[c]
        # a lower bound on the exact ||c - s||^2 for every earlier centre s (float64 error bound subtracted)
        d2 = centre_norms[:t] + norms[c] - 2 * (centres[:t] @ cvec)
        d2 -= 4 * (dim + 4) * U64 * (centre_norms[:t] + norms[c])
        cand = np.nonzero(d2 < 4 * (cell_max[:t] + err))[0]
        cells.append(np.zeros(0, dtype=np.int64))
        if cell_len[cand].sum() * FULL_SHARE >= n or not t:
            # the cells prune little (distances alike, or the first pick): every point, with no gathering
            vals = distances.full(c)
            closer = vals < min_dist
            moved = np.flatnonzero(closer)
            min_dist[moved] = vals[moved]
            for s in np.unique(owner[moved]):
                if s >= 0:
                    settle(int(s), cells[s][~closer[cells[s]]])
            owner[moved] = t
            settle(t, moved)
            return
        lens = cell_len[cand]
        idx = np.concatenate([cells[s] for s in cand]) if len(cand) else np.zeros(0, dtype=np.int64)
        bound = np.repeat(d2[cand], lens)
        need = np.nonzero(bound < 4 * (min_dist[idx].astype(np.float64) + err))[0]
        rows = idx[need]
        vals = distances(rows, c) if len(rows) else np.zeros(0, dtype=np.float32)
        closer = vals < min_dist[rows]
        moved = rows[closer]
        min_dist[moved] = vals[closer]
        owner[moved] = t
        settle(t, np.sort(moved))
        if not len(cand):
            return
        lost = np.zeros(len(idx), dtype=bool)
        lost[need[closer]] = True
        offsets = np.concatenate([[0], np.cumsum(lens)])
        n_lost = np.add.reduceat(lost, offsets[:-1])
        for j in np.nonzero(n_lost)[0]:
            seg = slice(offsets[j], offsets[j + 1])
            settle(int(cand[j]), idx[seg][~lost[seg]])

    with one_thread():      # the plain loop's products run on one thread; the same blocking here
        update(first, 0)
        for t in range(1, n_select):
            top = cell_max[:t].max()
            selected.append(int(cell_arg[:t][cell_max[:t] == top].min()))
            if t < n_select - 1:
                update(selected[-1], t)
    return np.array(selected, dtype=np.int64)
