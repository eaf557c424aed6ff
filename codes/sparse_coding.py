"""The numerical core of PSDL: the 2-D DCT dictionary, batched OMP and batched approximate K-SVD.

PSDL (PSDL_SPEC.md sections 3 and 4) learns one dictionary per spatial position with
sparselandtools' ``ApproximateKSVD`` on top of sklearn's Gram OMP. Both are reproduced here
faithfully, but batched over positions (a leading dimension P) and, inside OMP, over signals, so
that the 196 per-position problems of a 14x14 feature map run as a handful of tensor operations.

Shapes: a dictionary is (P, n, K) (atoms are columns), signals are (P, n, N) (signals are
columns), codes are (P, K, N). Every function also accepts the unbatched 2-D forms.

Threads: both algorithms are long sequences of small tensor operations (one per OMP step or
atom update). On a machine whose cores are busy with other work, torch's intra-op threads spend
their time in barrier waits: OMP at P=196, N=209, n=K=100, s=25 took 87 s with 2 threads against
6 s with 1 on a shared 2-core machine. Callers on shared machines should run these under
``torch.set_num_threads(1)``; this module leaves the thread count to the caller.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

# Working-memory budget (bytes) for one block of OMP signals (each carries an s x s inverse Cholesky
# factor and a few K-long rows): small enough to stay near the CPU caches, which measured faster than
# larger blocks; OMP_MIN_BLOCK keeps blocks from shrinking so far (large s) that the Python-level
# step loop dominates.
OMP_CHUNK_BYTES = 4 * 2**20
OMP_MIN_BLOCK = 512
# OMP keeps per-signal correlation tables when s^2 >= OMP_TRACK_RATIO * K (see omp()).
OMP_TRACK_RATIO = 12
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


def _working_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of two inputs (integer inputs work in float64)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return dtype if dtype.is_floating_point else torch.float64


def _omp_gram_block(gram: torch.Tensor, xy: torch.Tensor, n_nonzero: int, track: bool) -> torch.Tensor:
    """Gram OMP for a block of signals grouped by position: gram (p, K, K), xy (p, m, K) = (D_p^T y)^T
    for m signals at each of p positions -> codes (p, m, K).

    This is sklearn's ``_gram_omp`` (tol=None) step for step, for every signal at once: argmax of
    |alpha| over the atoms (ties and the "already chosen" test in sklearn's swapped order), the new
    Cholesky row w = L^-1 G[S, lam] and diagonal G[lam, lam] - |w|^2, the same early stops, then
    gamma = (L L^T)^-1 D_S^T y and alpha = D^T y - G gamma. Reformulated to batch well:
    - C = L^-T is kept instead of L, so the coefficients grow by one rank-1 term per step
      (gamma_t = gamma_{t-1} + z_t c_t with c_t = [-C w; 1] / L[t, t] the new column of C and
      z_t = alpha[lam] / L[t, t]) instead of a triangular solve per signal;
    - every product with G is one batched matrix product per position (coefficients scattered into
      dense K-vectors), which runs at matrix-multiply speed instead of as per-signal gathers;
    - the per-signal t x t arrays are laid out (t, t, signals) so their products vectorise.
    Two ways to get w and alpha, equal up to round-off:
    - track=False: w = C^T G[S, lam] (a t x t product) and alpha = D^T y - G gamma afresh;
    - track=True: keep v_i = G c_i (the atoms' correlations with the i-th orthonormalised chosen
      atom); then w is column lam of v and alpha -= z_t v_t. Saves one t x t product per step for
      K more numbers per signal and step, which pays when s^2 is large against K.
    """
    p, m, k = xy.shape
    b = p * m
    dtype = xy.dtype
    device = xy.device
    eps = torch.finfo(dtype).eps  # sklearn: min_float = np.finfo(Gram.dtype).eps
    gram_flat = gram.reshape(-1)
    # flat index of G_pos[lam, 0] is (pos * K + lam) * K
    row_base = (torch.arange(p, device=device) * k).repeat_interleave(m)
    diag_flat = torch.diagonal(gram, dim1=1, dim2=2).reshape(-1)

    xy_flat = xy.reshape(b, k)
    alpha = xy_flat.clone() if track else xy_flat
    # sklearn swaps each chosen atom to the front of its arrays; argmax breaks ties in that swapped
    # order, and "the argmax is an already chosen atom" is lam < n_active there. Track the order.
    order = torch.arange(k, device=device).expand(b, k).contiguous()
    c_inv = torch.zeros(n_nonzero, n_nonzero, b, dtype=dtype, device=device)  # C = L^-T (upper), per signal
    support = torch.zeros(b, n_nonzero, dtype=torch.long, device=device)
    codes = torch.zeros(b, k, dtype=dtype, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    if track:
        v = torch.empty(max(n_nonzero - 1, 1), b, k, dtype=dtype, device=device)
        direction = torch.empty(b, k, dtype=dtype, device=device)

    for t in range(n_nonzero):
        j = alpha.gather(1, order).abs_().max(dim=1, keepdim=True).indices  # first maximum, as np.argmax
        lam = order.gather(1, j).squeeze(1)
        j = j.squeeze(1)
        alpha_lam = alpha.gather(1, lam.unsqueeze(1)).squeeze(1)
        # sklearn: "selected same atom twice, or inner product too small"
        stop = (j < t) | (alpha_lam * alpha_lam < eps)
        row = row_base + lam
        l_kk = diag_flat[row]  # sklearn takes L[0, 0] = sqrt(G[lam, lam]) without a check
        if t > 0:
            if track:
                w = v[:t].gather(2, lam.view(1, b, 1).expand(t, b, 1)).squeeze(2)  # (t, b)
            else:
                g = gram_flat[row.unsqueeze(1) * k + support[:, :t]].t()  # G[S, lam], (t, b)
                w = (c_inv[:t, :t] * g.unsqueeze(1)).sum(dim=0)  # C^T g = L^-1 G[S, lam]
            l_kk = l_kk - (w * w).sum(dim=0)
            stop |= l_kk <= eps  # sklearn: "selected atoms are dependent"
        done |= stop
        active = ~done
        if not bool(active.any()):
            break
        l_diag = torch.sqrt(torch.where(active, l_kk, torch.ones_like(l_kk)))
        z = torch.where(active, alpha_lam / l_diag, torch.zeros_like(alpha_lam))
        if t > 0:
            # new column of L^-T: [-C w / l; 1 / l]; zero for signals that stopped (keeps them inert)
            col = (c_inv[:t, :t] * w.unsqueeze(0)).sum(dim=1) / l_diag
            c_inv[:t, t] = torch.where(active, -col, torch.zeros_like(col))
        c_inv[t, t] = 1.0 / l_diag
        support[:, t] = lam
        c_t = c_inv[:t + 1, t].t()  # (b, t + 1): the new direction's coefficients on the support
        # gamma_t = gamma_{t-1} + z_t c_t; stopped signals have z = 0 and add nothing
        codes.scatter_add_(1, support[:, :t + 1], c_t * z.unsqueeze(1))
        # swap order[t] and order[j] for the signals that took the step
        o_t = order[:, t].clone()
        o_j = order.gather(1, j.unsqueeze(1)).squeeze(1)
        order.scatter_(1, j.unsqueeze(1), torch.where(active, o_t, o_j).unsqueeze(1))
        order[:, t] = torch.where(active, o_j, o_t)
        if t + 1 < n_nonzero:
            # G is symmetric, so G x for a batch of row vectors x is x @ G
            if track:
                direction.zero_().scatter_add_(1, support[:, :t + 1], c_t)
                torch.bmm(direction.view(p, m, k), gram, out=v[t].view(p, m, k))
                alpha.addcmul_(v[t], z.unsqueeze(1), value=-1.0)
            else:
                alpha = torch.baddbmm(xy, codes.view(p, m, k), gram, alpha=-1.0).view(b, k)
    return codes.view(p, m, k)


def omp(dictionary: torch.Tensor, signals: torch.Tensor, n_nonzero: int) -> torch.Tensor:
    """Orthogonal matching pursuit with exactly `n_nonzero` atoms (as sklearn.linear_model.orthogonal_mp
    with precompute=True / Gram, tol=None), batched over a leading batch dimension:
    dictionary (P, n, K), signals (P, n, N) -> codes (P, K, N). Also accepts unbatched (n, K), (n, N) -> (K, N).
    Atoms are assumed unit-norm (as sklearn assumes). Early stop per signal exactly where sklearn's stops
    (negligible correlation, dependent atom).

    A (1, n, K) dictionary is shared by all P positions. Works in the promoted dtype of the inputs
    (float64 for the sklearn-exact results; float32 is accepted, with float32's eps in the stopping
    rules as sklearn would use)."""
    dic, batched = _as_batched(dictionary, 'dictionary')
    sig, batched_s = _as_batched(signals, 'signals')
    if batched != batched_s:
        raise ValueError('dictionary and signals must both be batched or both unbatched')
    if dic.shape[0] == 1 and sig.shape[0] > 1:
        dic = dic.expand(sig.shape[0], -1, -1)  # one dictionary for every position
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
    xy = (dic.transpose(1, 2) @ sig).transpose(1, 2).contiguous()  # (P, N, K): signal-major
    # Blocks of (positions x signals) sized to the memory budget: whole positions when they fit
    # (the alpha update is then one product per position), else slices of one position's signals.
    # Tracking the correlations v (see _omp_gram_block) measured faster at s^2 / K = 16 (n = K = 256,
    # s = 64: by 7 %) and 27 (441, 110: by 20 %), slower at 6.25 (PSDL's default 100, 25: by 25 %).
    track = n_nonzero * n_nonzero >= OMP_TRACK_RATIO * k
    per_signal = (n_nonzero * n_nonzero + (n_nonzero * k if track else 0) + 5 * k) * torch.finfo(dtype).bits // 8
    # at least one whole position (or OMP_MIN_BLOCK signals) per block, however large s is, so that
    # the Python-level step loop stays short
    signals_per_block = max(OMP_MIN_BLOCK, OMP_CHUNK_BYTES // per_signal)
    block_n = min(num, signals_per_block)
    block_p = max(1, signals_per_block // max(num, 1)) if block_n == num else 1
    codes = torch.empty(p, num, k, dtype=dtype, device=dic.device)
    for p0 in range(0, p, block_p):
        p1 = min(p0 + block_p, p)
        for n0 in range(0, num, block_n):
            n1 = min(n0 + block_n, num)
            codes[p0:p1, n0:n1] = _omp_gram_block(gram[p0:p1], xy[p0:p1, n0:n1], n_nonzero, track)
    codes = codes.transpose(1, 2).contiguous()
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
        # E g = R x + d_k (x . x)  (multiply-and-sum beats a batched matrix-vector product here)
        eg = (residual * x.unsqueeze(1)).sum(dim=2) + d_old * (x * x).sum(dim=1, keepdim=True)
        d_new = eg / torch.linalg.vector_norm(eg, dim=1, keepdim=True)
        # g' = E^T d on omega: R^T d + x (d_k . d)
        g_new = torch.bmm(d_new.unsqueeze(1), residual).squeeze(1) + x * (d_old * d_new).sum(dim=1, keepdim=True)
        g_new = torch.where(used, g_new, torch.zeros_like(g_new))
        # positions where nobody uses atom k keep it (reference: "if none, skip")
        keep = ~any_used
        if bool(keep.any()):
            d_new = torch.where(keep.unsqueeze(1), d_old, d_new)
        # R <- R + d_k x_k - d g'
        residual.addcmul_(d_old.unsqueeze(2), x.unsqueeze(1))
        residual.addcmul_(d_new.unsqueeze(2), g_new.unsqueeze(1), value=-1.0)
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
    per_position = (2 * n * num + k * num + n * k) * torch.finfo(dtype).bits // 8
    group = max(1, KSVD_CHUNK_BYTES // per_position)
    for _ in tqdm(range(iterations), desc='K-SVD', unit='it', leave=False, disable=not progress):
        codes = omp(dic, sig, n_nonzero)
        # the update step is independent per position: run it on cache-sized groups of positions
        for start in range(0, p, group):
            sl = slice(start, min(start + group, p))
            d_g = dic[sl]  # views: the sweep updates dic and codes in place
            x_g = codes[sl]
            residual = sig[sl] - torch.bmm(d_g, x_g)
            _ksvd_sweep(d_g, x_g, residual)
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
