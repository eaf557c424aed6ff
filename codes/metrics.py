"""Detection and segmentation metrics over anomaly maps.

Image AUROC and pixel AUROC are the original's (scikit-learn's ROC AUC, computed here off one sort of the
scores with the same values: scikit-learn's import alone costs a second per process). The field's further
metrics:
- AUPRO up to 30% FPR, by MVTec AD's definition: the ground-truth masks' connected components
  (8-connectivity); at each threshold the per-region overlap averaged over all regions (PRO) against
  the false-positive rate over all anomaly-free pixels; the curve integrated up to FPR 0.3
  (interpolated there) and divided by 0.3;
- pixel average precision;
- image-level F1-max, with the threshold that attains it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

PRO_FPR_LIMIT = 0.3
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """An image's anomaly score is the maximum of its map."""
    return maps.max(axis=(-2, -1))


def auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of scores against binary truth (as sklearn's roc_auc_score)."""
    return Ranking(scores).auroc(truth)


def detection_auroc(labels: np.ndarray, maps: np.ndarray) -> float:
    """Image-level ROC AUC; labels 1 defective, 0 normal."""
    return auroc(labels, image_scores(maps))


def segmentation_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level ROC AUC over all test pixels."""
    return Pixels(masks, maps).auroc()


def pixel_average_precision(masks: np.ndarray, maps: np.ndarray) -> float:
    return Pixels(masks, maps).average_precision()


@dataclass(frozen=True)
class Placed:
    """Some items placed on a Ranking's thresholds, a threshold named by how many items score at or above it:
    `items` (flat indices) ordered by score, highest first; `at_or_above` each one's own threshold's count;
    `points` the thresholds where a sum over these items bends (each item's own threshold and the next
    higher one: between those the sum is flat), lowest count first; `reach` how many of the items lie at
    or above each point."""
    items: np.ndarray
    at_or_above: np.ndarray
    points: np.ndarray
    reach: np.ndarray


class Ranking:
    """Scores sorted once, values only: ROC AUC, average precision and the PRO curve are all read off this
    one sort. A sum over the scores at or above each threshold needs only the items it is not zero on (the
    anomalous pixels): those are placed on the sorted values by binary search, so no permutation of all
    the items is formed, and a curve of such sums (ROC, PRO) is read at the thresholds where it bends: the
    same area from a fraction of the points (as scikit-learn's roc_curve drops its collinear ones). With
    `weight`, each score stands for that many items (the pixels of a block that all have this score) and
    `truth` holds how many of them are positive."""

    def __init__(self, scores: np.ndarray, weight: int = 1):
        self.flat = np.asarray(scores).ravel()
        self.ascending = np.sort(self.flat)      # about half an argsort's time, and no gathers after it
        self.weight = weight

    @cached_property
    def distinct_ascending(self) -> np.ndarray:
        return self.ascending[self.first_of_tie]

    @cached_property
    def first_of_tie(self) -> np.ndarray:
        first = np.empty(len(self.ascending), bool)
        first[:1] = True
        np.not_equal(self.ascending[1:], self.ascending[:-1], out=first[1:])
        return first

    @cached_property
    def at_or_above(self) -> np.ndarray:
        """How many items score at or above each distinct score, highest score first."""
        return (len(self.flat) - np.flatnonzero(self.first_of_tie))[::-1]

    def place(self, items: np.ndarray) -> Placed:
        """`items` (flat indices) on the thresholds."""
        values = self.flat[items]
        by_score = np.argsort(values, kind='stable')
        values = values[by_score]                 # ascending queries keep the binary searches cache-friendly
        n = len(self.flat)
        own = (n - np.searchsorted(self.ascending, values, side='left'))[::-1]
        above = (n - np.searchsorted(self.ascending, values, side='right'))[::-1]
        points = np.sort(np.concatenate([above[above > 0], own, [n]]), kind='stable')    # merges two sorted runs
        points = points[np.append(points[1:] != points[:-1], True)]
        return Placed(items[by_score[::-1]], own, points, np.searchsorted(own, points, side='right'))

    @staticmethod
    def sums(placed: Placed, values: np.ndarray) -> np.ndarray:
        """The sum of `values` (one per placed item, in `placed.items`' order) at or above each bend point."""
        return np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])[placed.reach]

    def cumulative(self, values: np.ndarray) -> np.ndarray:
        """The sum of `values` (one per score) over the scores at or above each distinct threshold."""
        values = np.asarray(values).ravel()
        placed = self.place(np.flatnonzero(values))
        return self.cumulative_placed(placed, values[placed.items])

    def cumulative_placed(self, placed: Placed, values: np.ndarray) -> np.ndarray:
        """`cumulative` of values given on the placed items (zero elsewhere), at every distinct threshold."""
        index = np.searchsorted(self.at_or_above, placed.at_or_above)
        sums = np.bincount(index, weights=np.asarray(values, np.float64), minlength=len(self.at_or_above))
        return np.cumsum(sums)

    def counts(self, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives when predicting positive at or above each distinct score."""
        tps = self.cumulative(truth)
        return tps, self.at_or_above * float(self.weight) - tps

    def bend_counts(self, truth: np.ndarray) -> tuple[Placed, np.ndarray, np.ndarray]:
        """(the positives placed, true and false positives at the points where the ROC curve bends)."""
        truth = np.asarray(truth).ravel()
        placed = self.place(np.flatnonzero(truth))
        tps = self.sums(placed, truth[placed.items])
        return placed, tps, placed.points * float(self.weight) - tps

    def thresholds(self) -> np.ndarray:
        """The distinct scores, highest first (the thresholds `counts` is taken at)."""
        return self.distinct_ascending[::-1]

    def auroc(self, truth: np.ndarray) -> float:
        """As sklearn's roc_auc_score: the trapezoidal area under (FPR, TPR) from (0, 0)."""
        return roc_area(*self.bend_counts(truth)[1:])

    def average_precision(self, truth: np.ndarray) -> float:
        """As sklearn's average_precision_score: sum over thresholds of (recall step) x precision."""
        return precision_area(*self.bend_counts(truth)[1:])


def roc_area(tps: np.ndarray, fps: np.ndarray) -> float:
    """The trapezoidal area under (FPR, TPR) from (0, 0), given the counts at the thresholds (highest first)."""
    if tps[-1] == 0 or fps[-1] == 0:
        raise ValueError('Only one class present in y_true. ROC AUC score is not defined in that case.')
    return float(np.trapezoid(np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]))


def precision_area(tps: np.ndarray, fps: np.ndarray) -> float:
    """Average precision: the sum over thresholds of (recall step) x precision (steps are 0 between bends)."""
    precision = tps / (tps + fps)
    return float(np.sum(np.diff(np.r_[0, tps / tps[-1]]) * precision))


def block_size(maps: np.ndarray, sizes: tuple[int, ...] = (16, 8, 4, 2)) -> int:
    """The largest b of `sizes` such that every map is constant on each aligned b x b block (1 if none).
    Patch SVDD's maps are: every patch edge lies on a multiple of 4 pixels (of 16 for K=64 alone)."""
    h, w = maps.shape[-2:]
    first = maps.reshape(-1, h, w)[:1]
    for b in sizes:
        # the first map alone turns smooth maps away, without a pass over all of them
        if h % b == 0 and w % b == 0 and constant_on_blocks(first, b) and constant_on_blocks(maps, b):
            return b
    return 1


def constant_on_blocks(maps: np.ndarray, b: int) -> bool:
    h, w = maps.shape[-2:]
    blocks = (*maps.shape[:-2], h // b, b, w // b, b)
    return np.array_equal(maps.reshape(blocks), np.broadcast_to(maps[..., ::b, None, ::b, None], blocks))


# each test image's regions apart: 8-connected within an image, never across images
REGIONS_PER_IMAGE = np.stack([np.zeros((3, 3), int), EIGHT_CONNECTED, np.zeros((3, 3), int)])


class Pixels:
    """The test pixels of a set of maps, ranked once by score. Maps constant on b x b blocks are ranked by
    block, each block counting for its b^2 pixels and its anomalous ones: the same curves (one point per
    distinct score either way) from a b^2 times smaller sort. The anomalous pixels (blocks) are placed on
    the thresholds once: true positives and the PRO curve's region weights are sums over them."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray):
        maps = np.asarray(maps)
        self.masks = np.asarray(masks).reshape(maps.shape).astype(bool)
        self.b = b = block_size(maps) if maps.ndim >= 2 else 1
        self.ranking = Ranking(maps[..., ::b, ::b], b * b)
        self.positives = self.pool(self.masks)
        self.placed, self.tps, self.fps = self.ranking.bend_counts(self.positives)

    def pool(self, per_pixel: np.ndarray) -> np.ndarray:
        """Per-pixel values summed over each block (unchanged when blocks are single pixels)."""
        if self.b == 1:
            return per_pixel
        b, (h, w) = self.b, per_pixel.shape[-2:]
        return per_pixel.reshape(*per_pixel.shape[:-2], h // b, b, w // b, b).sum(axis=(-3, -1), dtype=np.float64)

    def auroc(self) -> float:
        return roc_area(self.tps, self.fps)

    def average_precision(self) -> float:
        return precision_area(self.tps, self.fps)

    def region_weights(self) -> tuple[np.ndarray, int]:
        """(each placed pixel's (block's) weight 1 / its region's size, the number of regions)."""
        masks = self.masks.reshape(-1, *self.masks.shape[-2:])
        labeled, n_regions = ndimage.label(masks, structure=REGIONS_PER_IMAGE)
        if n_regions == 0:
            raise ValueError('PRO needs at least one anomalous region in the masks')
        if self.b == 1:     # the placed pixels are all the regions' pixels
            labels = labeled.ravel()[self.placed.items]
            return 1.0 / np.bincount(labels, minlength=n_regions + 1)[labels], n_regions
        sizes = np.bincount(labeled.ravel())
        per_pixel = np.where(labeled > 0, 1.0 / sizes[labeled], 0.0).reshape(self.masks.shape)
        return self.pool(per_pixel).ravel()[self.placed.items], n_regions

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1), as MVTec AD's evaluation computes it:
        each anomaly-free pixel weighs 1 / all anomaly-free pixels, each region's pixel 1 / (its region's size
        * all regions)."""
        weights, n_regions = self.region_weights()
        tps = self.ranking.cumulative_placed(self.placed, self.positives.ravel()[self.placed.items])
        fps = self.ranking.at_or_above * float(self.ranking.weight) - tps
        return self.pro_points(fps, self.ranking.cumulative_placed(self.placed, weights), n_regions)

    def pro_points(self, fps: np.ndarray, region_sums: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
        fpr = np.clip(fps / (self.masks.size - np.count_nonzero(self.masks)), None, 1.0)
        pro = np.clip(region_sums / n_regions, None, 1.0)
        return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])

    def aupro(self, fpr_limit: float = PRO_FPR_LIMIT) -> float:
        """Normalised area under the PRO curve up to `fpr_limit` (1.0 is perfect), from the points where it
        bends (the same area as `pro_curve`'s every distinct threshold)."""
        weights, n_regions = self.region_weights()
        fpr, pro = self.pro_points(self.fps, self.ranking.sums(self.placed, weights), n_regions)
        return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds (predict defective when score >= threshold), and that threshold: as
    sklearn's precision_recall_curve gives it (thresholds down to the first of full recall; of equal F1s,
    the lowest threshold)."""
    ranking = Ranking(scores)
    tps, fps = ranking.counts(labels)
    thresholds = ranking.thresholds()
    if tps[-1] == 0:
        return 0.0, float(thresholds[-1])
    last = int(np.searchsorted(tps, tps[-1]))         # the first threshold reaching full recall
    tps, fps, thresholds = tps[:last + 1], fps[:last + 1], thresholds[:last + 1]
    precision, recall = tps / (tps + fps), tps / tps[-1]
    with np.errstate(divide='ignore', invalid='ignore'):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = len(f1) - 1 - int(np.argmax(f1[::-1]))      # of equal F1s, the lowest threshold
    return float(f1[best]), float(thresholds[best])


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1), as MVTec AD's evaluation computes it."""
    return Pixels(masks, maps).pro_curve()


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) (x ascending) from x[0] to x_max, interpolating y at x_max."""
    inside = x <= x_max
    area = np.trapezoid(y[inside], x[inside])
    if x_max not in x:
        k = int(np.searchsorted(x, x_max))          # first point beyond x_max
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_at) * (x_max - x[k - 1])
    return float(area)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (1.0 is perfect)."""
    return Pixels(masks, maps).aupro(fpr_limit)


def has_both_kinds(truth: np.ndarray | None) -> bool:
    """Whether binary truth holds positives and negatives: ROC AUC, AP and F1-max need both."""
    return truth is not None and bool(np.any(truth)) and not bool(np.all(truth))


def undefined_metrics(labels: np.ndarray, masks: np.ndarray | tuple | None) -> str | None:
    """Why some metrics of a test set are not defined (one line), or None when all are. `masks` are the
    masks or their paths (None entries for normal images), so this can be told before any work."""
    defective = bool(np.any(labels == 1))
    if not defective:
        return ('the test set holds normal images only: every metric needs defective test images too, so all are '
                'n/a (the result files still hold the scores)')
    pixel = (' and has no ground-truth masks, so the segmentation metrics are n/a too'
             if masks is None or all(m is None for m in masks) else
             '; the pixel metrics (Seg, AUPRO, pixel AP) need only masks and are reported')
    if not bool(np.any(labels == 0)):
        return ('the test set holds defective images only (no test/good): image AUROC (Det) and F1-max need '
                f'normal test images too and are n/a{pixel}')
    return None


def map_metrics(labels: np.ndarray, masks: np.ndarray | None, maps: np.ndarray,
                scores: np.ndarray | None = None) -> dict[str, float | None]:
    """All metrics of one map, None where they are not defined: the image-level ones without both normal and
    defective test images, the pixel-level ones without masks holding anomalous and normal pixels.
    `scores`: the method's own image scores, when they are not the map's maximum (PatchCore's)."""
    out: dict[str, float | None] = dict.fromkeys(('det', 'f1_max', 'f1_threshold', 'seg', 'aupro', 'pixel_ap'))
    if has_both_kinds(labels):
        scores = image_scores(maps) if scores is None else scores
        f1, threshold = f1_max(labels, scores)
        out.update(det=auroc(labels, scores), f1_max=f1, f1_threshold=threshold)
    if masks is not None and has_both_kinds(masks):
        pixels = Pixels(masks, maps)     # one sort of the pixels serves the three pixel-level metrics
        out.update(seg=pixels.auroc(), aupro=pixels.aupro(), pixel_ap=pixels.average_precision())
    return out
