"""k-center greedy selection (PatchCore's coreset): the plain loop, and a pruned one that picks the same sequence.

The plain greedy updates every point's minimum squared distance after each pick with one float32
matrix-vector product (`norms - 2 p.c + norms_c`, clamped at 0) and picks the argmax (lowest index among
equal maxima). The pruned greedy keeps each centre's Voronoi cell (the points whose current minimum is
their distance to that centre) and, after a pick c, recomputes only the points that c can bring closer:
by the triangle inequality a point p of cell s keeps its minimum when ||c - s||^2 >= 4 (min_p + E), E
being the float32 formula's error bound, so whole cells (by their largest minimum) and then single points
are skipped. The argmax comes from each cell's largest minimum and lowest index holding it.

Same floats as the plain loop: the recomputed rows go through the same float32 formula with the same
norms, the dot products on a gathered batch padded to a multiple of BLOCK rows (and the last n % BLOCK
rows as their own batch, as the full product's tail). BLAS computes a row's dot product the same way
wherever the row sits in a batch of whole blocks, but not in a batch's ragged tail (measured with MKL:
a gathered batch of 3 rows differs in the last bits from the full product; padded to 4 it matches);
tests/test_coreset.py checks the picks against the plain loop on random and real features.
"""
from __future__ import annotations

import numpy as np
import torch

from .threads import one_thread

BLOCK = 32                  # rows per padded batch: a multiple of every BLAS row unrolling seen (4 with MKL AVX-512)
U32 = 2.0 ** -24            # float32 unit round-off
U64 = 2.0 ** -53


def k_center_greedy_plain(points: torch.Tensor, n_select: int, first: int = 0) -> np.ndarray:
    """The plain k-center greedy (L2): start at `first`, then repeatedly the point farthest from all selected
    ones. One vectorised float32 distance update per pick over all points."""
    points = points.float()
    norms = (points * points).sum(1)
    selected = [first]
    min_dist = torch.full((len(points),), float('inf'), device=points.device)
    with one_thread():      # one matrix-vector product per pick: too small to share between threads
        for _ in range(n_select - 1):
            centre = points[selected[-1]]
            d = (norms - 2 * (points @ centre) + norms[selected[-1]]).clamp_min(0)
            torch.minimum(min_dist, d, out=min_dist)
            selected.append(int(torch.argmax(min_dist)))
    return np.array(selected, dtype=np.int64)


class _Distances:
    """The plain loop's float32 squared distances from one point to chosen rows, the same floats as its
    full matrix-vector product gives those rows."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points
        self.norms = (points * points).sum(1)
        self.n_main = len(points) - len(points) % BLOCK

    def __call__(self, rows: np.ndarray, centre: int) -> np.ndarray:
        c = self.points[centre]
        dots = torch.empty(len(rows))
        is_main = rows < self.n_main
        main = torch.from_numpy(rows[is_main])
        if len(main):
            batch = torch.empty((-(-len(main) // BLOCK) * BLOCK, self.points.shape[1]))
            torch.index_select(self.points, 0, main, out=batch[:len(main)])
            batch[len(main):] = 0
            dots[torch.from_numpy(is_main)] = (batch @ c)[:len(main)]
        if not is_main.all():
            tail = self.points[self.n_main:] @ c
            dots[torch.from_numpy(~is_main)] = tail[torch.from_numpy(rows[~is_main] - self.n_main)]
        t_rows = torch.from_numpy(rows)
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
    cell_max = np.full(n_select, -np.inf)           # each cell's largest minimum distance (float32 values)
    cell_arg = np.full(n_select, n, dtype=np.int64)  # the lowest index holding it
    centres = np.zeros((n_select, dim))
    centre_norms = np.zeros(n_select)
    selected = [first]

    def settle(cell: int, members: np.ndarray) -> None:
        cells[cell] = members
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
        cand = np.nonzero(d2 < 4 * (cell_max[:t] + err))[0] if t else np.zeros(0, dtype=np.int64)
        if t:
            lens = np.array([len(cells[s]) for s in cand], dtype=np.int64)
            idx = np.concatenate([cells[s] for s in cand]) if len(cand) else np.zeros(0, dtype=np.int64)
            bound = np.repeat(d2[cand], lens)
            need = np.nonzero(bound < 4 * (min_dist[idx].astype(np.float64) + err))[0]
        else:
            lens, idx = np.zeros(0, dtype=np.int64), np.arange(n)
            need = idx
        rows = idx[need]
        vals = distances(rows, c) if len(rows) else np.zeros(0, dtype=np.float32)
        closer = vals < min_dist[rows]
        moved = rows[closer]
        min_dist[moved] = vals[closer]
        cells.append(np.zeros(0, dtype=np.int64))
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
