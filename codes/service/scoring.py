"""The seam between the service and a method: load a model file, score a batch of decoded images.

Scoring goes through prediction.open_detector, the code main_predict.py runs, so one image gets the
same numbers from both, for every method a model file can hold.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model_file import Model, load_model
from ..methods.base import Detector
from ..prediction import open_detector
from ..visualization import overlay_picture


@dataclass
class Scored:
    """One image's outcome, the fields of a predictions.csv row plus the map."""
    image: np.ndarray        # the image as the model read it (Patch SVDD 256x256, the others a 224x224 crop)
    map: np.ndarray          # the raw map, float64
    score: float
    normalized: float
    anomalous: bool
    area: float


class Scorer:
    """A model file's detector, kept for the process's life (its search state is reused)."""

    def __init__(self, name: str, path: Path, model: Model, detector: Detector):
        self.name, self.path, self.model, self.detector = name, path, model, detector
        self.method = model.method
        self.thresholds = model.thresholds

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded HxWx3 uint8 image as the model reads it (main_predict's read_input after decoding)."""
        return self.detector.prepare(rgb)

    def score(self, images: np.ndarray) -> list[Scored]:
        """Scores prepared images together (for Patch SVDD: one embedding pass and one search per K)."""
        t = self.thresholds
        maps, scores = self.detector.score(images)
        return [Scored(im, m, float(s), float(t.normalize_scores(float(s))), bool(t.is_anomalous(float(s))),
                       float(t.anomalous_area(m))) for im, m, s in zip(images, maps, scores)]

    def overlay(self, s: Scored) -> np.ndarray:
        """The picture main_predict.py saves: the image beside its heat map, anomalous region outlined."""
        return overlay_picture(s.image, self.thresholds.normalize_maps(s.map), s.map >= self.thresholds.pixel)

    def describe(self) -> dict:
        """What GET /models shows: method, settings, thresholds, provenance (no server paths)."""
        m = self.model
        return {'name': self.name, 'method': self.method, 'file': self.path.name,
                'settings': {**m.settings, **m.preprocessing}, 'thresholds': self.thresholds.to_dict(),
                'provenance': m.info}


@contextlib.contextmanager
def open_scorer(name: str, path: Path, device: torch.device | str = 'cpu', batch_size: int = 32,
                cache_dir: Path | None = None) -> Iterator[Scorer]:
    """A loaded model ready to score; a problem with the file is a UserError naming it."""
    model = load_model(Path(path))
    with open_detector(model, device, batch_size, None, cache_dir) as detector:
        scorer = Scorer(name, Path(path), model, detector)
        # one image scored before the server says it is ready: the search's first-use set-up (centred rows,
        # coarse groups, about a second) is not paid by the first client
        grey = np.full((256, 256, 3), 128, np.uint8)
        scorer.score(scorer.prepare(grey)[None])
        yield scorer
