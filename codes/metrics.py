"""Detection and segmentation metrics over anomaly maps.

Image AUROC and pixel AUROC are the original's (scikit-learn's ROC AUC). The field's further metrics:
- AUPRO up to 30% FPR, by MVTec AD's definition: the ground-truth masks' connected components
  (8-connectivity); at each threshold the per-region overlap averaged over all regions (PRO) against
  the false-positive rate over all anomaly-free pixels; the curve integrated up to FPR 0.3
  (interpolated there) and divided by 0.3;
- pixel average precision;
- image-level F1-max, with the threshold that attains it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

PRO_FPR_LIMIT = 0.3
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def image_scores(maps: np.ndarray) -> np.ndarray:
    """An image's anomaly score is the maximum of its map."""
    return maps.max(axis=(-2, -1))


def detection_auroc(labels: np.ndarray, maps: np.ndarray) -> float:
    """Image-level ROC AUC; labels 1 defective, 0 normal."""
    return float(roc_auc_score(labels, image_scores(maps)))


def segmentation_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level ROC AUC over all test pixels."""
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pixel_average_precision(masks: np.ndarray, maps: np.ndarray) -> float:
    return float(average_precision_score(masks.ravel(), maps.ravel()))


class Ranking:
    """All pixels of a set of maps sorted once by score, highest first, with the last position of each
    distinct score: ROC AUC, average precision and the PRO curve are all read off this one sort."""

    def __init__(self, maps: np.ndarray):
        flat = maps.ravel()
        self.order = np.argsort(flat, kind='stable')[::-1]
        self.last_of_tie = np.append(np.diff(flat[self.order]) != 0, True)   # one point per distinct threshold

    def counts(self, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives when predicting positive at or above each distinct score."""
        tps = np.cumsum(truth.ravel()[self.order], dtype=np.float64)[self.last_of_tie]
        fps = np.flatnonzero(self.last_of_tie) + 1 - tps
        return tps, fps

    def auroc(self, truth: np.ndarray) -> float:
        """As sklearn's roc_auc_score: the trapezoidal area under (FPR, TPR) from (0, 0)."""
        tps, fps = self.counts(truth)
        return float(np.trapezoid(np.r_[0, tps] / tps[-1], np.r_[0, fps] / fps[-1]))

    def average_precision(self, truth: np.ndarray) -> float:
        """As sklearn's average_precision_score: sum over thresholds of (recall step) x precision."""
        tps, fps = self.counts(truth)
        precision = tps / (tps + fps)
        return float(np.sum(np.diff(np.r_[0, tps / tps[-1]]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The best F1 over all thresholds (predict defective when score >= threshold), and that threshold."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(divide='ignore', invalid='ignore'):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pro_curve(masks: np.ndarray, maps: np.ndarray, ranking: Ranking | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, from (0, 0) to (1, 1), as MVTec AD's evaluation computes it."""
    fp_weight = np.zeros(maps.shape, np.float64)     # each anomaly-free pixel: 1 / all anomaly-free pixels
    pro_weight = np.zeros(maps.shape, np.float64)    # each region's pixel: 1 / (its region's size * all regions)
    n_regions = 0
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
        fp_weight[i][labeled == 0] = 1.0
        if n:
            sizes = np.bincount(labeled.ravel())
            pro_weight[i] = np.where(labeled > 0, 1.0 / sizes[labeled], 0.0)
        n_regions += n
    if n_regions == 0:
        raise ValueError('PRO needs at least one anomalous region in the masks')
    ranking = ranking or Ranking(maps)
    order, last_of_tie = ranking.order, ranking.last_of_tie
    fpr = np.cumsum(fp_weight.ravel()[order])[last_of_tie] / fp_weight.sum()
    pro = np.cumsum(pro_weight.ravel()[order])[last_of_tie] / n_regions
    fpr, pro = np.clip(fpr, None, 1.0), np.clip(pro, None, 1.0)
    return np.concatenate([[0.0], fpr, [1.0]]), np.concatenate([[0.0], pro, [1.0]])


def area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) (x ascending) from x[0] to x_max, interpolating y at x_max."""
    inside = x <= x_max
    area = np.trapezoid(y[inside], x[inside])
    if x_max not in x:
        k = int(np.searchsorted(x, x_max))          # first point beyond x_max
        y_at = y[k - 1] + (y[k] - y[k - 1]) * (x_max - x[k - 1]) / (x[k] - x[k - 1])
        area += 0.5 * (y[k - 1] + y_at) * (x_max - x[k - 1])
    return float(area)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = PRO_FPR_LIMIT,
          ranking: Ranking | None = None) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (1.0 is perfect)."""
    fpr, pro = pro_curve(masks, maps, ranking)
    return area_up_to(fpr, pro, fpr_limit) / fpr_limit


def map_metrics(labels: np.ndarray, masks: np.ndarray | None, maps: np.ndarray) -> dict[str, float | None]:
    """All metrics of one map; the pixel-level ones are None when the class has no masks."""
    scores = image_scores(maps)
    f1, threshold = f1_max(labels, scores)
    out: dict[str, float | None] = {'det': float(roc_auc_score(labels, scores)), 'f1_max': f1,
                                    'f1_threshold': threshold, 'seg': None, 'aupro': None, 'pixel_ap': None}
    if masks is not None:
        ranking = Ranking(maps)          # one sort of the pixels serves the three pixel-level metrics
        out.update(seg=ranking.auroc(masks), aupro=aupro(masks, maps, ranking=ranking),
                   pixel_ap=ranking.average_precision(masks))
    return out
