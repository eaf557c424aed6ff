"""Metric functions on small cases computed by hand."""
import numpy as np
import pytest

from codes import metrics


def two_regions():
    """One 4x4 image: region A (top-left pair) and region B (right column pair), 12 normal pixels."""
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, :2] = True
    mask[0, 2:, 3] = True
    scores = np.zeros((1, 4, 4))
    scores[0, 0, :2] = 0.9          # A found first
    scores[0, 2, 3], scores[0, 3, 3] = 0.7, 0.1
    scores[0, 1, 0], scores[0, 1, 1] = 0.8, 0.6   # two normal pixels scored high
    return mask, scores


def test_pro_curve_of_a_two_region_example():
    fpr, pro = metrics.pro_curve(*two_regions())
    # thresholds 0.9, 0.8, 0.7, 0.6, 0.1, 0.0 (by hand)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 12, 1 / 12, 2 / 12, 2 / 12, 1, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 0.75, 0.75, 1, 1, 1])


def test_aupro_of_the_two_region_example():
    # area to FPR 0.3: 0.5/12 + 0.75/12 + 1.0 * (0.3 - 2/12) = 0.2375; / 0.3
    assert metrics.aupro(*two_regions()) == pytest.approx(0.2375 / 0.3)


def test_aupro_uses_8_connectivity():
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True      # diagonal neighbours: one region with 8-connectivity
    mask[0, 3, 3] = True
    scores = np.zeros((1, 4, 4))
    scores[0, 0, 0] = 1.0
    # regions {diag pair, single}: PRO 0.25 at FPR 0, then (1, 1); at 0.3: 0.475; area 0.10875
    assert metrics.aupro(mask, scores) == pytest.approx(0.10875 / 0.3)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 2:5, 2:6] = masks[0, 10:12, 9:15] = masks[1, 7:9, 7:9] = True
    perfect = masks + rng.uniform(0, 0.1, masks.shape)
    inverted = 1 - perfect
    assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
    assert metrics.aupro(masks, inverted) == pytest.approx(0.0)
    assert metrics.segmentation_auroc(masks, perfect) == 1.0 and metrics.segmentation_auroc(masks, inverted) == 0.0
    assert metrics.pixel_average_precision(masks, perfect) == pytest.approx(1.0)
    labels = np.array([1, 1, 0])
    assert metrics.detection_auroc(labels, perfect) == 1.0
    normal_highest = np.ones_like(perfect) * np.array([0.1, 0.2, 0.9])[:, None, None]
    assert metrics.detection_auroc(labels, normal_highest) == 0.0


def test_area_interpolates_at_the_limit():
    x, y = np.array([0.0, 0.2, 0.5, 1.0]), np.array([0.0, 0.4, 1.0, 1.0])
    # 0..0.2: 0.04; 0.2..0.3: y(0.3) = 0.6, area 0.05
    assert metrics.area_up_to(x, y, 0.3) == pytest.approx(0.09)
    assert metrics.area_up_to(x, y, 0.2) == pytest.approx(0.04)


def test_f1_max_and_its_threshold():
    # thresholds 0.9: F1 2/3; 0.5: 1/2; 0.4: P 2/3, R 1 -> 0.8; 0.1: 2/3
    f1, threshold = metrics.f1_max(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.5, 0.1]))
    assert f1 == pytest.approx(0.8) and threshold == 0.4


def test_map_metrics_without_masks_report_image_level_only():
    maps = np.random.default_rng(1).random((4, 8, 8))
    m = metrics.map_metrics(np.array([1, 0, 1, 0]), None, maps)
    assert m['seg'] is None and m['aupro'] is None and m['pixel_ap'] is None
    assert 0 <= m['det'] <= 1 and 0 < m['f1_max'] <= 1


def test_pro_needs_an_anomalous_region():
    with pytest.raises(ValueError, match='at least one anomalous region'):
        metrics.pro_curve(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


def test_pro_curve_points_match_the_definition_on_random_data():
    from scipy import ndimage
    rng = np.random.default_rng(3)
    masks = ndimage.binary_dilation(rng.random((3, 24, 24)) > 0.97, iterations=2)
    maps = np.round(rng.random((3, 24, 24)) + masks * 0.5, 2)       # rounding makes ties
    fpr, pro = metrics.pro_curve(masks, maps)
    distinct = np.unique(maps)[::-1]
    regions = [(i, ndimage.label(m, structure=np.ones((3, 3)))[0] == k)
               for i, m in enumerate(masks) for k in range(1, ndimage.label(m, structure=np.ones((3, 3)))[1] + 1)]
    for t in distinct[::7]:
        pred = maps >= t
        k = 1 + int(np.searchsorted(-distinct, -t))   # curve point after every score >= t (index 0 is the origin)
        assert fpr[k] == pytest.approx((pred & ~masks).sum() / (~masks).sum())
        assert pro[k] == pytest.approx(np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions]))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_one_sort_gives_sklearns_auroc_and_ap(seed):
    """Pixel AUROC and AP from the shared ranking equal scikit-learn's (ties included) to 1e-9."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(seed)
    maps = rng.random((5, 32, 32)).round(2)            # many ties
    masks = rng.random((5, 32, 32)) < 0.1 + 0.5 * maps
    ranking = metrics.Ranking(maps)
    assert abs(ranking.auroc(masks) - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-9
    assert abs(ranking.average_precision(masks) - average_precision_score(masks.ravel(), maps.ravel())) <= 1e-9
    full = metrics.map_metrics(np.array([1, 0, 1, 0, 1]), masks, maps)
    assert abs(full['seg'] - metrics.segmentation_auroc(masks, maps)) <= 1e-9
    assert abs(full['pixel_ap'] - metrics.pixel_average_precision(masks, maps)) <= 1e-9
    assert abs(full['aupro'] - metrics.aupro(masks, maps)) <= 1e-12


@pytest.mark.parametrize('seed', range(6))
def test_image_auroc_and_f1_max_equal_sklearns(seed):
    """Image AUROC and F1-max (value and threshold, ties of scores and of F1 included) as scikit-learn gives them."""
    from sklearn.metrics import precision_recall_curve, roc_auc_score
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 60))
    scores = rng.integers(0, 6, n) / 5 if seed % 2 else rng.random(n)     # odd seeds: many equal scores
    labels = (rng.random(n) < 0.3 + 0.4 * scores).astype(int)
    labels[:2] = [0, 1]
    assert abs(metrics.auroc(labels, scores) - roc_auc_score(labels, scores)) <= 1e-12
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide='ignore', invalid='ignore'):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
    best = int(np.argmax(f1))
    assert metrics.f1_max(labels, scores) == pytest.approx((f1[best], thresholds[best]), abs=1e-12)


def test_auroc_of_one_class_is_refused():
    with pytest.raises(ValueError, match='Only one class'):
        metrics.auroc(np.zeros(4, int), np.arange(4.0))


@pytest.mark.parametrize('seed', [0, 1])
def test_block_constant_maps_ranked_by_block_give_the_per_pixel_metrics(seed, monkeypatch):
    """Maps constant on 4x4 blocks (as Patch SVDD's are) are ranked by block; masks cut across blocks.
    Pixel AUROC and AP equal scikit-learn's over all pixels, AUPRO the per-pixel computation's, to 1e-9."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    rng = np.random.default_rng(seed)
    coarse = rng.random((3, 8, 8)).round(1)                    # ties between blocks too
    maps = np.kron(coarse, np.ones((4, 4)))
    masks = rng.random((3, 32, 32)) < 0.2 + 0.5 * maps
    assert metrics.block_size(maps) == 4 and metrics.block_size(maps + rng.random(maps.shape) * 1e-9) == 1
    fast = metrics.map_metrics(np.array([1, 0, 1]), masks, maps)
    assert abs(fast['seg'] - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-9
    assert abs(fast['pixel_ap'] - average_precision_score(masks.ravel(), maps.ravel())) <= 1e-9
    monkeypatch.setattr(metrics, 'block_size', lambda maps: 1)
    slow = metrics.map_metrics(np.array([1, 0, 1]), masks, maps)
    assert abs(fast['aupro'] - slow['aupro']) <= 1e-9 and fast['aupro'] > 0


def plain_pro_curve(masks, maps):
    """The PRO curve as the argsort of every pixel gives it (this module's algorithm before one sort of
    values served all the pixel metrics): (FPR, PRO) at every distinct threshold, highest first."""
    from scipy import ndimage
    order = np.argsort(maps.ravel())[::-1]
    last_of_tie = np.append(np.diff(maps.ravel()[order]) != 0, True)
    fp_weight, pro_weight, n_regions = np.zeros(maps.shape), np.zeros(maps.shape), 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3), int))
        fp_weight[i][labeled == 0] = 1.0
        if n:
            pro_weight[i] = np.where(labeled > 0, 1.0 / np.bincount(labeled.ravel())[labeled], 0.0)
        n_regions += n
    fpr = np.cumsum(fp_weight.ravel()[order])[last_of_tie] / fp_weight.sum()
    pro = np.cumsum(pro_weight.ravel()[order])[last_of_tie] / n_regions
    return np.r_[0.0, np.clip(fpr, None, 1), 1.0], np.r_[0.0, np.clip(pro, None, 1), 1.0]


def smooth_maps(seed, n=6, size=48):
    """Smooth float64 maps (as PSDL's, PaDiM's and PatchCore's: no block structure, nearly no ties) and blob masks,
    the last image normal."""
    from scipy.ndimage import gaussian_filter
    rng = np.random.default_rng(seed)
    masks = gaussian_filter(rng.standard_normal((n, size, size)), (0, 3, 3)) > 0.12
    masks[-1] = False
    maps = gaussian_filter(rng.standard_normal((n, size, size)) + 0.4 * masks, (0, 2, 2))
    return masks, maps


@pytest.mark.parametrize('seed', range(4))
def test_smooth_maps_pixel_metrics_equal_sklearn_and_the_plain_pro(seed):
    """Pixel AUROC and AP equal scikit-learn's; the PRO curve (every distinct threshold) equals the plain argsort
    computation's, and AUPRO read off the curve's bend points alone equals the area of that full curve."""
    from sklearn.metrics import average_precision_score, roc_auc_score
    masks, maps = smooth_maps(seed)
    if seed % 2:     # pairs of float64 scores one ulp apart that round to the same float32: must stay apart
        maps[:, ::2] = np.nextafter(maps[:, 1::2], np.inf)
        assert np.all(maps[:, ::2].astype(np.float32) == maps[:, 1::2].astype(np.float32))
    assert metrics.block_size(maps) == 1
    pixels = metrics.Pixels(masks, maps)
    assert abs(pixels.auroc() - roc_auc_score(masks.ravel(), maps.ravel())) <= 1e-12
    assert abs(pixels.average_precision() - average_precision_score(masks.ravel(), maps.ravel())) <= 1e-12
    fpr, pro = pixels.pro_curve()
    plain_fpr, plain_pro = plain_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, plain_fpr, rtol=0, atol=1e-13)
    np.testing.assert_allclose(pro, plain_pro, rtol=0, atol=1e-13)
    plain = metrics.area_up_to(plain_fpr, plain_pro, metrics.PRO_FPR_LIMIT) / metrics.PRO_FPR_LIMIT
    assert abs(pixels.aupro() - plain) <= 1e-12 and 0 < plain < 1
    assert pixels.aupro() == metrics.map_metrics(np.array([1, 1, 1, 1, 1, 0]), masks, maps)['aupro']


@pytest.mark.parametrize('seed', range(3))
def test_ranking_sums_at_every_threshold_equal_a_plain_argsort(seed):
    """The full-curve API (counts, thresholds, cumulative) at every distinct threshold, ties included, against a
    plain argsort of the scores; ROC AUC and AP read at the bend points alone equal those of the full counts."""
    rng = np.random.default_rng(seed)
    scores = rng.random(3000).round(2 + seed)            # ties of several sizes
    truth = rng.random(3000) < 0.2 + 0.5 * scores
    values = np.where(truth, rng.random(3000), 0.0)
    order = np.argsort(scores)[::-1]
    last_of_tie = np.append(np.diff(scores[order]) != 0, True)
    ranking = metrics.Ranking(scores)
    np.testing.assert_array_equal(ranking.thresholds(), scores[order][last_of_tie])
    tps, fps = ranking.counts(truth)
    np.testing.assert_array_equal(tps, np.cumsum(truth[order])[last_of_tie])
    np.testing.assert_array_equal(fps, np.cumsum(~truth[order])[last_of_tie])
    np.testing.assert_allclose(ranking.cumulative(values), np.cumsum(values[order])[last_of_tie], rtol=1e-13)
    assert abs(ranking.auroc(truth) - metrics.roc_area(tps, fps)) <= 1e-13
    assert abs(ranking.average_precision(truth) - metrics.precision_area(tps, fps)) <= 1e-13
