"""Detection and segmentation metrics over anomaly maps (scikit-learn's ROC AUC, as the original)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def image_scores(maps: np.ndarray) -> np.ndarray:
    """An image's anomaly score is the maximum of its map."""
    return maps.max(axis=(-2, -1))


def detection_auroc(labels: np.ndarray, maps: np.ndarray) -> float:
    """Image-level ROC AUC; labels 1 defective, 0 normal."""
    return float(roc_auc_score(labels, image_scores(maps)))


def segmentation_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Pixel-level ROC AUC over all test pixels."""
    return float(roc_auc_score(masks.ravel(), maps.ravel()))
