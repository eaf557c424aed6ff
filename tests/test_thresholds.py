"""Thresholds, normalisation and the decision rule on small cases worked out by hand, and the
leave-one-image-out scores against an independent brute-force search."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from codes.errors import UserError
from codes.export import loo_images
from codes.inspection import score_maps
from codes.memory_bank import MemoryBank
from codes.methods.patchsvdd import normal_scores
from codes.thresholds import Thresholds, compute_thresholds, min_max_normalize

TRAIN = np.array([0.5, 0.1, 0.4, 0.2, 0.3])


def test_normal_threshold_is_the_quantile_of_training_scores():
    t = compute_thresholds(TRAIN, (0.0, 0.6), 1.0, None)
    assert t.image == 0.5 and t.image_source == 'normal' and t.pixel_source == 'normal'
    assert t.pixel == 0.5        # normal-only pixel threshold: the same number as the image threshold
    # sorted 0.1 0.2 0.3 0.4 0.5 (linear interpolation): 0.5 -> position 2 = 0.3, 0.75 -> 3 = 0.4,
    # 0.9 -> position 3.6 = 0.4 + 0.6 * 0.1
    assert compute_thresholds(TRAIN, (0.0, 0.6), 0.5, None).image == pytest.approx(0.3)
    assert compute_thresholds(TRAIN, (0.0, 0.6), 0.75, None).image == pytest.approx(0.4)
    assert compute_thresholds(TRAIN, (0.0, 0.6), 0.9, None).image == pytest.approx(0.46)
    assert compute_thresholds(TRAIN, (0.0, 0.6), 0.0, None).image == pytest.approx(0.1)


def test_f1_threshold_on_a_known_case():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.35, 0.3, 0.9])
    # >= 0.3 flags {0.3, 0.35, 0.9}: precision 2/3, recall 1, F1 0.8, the best of all cut points
    # (>= 0.2: 0.667, >= 0.35: 0.5, >= 0.9: 0.667)
    maps = np.zeros((5, 2, 2))
    maps[:, 0, 0] = scores
    masks = np.zeros((5, 2, 2), bool)
    masks[3, 0, 0] = masks[4, 0, 0] = True
    maps[4, 1, 1] = 0.95                 # a normal pixel above every defective one but one
    t = compute_thresholds(TRAIN, (0.0, 0.6), 1.0, None, scores, labels, maps, masks)
    assert t.image_source == 'f1' and t.image == 0.3 and t.f1_image_value == pytest.approx(0.8)
    assert t.normal_image == 0.5
    # pixels: >= 0.95 one FP (F1 0), >= 0.9: TP1 FP1 (0.5), >= 0.3: TP2 FP2 (0.667), >= 0.35: TP1 FP2 ...
    # >= 0.3 is the best: precision 2/4, recall 1
    assert t.pixel_source == 'f1' and t.pixel == 0.3 and t.f1_pixel_value == pytest.approx(2 / 3)
    # the range seen at export: training and test scores together; pixels: training range and test maps
    assert (t.image_min, t.image_max) == (0.1, 0.9) and (t.pixel_min, t.pixel_max) == (0.0, 0.95)
    chosen = compute_thresholds(TRAIN, (0.0, 0.6), 1.0, 'normal', scores, labels, maps, masks)
    assert (chosen.image, chosen.pixel, chosen.image_source, chosen.f1_image) == (0.5, 0.5, 'normal', 0.3)
    no_masks = compute_thresholds(TRAIN, (0.0, 0.6), 1.0, None, scores, labels, maps, None)
    assert (no_masks.image_source, no_masks.pixel_source, no_masks.pixel) == ('f1', 'normal', 0.5)


def test_f1_needs_defective_test_images():
    with pytest.raises(UserError, match=r'^--threshold_from f1 needs defective test images .* use --threshold_from normal$'):
        compute_thresholds(TRAIN, (0.0, 0.6), 1.0, 'f1', np.array([0.1, 0.2]), np.array([0, 0]))
    assert compute_thresholds(TRAIN, (0.0, 0.6), 1.0, None, np.array([0.1, 0.2]), np.array([0, 0])).image_source == 'normal'


def test_normalisation_maps_threshold_to_half_and_clips():
    values = np.array([-1.0, 0.0, 0.2, 0.5, 0.9, 3.0])
    expected = np.clip((values - 0.5) / (1.0 - 0.0) + 0.5, 0, 1)     # anomalib's formula, written out
    assert np.array_equal(min_max_normalize(values, 0.5, 0.0, 1.0), expected)
    assert min_max_normalize(0.5, 0.5, 0.0, 1.0) == 0.5
    assert min_max_normalize(0.7, 0.2, 0.1, 0.5).item() == 1.0        # (0.7-0.2)/0.4 + 0.5 > 1: clipped
    assert min_max_normalize(0.15, 0.2, 0.1, 0.5).item() == pytest.approx(0.375)
    assert min_max_normalize(3.0, 3.0, 3.0, 3.0) == 0.5                # one score seen: no division by zero


def test_decision_rule_and_anomalous_area():
    t = Thresholds(image=0.4, pixel=0.3, image_source='normal', pixel_source='normal', image_min=0.0,
                   image_max=1.0, pixel_min=0.0, pixel_max=1.0, normal_quantile=1.0, normal_image=0.4)
    assert t.is_anomalous(0.4) and not t.is_anomalous(np.nextafter(0.4, 0)) and t.is_anomalous(0.41)
    maps = np.array([[[0.3, 0.29], [0.1, 0.5]], [[0.0, 0.0], [0.0, 0.0]]])
    assert t.anomalous_area(maps).tolist() == [0.5, 0.0]               # 0.3 counts (>=), 0.29 does not
    assert Thresholds.from_dict(t.to_dict()) == t


def test_leave_one_out_matches_brute_force():
    rng = np.random.default_rng(0)
    n, D = 3, 4
    emb64 = rng.normal(size=(n, 13, 13, D)).astype(np.float32)
    emb32 = rng.normal(size=(n, 57, 57, D)).astype(np.float32)
    emb32[1] = emb32[0]     # image 1 duplicates image 0: without leaving it out its distances would be 0
    bank = MemoryBank(np.zeros((256, 256, 3), np.float32), emb64, emb32)
    which = np.array([0, 2])
    scores, low, high = normal_scores(bank, which)
    expected_maps = []
    for i in which:
        others = [j for j in range(n) if j != i]
        s64 = cdist(emb64[i].reshape(-1, D).astype(np.float64), emb64[others].reshape(-1, D)).min(1).reshape(13, 13)
        s32 = cdist(emb32[i].reshape(-1, D).astype(np.float64), emb32[others].reshape(-1, D)).min(1).reshape(57, 57)
        expected_maps.append(score_maps(s64[None], s32[None])['mult'][0])
    expected_maps = np.array(expected_maps)
    assert np.allclose(scores, expected_maps.max(axis=(1, 2)), rtol=1e-5)
    assert low == pytest.approx(expected_maps.min(), rel=1e-5) and high == pytest.approx(expected_maps.max(), rel=1e-5)
    # image 0's nearest K=32 patches are image 1's exact copies: left out only its own
    s = bank.distances('32', emb32[:1], 'exact', leave_out=np.array([0]))
    assert np.all(s == 0)


def test_loo_images_subset():
    assert loo_images(5, None).tolist() == [0, 1, 2, 3, 4]
    assert loo_images(9, 3).tolist() == [0, 4, 8]
    with pytest.raises(UserError, match='at least 2 training images'):
        loo_images(1, None)
