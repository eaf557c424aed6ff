"""The numerical core of PSDL: the 2-D DCT dictionary, batched OMP and batched approximate K-SVD.

PSDL (PSDL_SPEC.md sections 3 and 4) learns one dictionary per spatial position with
sparselandtools' ``ApproximateKSVD`` on top of sklearn's Gram OMP. Both are reproduced here
faithfully, but batched over positions (a leading dimension P) and, inside OMP, over signals, so
that the 196 per-position problems of a 14x14 feature map run as a handful of tensor operations.

Shapes: a dictionary is (P, n, K) (atoms are columns), signals are (P, n, N) (signals are
columns), codes are (P, K, N). Every function also accepts the unbatched 2-D forms.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# Working-memory budget (bytes) for one chunk of OMP's per-signal state (the (K, s) table of
# correlations of the orthogonalised atoms). Small enough to stay near the CPU caches, large
# enough that Python overhead per chunk is amortised.
OMP_CHUNK_BYTES = 24 * 2**20
# Same idea for K-SVD's per-chunk working set (signals, codes, residual of a group of positions).
KSVD_CHUNK_BYTES = 8 * 2**20


def dct_dictionary(d: int) -> np.ndarray:
    """The complete orthonormal 2-D DCT-II dictionary, (d*d, d*d) float64: D0 = C^T kron C^T with
    C[k, i] = sqrt(2/d) * c_k * cos(pi * (i + 1/2) * k / d), c_0 = 1/sqrt(2), c_k = 1 otherwise;
    channel (row) index c = i1*d + i2, atom (column) index k1*d + k2."""
    if d < 1:
        raise ValueError(f'the DCT size must be positive, got {d}')
    k = np.arange(d, dtype=np.float64)[:, None]
    i = np.arange(d, dtype=np.float64)[None, :]
    scale = np.full((d, 1), math.sqrt(2.0 / d))
    scale[0, 0] = math.sqrt(1.0 / d)  # sqrt(2/d) * 1/sqrt(2)
    c = scale * np.cos(np.pi * (i + 0.5) * k / d)
    # kron(C^T, C^T)[i1*d + i2, k1*d + k2] = C[k1, i1] * C[k2, i2]
    return np.kron(c.T, c.T)


def _as_batched(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    if x.dim() == 2:
        return x.unsqueeze(0), False
    if x.dim() == 3:
        return x, True
    raise ValueError(f'{name} must be 2-D or 3-D (batched over positions), got shape {tuple(x.shape)}')


def _working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(tensors[0].dtype, tensors[1].dtype)
    if not dtype.is_floating_point:
        dtype = torch.float64
    return dtype


def _omp_gram_flat(gram: torch.Tensor, xy: torch.Tensor, pos: torch.Tensor, n_nonzero: int) -> torch.Tensor:
    """Gram OMP for a flat batch of signals, each with its own position's Gram matrix.

    gram (P, K, K), xy (B, K) = D_p^T y for each signal, pos (B,) its position -> codes (B, K).

    This is sklearn's ``_gram_omp`` (tol=None) step for step, written as a pivoted Cholesky of the
    Gram matrix: with L the Cholesky factor of G[S, S] and Q = D_S L^-T the orthonormalised chosen
    atoms, V = Q^T D (t, K) holds each orthonormal direction's correlation with every atom. Then
    sklearn's triangular solve L^-1 G[S, lam] is just the column V[:, lam], its residual
    correlations alpha = D^T (y - Q Q^T y) are updated by one rank-1 term per step, and the
    coefficients are one triangular solve L^T gamma = Q^T y at the end. Same selections, same
    stopping rules, O(K t) work per signal and step like sklearn's ``Gram[:, :n_active] @ gamma``.
    """
    b, k = xy.shape
    dtype = xy.dtype
    device = xy.device
    eps = torch.finfo(dtype).eps  # sklearn: min_float = np.finfo(Gram.dtype).eps
    gram_rows = gram.reshape(-1, k)  # row pos*K + lam is G_pos[lam, :]
    gram_diag = torch.diagonal(gram, dim1=1, dim2=2).reshape(-1)
    base = pos * k

    alpha = xy.clone()
    # sklearn swaps the chosen atom to the front of its arrays; argmax breaks ties by the swapped
    # order, and "the argmax is an already chosen atom" is lam < n_active there. Track that order.
    order = torch.arange(k, device=device).expand(b, k).clone()
    v = torch.zeros(b, n_nonzero, k, dtype=dtype, device=device)
    chol = torch.zeros(b, n_nonzero, n_nonzero, dtype=dtype, device=device)
    qty = torch.zeros(b, n_nonzero, dtype=dtype, device=device)
    support = torch.zeros(b, n_nonzero, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    rows = torch.arange(b, device=device)

    for t in range(n_nonzero):
        swapped = alpha.abs().gather(1, order)
        j = swapped.argmax(dim=1)
        lam = order[rows, j]
        alpha_lam = alpha[rows, lam]
        # sklearn: "selected same atom twice, or inner product too small"
        stop = (j < t) | (alpha_lam * alpha_lam < eps)
        g_ll = gram_diag[base + lam]
        if t > 0:
            w = v[rows, :t, lam]  # = L^-1 G[S, lam], sklearn's new Cholesky row
            l_kk = g_ll - (w * w).sum(dim=1)
            stop |= l_kk <= eps  # sklearn: "selected atoms are dependent"
        else:
            l_kk = g_ll  # sklearn takes L[0, 0] = sqrt(G[lam, lam]) without a check
        done |= stop
        active = ~done
        if not bool(active.any()):
            break
        l_diag = torch.sqrt(torch.where(active, l_kk, torch.ones_like(l_kk)))
        u = gram_rows[base + lam]
        if t > 0:
            u = u - torch.bmm(w.unsqueeze(1), v[:, :t, :]).squeeze(1)
            chol[:, t, :t] = torch.where(active.unsqueeze(1), w, torch.zeros_like(w))
        u = u / l_diag.unsqueeze(1)
        z = torch.where(active, alpha_lam / l_diag, torch.zeros_like(alpha_lam))
        alpha -= u * z.unsqueeze(1)
        v[:, t, :] = u
        chol[:, t, t] = l_diag
        qty[:, t] = z
        support[:, t] = torch.where(active, lam, torch.zeros_like(lam))
        # swap order[t] and order[j] for the signals that took a step
        o_t = order[:, t].clone()
        o_j = order[rows, j]
        order[rows, j] = torch.where(active, o_t, o_j)
        order[:, t] = torch.where(active, o_j, o_t)

    # Steps a signal did not take have an identity row in chol and a zero right-hand side, so their
    # coefficients come out as exact zeros (scatter-added onto atom 0 harmlessly).
    chol.diagonal(dim1=1, dim2=2).masked_fill_(chol.diagonal(dim1=1, dim2=2) == 0, 1.0)
    gamma = torch.linalg.solve_triangular(chol.transpose(1, 2), qty.unsqueeze(2), upper=True).squeeze(2)
    codes = torch.zeros(b, k, dtype=dtype, device=device)
    codes.scatter_add_(1, support, gamma)
    return codes


def omp(dictionary: torch.Tensor, signals: torch.Tensor, n_nonzero: int) -> torch.Tensor:
    """Orthogonal matching pursuit with exactly `n_nonzero` atoms (as sklearn.linear_model.orthogonal_mp
    with precompute=True / Gram, tol=None), batched over a leading batch dimension:
    dictionary (P, n, K), signals (P, n, N) -> codes (P, K, N). Also accepts unbatched (n, K), (n, N) -> (K, N).
    Atoms are assumed unit-norm (as sklearn assumes). Early stop per signal exactly where sklearn's stops
    (negligible correlation, dependent atom)."""
    dic, batched = _as_batched(dictionary, 'dictionary')
    sig, batched_s = _as_batched(signals, 'signals')
    if batched != batched_s:
        raise ValueError('dictionary and signals must both be batched or both unbatched')
    p, n, k = dic.shape
    if sig.shape[0] != p or sig.shape[1] != n:
        raise ValueError(f'signals {tuple(sig.shape)} do not match dictionary {tuple(dic.shape)}')
    if not 1 <= n_nonzero <= k:
        raise ValueError(f'n_nonzero must be in [1, {k}], got {n_nonzero}')
    dtype = _working_dtype(dic, sig)
    dic = dic.to(dtype)
    sig = sig.to(dtype)
    num = sig.shape[2]
    gram = dic.transpose(1, 2) @ dic
    xy = (dic.transpose(1, 2) @ sig).transpose(1, 2).reshape(p * num, k)  # signal-major
    pos = torch.arange(p, device=dic.device).repeat_interleave(num)
    codes = torch.empty(p * num, k, dtype=dtype, device=dic.device)
    per_signal = n_nonzero * (k + n_nonzero) * torch.finfo(dtype).bits // 8
    chunk = max(1, OMP_CHUNK_BYTES // per_signal)
    for start in range(0, p * num, chunk):
        stop = min(start + chunk, p * num)
        codes[start:stop] = _omp_gram_flat(gram, xy[start:stop], pos[start:stop], n_nonzero)
    codes = codes.reshape(p, num, k).transpose(1, 2).contiguous()
    return codes if batched else codes[0]


def _ksvd_sweep(dic: torch.Tensor, codes: torch.Tensor, residual: torch.Tensor) -> None:
    """One approximate K-SVD dictionary update (every atom once, in order), in place.

    dic (P, n, K), codes (P, K, N), residual (P, n, N) = Y - D X, kept current. For atom k the
    reference computes, on the signals omega that use it and with atom k zeroed,
    E = Y_omega - D X_omega, d = E g / ||E g||, g' = E^T d. Because X[k] is zero off omega,
    E g = (R + d_k x_k) x_k over all signals, and masking g' to omega gives the same result
    without per-position index subsets.
    """
    num_atoms = dic.shape[2]
    for k in range(num_atoms):
        x = codes[:, k, :]  # (P, N)
        used = x != 0
        any_used = used.any(dim=1)  # positions where atom k is used at all
        if not bool(any_used.any()):
            continue
        d_old = dic[:, :, k]  # (P, n)
        # E g = R x + d_k (x . x)
        eg = torch.bmm(residual, x.unsqueeze(2)).squeeze(2) + d_old * (x * x).sum(dim=1, keepdim=True)
        d_new = eg / torch.linalg.vector_norm(eg, dim=1, keepdim=True)
        # g' = E^T d on omega: R^T d + x (d_k . d)
        g_new = torch.bmm(d_new.unsqueeze(1), residual).squeeze(1) + x * (d_old * d_new).sum(dim=1, keepdim=True)
        g_new = torch.where(used, g_new, torch.zeros_like(g_new))
        # positions where nobody uses atom k keep it (reference: "if none, skip")
        keep = ~any_used
        if bool(keep.any()):
            d_new = torch.where(keep.unsqueeze(1), d_old, d_new)
        # R <- R + d_k x_k - d g'
        residual.baddbmm_(torch.stack((d_old, -d_new), dim=2), torch.stack((x, g_new), dim=1))
        dic[:, :, k] = d_new
        codes[:, k, :] = g_new


def approximate_ksvd(signals: torch.Tensor, init: torch.Tensor, n_nonzero: int, iterations: int = 20,
                     progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """sparselandtools' ApproximateKSVD as PSDL uses it, batched over positions: signals (P, n, N), init (P, n, K)
    (or unbatched) -> (dictionary (P, n, K), codes (P, K, N)); codes are X after the LAST update step (not re-coded)."""
    sig, batched = _as_batched(signals, 'signals')
    dic, batched_d = _as_batched(init, 'init')
    if batched != batched_d:
        raise ValueError('signals and init must both be batched or both unbatched')
    if dic.shape[0] == 1 and sig.shape[0] > 1:
        dic = dic.expand(sig.shape[0], -1, -1)  # one init shared by every position
    if dic.shape[0] != sig.shape[0] or dic.shape[1] != sig.shape[1]:
        raise ValueError(f'init {tuple(dic.shape)} does not match signals {tuple(sig.shape)}')
    if iterations < 1:
        raise ValueError(f'iterations must be at least 1, got {iterations}')
    dtype = _working_dtype(sig, dic)
    sig = sig.to(dtype).contiguous()
    dic = dic.to(dtype).clone().contiguous()
    p, n, num = sig.shape
    k = dic.shape[2]
    codes = torch.empty(p, k, num, dtype=dtype, device=sig.device)
    bar = None
    if progress:
        from tqdm import tqdm  # optional dependency, only for the progress bar
        bar = tqdm(total=iterations, desc='K-SVD')
    for _ in range(iterations):
        codes = omp(dic, sig, n_nonzero)
        # the update step is independent per position: run it on cache-sized groups of positions
        per_position = (2 * n * num + k * num + n * k) * torch.finfo(dtype).bits // 8
        group = max(1, KSVD_CHUNK_BYTES // per_position)
        for start in range(0, p, group):
            sl = slice(start, min(start + group, p))
            d_g = dic[sl]
            x_g = codes[sl]
            residual = sig[sl] - torch.bmm(d_g, x_g)
            _ksvd_sweep(d_g, x_g, residual)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not batched:
        return dic[0], codes[0]
    return dic, codes


def code_statistics(dictionary: torch.Tensor, signals: torch.Tensor,
                    codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-signal PSDL features: (L1 norm of the code, squared reconstruction error ||D x - y||^2),
    each (P, N) (or (N,) unbatched)."""
    l1 = codes.abs().sum(dim=-2)
    err = ((dictionary @ codes - signals) ** 2).sum(dim=-2)
    return l1, err
