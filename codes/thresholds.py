"""Decision thresholds and normalised scores for prediction.

- From normal images only (no defective samples needed): every training image is scored against the
  memory bank without its own patches (leave-one-image-out), and the image threshold is a quantile of
  those scores (1.0 = their maximum). The normal-only pixel threshold is the same number: a pixel is
  anomalous when it reaches what the chosen quantile of the normal images' highest pixels reached, so
  an image is anomalous exactly when at least one of its pixels is.
- F1-max (anomalib's adaptive threshold): with labelled test images, the image-score threshold that
  maximises F1; with ground-truth masks, the pixel threshold that maximises pixel-level F1.
- Normalisation (anomalib's min-max convention): (x - threshold) / (max - min) + 0.5, clipped to
  [0, 1], with min and max over every score seen at export; the threshold maps to 0.5.

The decision rule is `score >= threshold` (anomalous), the convention of metrics.f1_max.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from . import metrics
from .errors import UserError

SOURCES = ('normal', 'f1')


@dataclass(frozen=True)
class Thresholds:
    """What a model needs to decide and normalise; stored in the model file as JSON."""
    image: float                 # image threshold (raw mult-map maximum)
    pixel: float                 # pixel threshold (raw mult-map value)
    image_source: str            # 'normal' or 'f1'
    pixel_source: str
    image_min: float             # normalisation ranges: scores seen at export
    image_max: float
    pixel_min: float
    pixel_max: float
    normal_quantile: float       # the quantile used for the normal-only thresholds
    normal_image: float          # the normal-only threshold, kept even when F1 was chosen
    f1_image: float | None = None        # F1-max thresholds and the F1 they reach (None: no labels / masks)
    f1_image_value: float | None = None
    f1_pixel: float | None = None
    f1_pixel_value: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Thresholds:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in data and cls.__dataclass_fields__[n].default is not None)
        if missing:
            raise ValueError(f'thresholds lack {", ".join(missing)}')
        return cls(**{k: v for k, v in data.items() if k in names})

    def normalize_scores(self, scores: np.ndarray | float) -> np.ndarray:
        return min_max_normalize(scores, self.image, self.image_min, self.image_max)

    def normalize_maps(self, maps: np.ndarray) -> np.ndarray:
        return min_max_normalize(maps, self.pixel, self.pixel_min, self.pixel_max)

    def is_anomalous(self, scores: np.ndarray | float) -> np.ndarray:
        return np.asarray(scores) >= self.image

    def anomalous_area(self, maps: np.ndarray) -> np.ndarray:
        """Fraction of each map's pixels at or above the pixel threshold."""
        return (np.asarray(maps) >= self.pixel).mean(axis=(-2, -1))


def min_max_normalize(values: np.ndarray | float, threshold: float, low: float, high: float) -> np.ndarray:
    """anomalib's normalisation: the threshold goes to 0.5, the range seen at export spans 1, clipped to [0, 1]."""
    span = max(high - low, np.finfo(np.float64).tiny)   # one score seen: avoid 0/0, keep the threshold at 0.5
    return np.clip((np.asarray(values, np.float64) - threshold) / span + 0.5, 0.0, 1.0)


def normal_threshold(scores: np.ndarray, quantile: float) -> float:
    """The `quantile` of the leave-one-out image scores of the training images (1.0: their maximum)."""
    if not 0.0 <= quantile <= 1.0:
        raise UserError(f'--normal_quantile must be between 0 and 1, not {quantile}')
    if len(scores) == 0:
        raise UserError('no training image scores for the normal threshold')
    return float(np.quantile(np.asarray(scores, np.float64), quantile))


def choose_source(wanted: str | None, has_defects: bool) -> str:
    """--threshold_from: f1 when the class has labelled defective test images, else normal."""
    if wanted is None:
        return 'f1' if has_defects else 'normal'
    if wanted not in SOURCES:
        raise UserError(f'--threshold_from must be one of {", ".join(SOURCES)}, not {wanted!r}')
    if wanted == 'f1' and not has_defects:
        raise UserError('--threshold_from f1 needs defective test images (test/<defect>/*); '
                        'this class has none: use --threshold_from normal')
    return wanted


def compute_thresholds(train_scores: np.ndarray, train_pixel_range: tuple[float, float], quantile: float,
                       wanted: str | None, test_scores: np.ndarray | None = None, labels: np.ndarray | None = None,
                       test_maps: np.ndarray | None = None, masks: np.ndarray | None = None) -> Thresholds:
    """Thresholds and normalisation from the training images' held-out scores (and pixel range),
    and, when the class has them, the test images' scores, labels, maps and masks."""
    has_defects = labels is not None and bool(np.any(labels == 1)) and bool(np.any(labels == 0))
    source = choose_source(wanted, has_defects)
    normal = normal_threshold(train_scores, quantile)
    f1_image = f1_image_value = f1_pixel = f1_pixel_value = None
    if has_defects:
        f1_image_value, f1_image = metrics.f1_max(labels, test_scores)
    if has_defects and masks is not None and masks.any():
        f1_pixel_value, f1_pixel = metrics.f1_max(masks.ravel(), test_maps.ravel())
    image = f1_image if source == 'f1' else normal
    pixel_source = 'f1' if source == 'f1' and f1_pixel is not None else 'normal'
    pixel = f1_pixel if pixel_source == 'f1' else normal
    seen = [np.asarray(train_scores, np.float64)] + ([np.asarray(test_scores, np.float64)]
                                                     if test_scores is not None and len(test_scores) else [])
    all_scores = np.concatenate(seen)
    pixel_min, pixel_max = train_pixel_range
    if test_maps is not None and len(test_maps):
        pixel_min, pixel_max = min(pixel_min, float(test_maps.min())), max(pixel_max, float(test_maps.max()))
    return Thresholds(image=float(image), pixel=float(pixel), image_source=source, pixel_source=pixel_source,
                      image_min=float(all_scores.min()), image_max=float(all_scores.max()),
                      pixel_min=float(pixel_min), pixel_max=float(pixel_max), normal_quantile=float(quantile),
                      normal_image=normal, f1_image=f1_image, f1_image_value=f1_image_value, f1_pixel=f1_pixel,
                      f1_pixel_value=f1_pixel_value)


def describe(t: Thresholds) -> str:
    """Printed by export: the chosen thresholds, where they came from, and the alternatives."""
    def f1_text(threshold: float | None, value: float | None) -> str:
        return 'n/a' if threshold is None else f'{threshold:.6g} (F1 {value:.3f})'
    return '\n'.join([
        f'image threshold {t.image:.6g} (from {t.image_source}); pixel threshold {t.pixel:.6g} (from {t.pixel_source})',
        f'  normal images, quantile {t.normal_quantile:g} of their held-out scores: {t.normal_image:.6g}',
        f'  F1-max on labelled test images: image {f1_text(t.f1_image, t.f1_image_value)}, '
        f'pixel {f1_text(t.f1_pixel, t.f1_pixel_value)}',
        f'  normalisation: image scores {t.image_min:.6g} .. {t.image_max:.6g}, '
        f'pixels {t.pixel_min:.6g} .. {t.pixel_max:.6g} (threshold -> 0.5)'])
