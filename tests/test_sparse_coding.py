"""PSDL's numerical core: the DCT dictionary, batched OMP against sklearn, batched approximate K-SVD
against a plain per-atom reference and on a planted dictionary."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import orthogonal_mp

import codes.sparse_coding as sparse_coding
from codes.sparse_coding import approximate_ksvd, code_statistics, dct_dictionary, omp


@pytest.fixture(autouse=True)
def one_thread():
    """The problems here are tiny: intra-op threads only add barrier waits, which on a busy shared
    machine made these tests several times slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=['fresh', 'tracked'])
def omp_variant(request, monkeypatch) -> str:
    """OMP has two internal ways to get the Cholesky row and the correlations (chosen by s^2 / K);
    force each in turn so both are checked against sklearn."""
    monkeypatch.setattr(sparse_coding, 'OMP_TRACK_RATIO', 10**9 if request.param == 'fresh' else 0)
    return request.param


def unit_columns(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    d = rng.standard_normal((n, k))
    return d / np.linalg.norm(d, axis=0)


def sklearn_omp(dictionary: np.ndarray, signals: np.ndarray, s: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # sklearn warns on every early stop
        return orthogonal_mp(dictionary, signals, n_nonzero_coefs=s, precompute=True).reshape(
            dictionary.shape[1], signals.shape[1])


# ---------------------------------------------------------------- DCT dictionary

@pytest.mark.parametrize('d', [1, 2, 3, 8, 10])
def test_dct_dictionary_is_orthonormal(d: int) -> None:
    dic = dct_dictionary(d)
    assert dic.shape == (d * d, d * d) and dic.dtype == np.float64
    np.testing.assert_allclose(dic.T @ dic, np.eye(d * d), atol=1e-12)


def test_dct_dictionary_matches_the_formula() -> None:
    # d = 2 by hand: C = [[1, 1], [1, -1]] / sqrt(2), so D0[i1*2+i2, k1*2+k2] = C[k1,i1] C[k2,i2].
    expected = 0.5 * np.array([[1, 1, 1, 1],
                               [1, -1, 1, -1],
                               [1, 1, -1, -1],
                               [1, -1, -1, 1]], dtype=np.float64)
    np.testing.assert_allclose(dct_dictionary(2), expected, atol=1e-15)
    # d = 3, channel (i1, i2) = (2, 0), atom (k1, k2) = (1, 2): C[1, 2] * C[2, 0]
    c12 = math.sqrt(2 / 3) * math.cos(math.pi * 2.5 * 1 / 3)
    c20 = math.sqrt(2 / 3) * math.cos(math.pi * 0.5 * 2 / 3)
    assert dct_dictionary(3)[2 * 3 + 0, 1 * 3 + 2] == pytest.approx(c12 * c20, abs=1e-15)
    # the DC atom is constant 1/d
    np.testing.assert_allclose(dct_dictionary(4)[:, 0], np.full(16, 0.25), atol=1e-15)


# ---------------------------------------------------------------- OMP

@pytest.mark.parametrize('n, k, num, s', [(20, 30, 50, 5), (16, 16, 40, 4), (10, 40, 30, 10), (36, 36, 25, 9)])
def test_omp_equals_sklearn_unbatched(n: int, k: int, num: int, s: int, omp_variant: str) -> None:
    rng = np.random.default_rng(n * 1000 + k)
    dic = unit_columns(rng, n, k)
    sig = rng.standard_normal((n, num))
    codes = omp(torch.from_numpy(dic), torch.from_numpy(sig), s)
    assert codes.shape == (k, num) and codes.dtype == torch.float64
    expected = sklearn_omp(dic, sig, s)
    np.testing.assert_allclose(codes.numpy(), expected, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(codes.numpy() != 0, expected != 0)


def test_omp_equals_sklearn_batched_per_position(omp_variant: str) -> None:
    rng = np.random.default_rng(7)
    p, n, k, num, s = 5, 16, 24, 33, 6
    dics = np.stack([unit_columns(rng, n, k) for _ in range(p)])
    sigs = rng.standard_normal((p, n, num)) * rng.uniform(0.1, 10, size=(p, 1, 1))
    codes = omp(torch.from_numpy(dics), torch.from_numpy(sigs), s).numpy()
    assert codes.shape == (p, k, num)
    for i in range(p):
        np.testing.assert_allclose(codes[i], sklearn_omp(dics[i], sigs[i], s), atol=1e-9, rtol=0)


def test_omp_early_stops_like_sklearn(omp_variant: str) -> None:
    rng = np.random.default_rng(3)
    n, k, s = 12, 20, 6
    dic = unit_columns(rng, n, k)
    dic[:, 7] = dic[:, 2]  # a duplicated atom: choosing both would make the Cholesky singular
    sig = rng.standard_normal((n, 6))
    sig[:, 0] = 0.0  # zero signal: the first correlation is already negligible
    sig[:, 1] = 2.0 * dic[:, 3] - 0.5 * dic[:, 11]  # exactly 2-sparse: stops after two atoms
    sig[:, 2] = dic[:, 2]  # one atom (which has a duplicate)
    sig[:, 3] = 1e-9 * sig[:, 3]  # tiny: alpha^2 below machine epsilon at once
    codes = omp(torch.from_numpy(dic), torch.from_numpy(sig), s).numpy()
    expected = sklearn_omp(dic, sig, s)
    np.testing.assert_allclose(codes, expected, atol=1e-9, rtol=0)
    nnz = (codes != 0).sum(axis=0)
    assert nnz[0] == 0 and nnz[1] == 2 and nnz[2] == 1 and nnz[3] == 0
    assert nnz[4] == s and nnz[5] == s


def test_omp_dependent_atom_stop(omp_variant: str) -> None:
    # More atoms asked for (5) than dimensions (3), at a large scale: after three atoms the residual
    # is round-off, still above sklearn's absolute correlation threshold, so what stops OMP is the
    # dependent-atom test on the Cholesky diagonal. Which side of eps that round-off lands on is
    # itself round-off, so sklearn and this code agree on most signals, not all (sklearn too keeps
    # a 4th atom now and then); without the test nearly every signal takes more atoms, with NaNs.
    rng = np.random.default_rng(0)
    dic = unit_columns(rng, 3, 6)
    sig = rng.standard_normal((3, 100)) * 1e10
    codes = omp(torch.from_numpy(dic), torch.from_numpy(sig), 5).numpy()
    expected = sklearn_omp(dic, sig, 5)
    assert np.isfinite(codes).all()
    agree = np.all(np.abs(codes - expected) <= 1e-9 * np.abs(expected).max(axis=0), axis=0)
    assert agree.mean() >= 0.85
    assert ((codes != 0).sum(axis=0) == 3).mean() >= 0.85


def test_omp_ties_follow_sklearns_order_on_the_dct_dictionary(omp_variant: str) -> None:
    # An orthonormal dictionary and signals that are sums of equal-weight atoms give exact ties
    # in the correlations; sklearn breaks them by its swapped index order.
    dic = dct_dictionary(4)
    sig = np.zeros((16, 4))
    sig[:, 0] = dic[:, [0, 5, 9]].sum(axis=1)
    sig[:, 1] = dic[:, [1, 2, 3, 4]].sum(axis=1) + 0.5 * dic[:, 15]
    sig[:, 2] = dic[:, [15, 3]] @ np.array([1.0, -1.0])
    sig[:, 3] = 1.0
    codes = omp(torch.from_numpy(dic), torch.from_numpy(sig), 3).numpy()
    np.testing.assert_allclose(codes, sklearn_omp(dic, sig, 3), atol=1e-12, rtol=0)


def test_omp_accepts_float32() -> None:
    rng = np.random.default_rng(11)
    dic = unit_columns(rng, 16, 16).astype(np.float32)
    sig = rng.standard_normal((16, 20)).astype(np.float32)
    codes = omp(torch.from_numpy(dic), torch.from_numpy(sig), 4)
    assert codes.dtype == torch.float32
    np.testing.assert_allclose(codes.numpy(), sklearn_omp(dic.astype(np.float64), sig.astype(np.float64), 4),
                               atol=1e-4)


# ---------------------------------------------------------------- K-SVD

def reference_ksvd(signals: np.ndarray, init: np.ndarray, s: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """The spec's section 3, literally: sklearn OMP, then per atom a fancy-indexed subset."""
    dic = init.copy()
    codes = None
    for _ in range(iterations):
        codes = sklearn_omp(dic, signals, s)
        for k in range(dic.shape[1]):
            omega = np.nonzero(codes[k])[0]
            if len(omega) == 0:
                continue
            dic[:, k] = 0
            err = signals[:, omega] - dic @ codes[:, omega]
            g = codes[k, omega]
            d = err @ g
            d = d / np.linalg.norm(d)
            dic[:, k] = d
            codes[k, omega] = err.T @ d
    return dic, codes


def test_ksvd_equals_the_plain_reference(omp_variant: str) -> None:
    rng = np.random.default_rng(5)
    n, k, num, s = 9, 12, 40, 3
    sig = rng.standard_normal((n, num))
    init = unit_columns(rng, n, k)
    for iterations in (1, 3):
        dic, codes = approximate_ksvd(torch.from_numpy(sig), torch.from_numpy(init), s, iterations=iterations)
        ref_dic, ref_codes = reference_ksvd(sig, init, s, iterations)
        np.testing.assert_allclose(dic.numpy(), ref_dic, atol=1e-9, rtol=0)
        np.testing.assert_allclose(codes.numpy(), ref_codes, atol=1e-9, rtol=0)


def test_ksvd_equals_the_reference_at_psdl_size() -> None:
    # The default backbone's sizes at one position: d = 10 (n = K = 100), s = 25, N = 209
    # ReLU-like signals, DCT init. Three iterations agree to round-off.
    rng = np.random.default_rng(0)
    sig = np.maximum(rng.standard_normal((100, 209)) + 0.3, 0)
    init = dct_dictionary(10)
    dic, codes = approximate_ksvd(torch.from_numpy(sig), torch.from_numpy(init), 25, iterations=3)
    ref_dic, ref_codes = reference_ksvd(sig, init, 25, 3)
    np.testing.assert_allclose(dic.numpy(), ref_dic, atol=1e-12, rtol=0)
    np.testing.assert_allclose(codes.numpy(), ref_codes, atol=1e-11, rtol=0)


def test_ksvd_keeps_unused_atoms() -> None:
    # With an orthonormal DCT init and 1-sparse signals built from a few atoms, most atoms are
    # never chosen: the reference skips them, so they must come back unchanged.
    rng = np.random.default_rng(2)
    init = dct_dictionary(3)
    sig = init[:, [1, 4]] @ rng.standard_normal((2, 30))
    dic, codes = approximate_ksvd(torch.from_numpy(sig), torch.from_numpy(init), 1, iterations=2)
    ref_dic, ref_codes = reference_ksvd(sig, init, 1, 2)
    np.testing.assert_allclose(dic.numpy(), ref_dic, atol=1e-9, rtol=0)
    np.testing.assert_allclose(codes.numpy(), ref_codes, atol=1e-9, rtol=0)
    unused = [a for a in range(9) if a not in (1, 4)]
    np.testing.assert_array_equal(dic.numpy()[:, unused], init[:, unused])


def test_ksvd_batched_equals_each_position_alone() -> None:
    rng = np.random.default_rng(9)
    p, n, k, num, s = 4, 9, 9, 30, 2
    sigs = torch.from_numpy(rng.standard_normal((p, n, num)))
    init = torch.from_numpy(dct_dictionary(3))
    dic, codes = approximate_ksvd(sigs, init.expand(p, n, k), s, iterations=3)
    assert dic.shape == (p, n, k) and codes.shape == (p, k, num)
    for i in range(p):
        d_i, c_i = approximate_ksvd(sigs[i], init, s, iterations=3)
        torch.testing.assert_close(dic[i], d_i, atol=1e-12, rtol=0)
        torch.testing.assert_close(codes[i], c_i, atol=1e-12, rtol=0)
    # a single (n, K) init is shared by every position
    dic_shared, _ = approximate_ksvd(sigs, init.unsqueeze(0), s, iterations=3)
    torch.testing.assert_close(dic_shared, dic, atol=0, rtol=0)


def test_ksvd_recovers_a_planted_dictionary() -> None:
    rng = np.random.default_rng(0)
    n, k, num, s = 20, 30, 1500, 3
    true = unit_columns(rng, n, k)
    x = np.zeros((k, num))
    for j in range(num):
        x[rng.choice(k, s, replace=False), j] = rng.standard_normal(s) + np.sign(rng.standard_normal(s))
    sig = true @ x + 1e-3 * rng.standard_normal((n, num))
    init = unit_columns(rng, n, k)
    dic, codes = approximate_ksvd(torch.from_numpy(sig), torch.from_numpy(init), s, iterations=30)
    cos = np.abs(dic.numpy().T @ true).max(axis=0)  # best match of each true atom
    assert (cos > 0.99).mean() >= 0.85, np.sort(cos)
    np.testing.assert_allclose(np.linalg.norm(dic.numpy(), axis=0), 1.0, atol=1e-12)
    assert ((codes.numpy() != 0).sum(axis=0) <= s).all()


def test_code_statistics() -> None:
    rng = np.random.default_rng(4)
    dic = torch.from_numpy(rng.standard_normal((3, 5, 6)))
    sig = torch.from_numpy(rng.standard_normal((3, 5, 7)))
    codes = torch.from_numpy(rng.standard_normal((3, 6, 7)))
    l1, err = code_statistics(dic, sig, codes)
    assert l1.shape == err.shape == (3, 7)
    i, j = 2, 4
    assert l1[i, j].item() == pytest.approx(np.abs(codes[i, :, j].numpy()).sum())
    residual = dic[i].numpy() @ codes[i, :, j].numpy() - sig[i, :, j].numpy()
    assert err[i, j].item() == pytest.approx(np.sum(residual ** 2))


def test_shared_dictionary_and_float32_ksvd() -> None:
    rng = np.random.default_rng(8)
    sigs = torch.from_numpy(rng.standard_normal((3, 16, 25)))
    dct = torch.from_numpy(dct_dictionary(4))
    shared = omp(dct.unsqueeze(0), sigs, 4)
    torch.testing.assert_close(shared, omp(dct.expand(3, 16, 16), sigs, 4), atol=0, rtol=0)
    dic64, codes64 = approximate_ksvd(sigs, dct.unsqueeze(0), 4, iterations=2)
    dic32, codes32 = approximate_ksvd(sigs.float(), dct.unsqueeze(0).float(), 4, iterations=2)
    assert dic32.dtype == codes32.dtype == torch.float32
    # float32 round-off may swap a near-tied atom choice now and then; the fit stays as good
    _, err64 = code_statistics(dic64, sigs, codes64)
    _, err32 = code_statistics(dic32.double(), sigs, codes32.double())
    assert err32.mean().item() == pytest.approx(err64.mean().item(), rel=1e-3)


def test_bad_shapes_are_refused() -> None:
    dic = torch.zeros(2, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError):
        omp(dic, torch.zeros(3, 4, 6, dtype=torch.float64), 2)  # P mismatch
    with pytest.raises(ValueError):
        omp(dic, torch.zeros(2, 4, 6, dtype=torch.float64), 6)  # more atoms than the dictionary has
    with pytest.raises(ValueError):
        approximate_ksvd(torch.zeros(4, 6, dtype=torch.float64), dic, 2)  # batched init, unbatched signals
