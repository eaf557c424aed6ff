"""The authors' bottle encoder on the real bottle data against what the authors' code computed
(tests/fixtures), for both resize filters."""
import numpy as np
import pytest

from codes import inspection, mvtecad
from codes.checkpoints import load_encoder
from codes.embeddings import embed_images
from codes.nearest_neighbor import DEFAULT_EPS, nearest_distances
from tests.conftest import load_reference



@pytest.fixture(scope='module', params=['nearest', 'bicubic'])
def bottle(request, mvtec_root, bottle_ckpt):
    resize = request.param
    info, ref_maps = load_reference(resize)
    data = mvtecad.load_class(mvtecad.find_class(mvtec_root, 'bottle'), resize)
    enc = load_encoder(bottle_ckpt, 64)
    mean = mvtecad.mean_image(data.train)
    tr64, tr32 = embed_images(enc, data.train, mean, 'cpu')
    te64, te32 = embed_images(enc, data.test, mean, 'cpu')
    s64 = nearest_distances(te64, tr64, 'exact')
    s32 = nearest_distances(te32, tr32, 'exact')
    return dict(resize=resize, info=info, ref=ref_maps, data=data, tr64=tr64, te64=te64, tr32=tr32, te32=te32,
                s64=s64, s32=s32)


def relative_difference(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / ref over all scores (the K=64 reference has none near 0: min 0.02)."""
    assert ref.min() > 0
    return float((np.abs(ours.astype(np.float64) - ref) / ref).max())


# The reference's "exact" K=32 distances were computed in float32 as ||q||^2 + ||b||^2 - 2 q.b, whose
# round-off (||q||^2 up to 62 here) shifts squared distances by up to ~5e-5: where the true distance
# is tiny (identical dark background patches: ours exactly 0), it reads 1e-3. Ours are exact (float64).
# So a score matches when it agrees to 1e-4 relative or its square agrees to 1e-4 absolute.
REFERENCE_SQUARED_ROUNDOFF = 1e-4


def mismatches(ours: np.ndarray, ref: np.ndarray) -> int:
    ours, ref = ours.astype(np.float64), ref.astype(np.float64)
    relative_ok = np.abs(ours - ref) <= 1e-4 * ref
    squared_ok = np.abs(ours ** 2 - ref ** 2) <= REFERENCE_SQUARED_ROUNDOFF
    return int((~(relative_ok | squared_ok)).sum())


def test_test_order_labels_and_masks(bottle):
    data = bottle['data']
    assert [p.relative_to(data.files.folder).as_posix() for p in data.files.test] == bottle['info']['test_order']
    assert data.files.labels.tolist() == [1] * 63 + [0] * 20
    assert data.train.shape == (209, 256, 256, 3) and data.train.dtype == np.uint8
    assert data.masks.shape == (83, 256, 256) and data.masks.dtype == bool
    assert data.masks[:63].reshape(63, -1).any(1).all() and not data.masks[63:].any()


def test_k64_scores_equal_the_reference(bottle):
    assert bottle['s64'].shape == (83, 13, 13)
    assert relative_difference(bottle['s64'], bottle['ref']['m64']) <= 1e-4


def test_k32_exact_scores_equal_the_reference(bottle):
    ours, ref = bottle['s32'], bottle['ref']['m32_exact']
    assert ours.shape == (83, 57, 57)
    assert mismatches(ours, ref) == 0
    far = ref > 0.5    # where the reference's round-off is negligible, plain relative agreement
    assert far.sum() > 50_000 and relative_difference(ours[far], ref[far]) <= 1e-4


def test_default_exact_search_gives_the_originals_exact_aurocs(bottle):
    """The eight AUROCs of our maps equal the authors' code's with exact search, to 4 decimals."""
    data = bottle['data']
    aurocs = inspection.aurocs(inspection.score_maps(bottle['s64'], bottle['s32']), data.files.labels, data.masks)
    ref = bottle['info']['aurocs']
    for name, value in aurocs.items():
        assert round(value, 4) == round(ref[name + '_exact'], 4), name


@pytest.mark.parametrize('bottle', ['nearest'], indirect=True)
def test_pruned_search_equals_brute_force_on_real_codes(bottle):
    """2,000 real test patches (spread over the class) against the full 679,041-row bank: brute force agrees."""
    queries = bottle['te32'].reshape(-1, 64)[::135][:2000]
    bank = bottle['tr32'].reshape(-1, 64)
    np.testing.assert_array_equal(nearest_distances(queries, bank, 'exact'),
                                  nearest_distances(queries, bank, 'brute'))


@pytest.mark.parametrize('k32,suffix', [('m32_exact', '_exact'), ('m32_ngt', '')])
def test_aurocs_from_the_maps_equal_the_reference(bottle, k32, suffix):
    """Our K=64 scores with the reference's K=32 scores give the reference's eight AUROCs to 3 decimals."""
    data = bottle['data']
    maps = inspection.score_maps(bottle['s64'], bottle['ref'][k32])
    aurocs = inspection.aurocs(maps, data.files.labels, data.masks)
    ref = bottle['info']['aurocs']
    for name, value in aurocs.items():
        assert round(value, 3) == round(ref[name + suffix], 3), name


@pytest.mark.parametrize('bottle', ['nearest'], indirect=True)   # one filter keeps CI short
def test_default_ngt_search_is_within_0_01_of_the_original(bottle):
    data = bottle['data']
    s32 = nearest_distances(bottle['te32'], bottle['tr32'], 'ngt')
    aurocs = inspection.aurocs(inspection.score_maps(bottle['s64'], s32), data.files.labels, data.masks)
    ref = bottle['info']['aurocs']
    for name, value in aurocs.items():
        assert abs(value - ref[name]) <= 0.01, name


@pytest.mark.parametrize('bottle', ['nearest'], indirect=True)
def test_approx_search_changes_no_auroc_by_more_than_0_001(bottle):
    """--nn approx at its default eps: every distance certified within 1 + eps, and the eight AUROCs within
    0.001 of the authors' code's exact-search figures."""
    data = bottle['data']
    s64 = nearest_distances(bottle['te64'], bottle['tr64'], 'approx')
    s32 = nearest_distances(bottle['te32'], bottle['tr32'], 'approx')
    for approx, exact in ((s64, bottle['s64']), (s32, bottle['s32'])):     # float32 round-off allowed
        assert np.all(approx >= exact * (1 - 1e-6)) and np.all(approx <= exact * (1 + DEFAULT_EPS) + 1e-7)
    aurocs = inspection.aurocs(inspection.score_maps(s64, s32), data.files.labels, data.masks)
    ref = bottle['info']['aurocs']
    for name, value in aurocs.items():
        assert abs(value - ref[name + '_exact']) <= 0.001, name
