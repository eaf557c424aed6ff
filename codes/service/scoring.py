"""The seam between the service and a method: load a model file, score a batch of decoded images.

Scoring goes through prediction.Predictor, the code main_predict.py runs, so one image gets the same
numbers from both. Another method plugs in by giving open_scorer a class with the same three methods.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model_file import load_model
from ..mvtecad import resize
from ..prediction import Predictor, open_search
from ..visualization import overlay_picture


@dataclass
class Scored:
    """One image's outcome, the fields of a predictions.csv row plus the map."""
    image: np.ndarray        # the 256x256 resized image
    map: np.ndarray          # the raw map (256,256) float64
    score: float
    normalized: float
    anomalous: bool
    area: float


class PatchSVDDScorer:
    """A Patch SVDD model file's predictor, kept for the process's life (its search state is reused)."""
    method = 'patch_svdd'

    def __init__(self, name: str, path: Path, model, predictor: Predictor):
        self.name, self.path, self.model, self.predictor = name, path, model, predictor
        self.thresholds = model.thresholds

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded HxWx3 uint8 image as the model reads it (main_predict's read_input after decoding)."""
        return resize(rgb, self.model.resize)

    def score(self, images: np.ndarray) -> list[Scored]:
        """Scores prepared (n,256,256,3) images together: one embedding pass and one search per K."""
        t = self.thresholds
        maps = self.predictor.maps(images)
        return [Scored(im, m, float(m.max()), float(t.normalize_scores(float(m.max()))),
                       bool(t.is_anomalous(float(m.max()))), float(t.anomalous_area(m))) for im, m in zip(images, maps)]

    def overlay(self, s: Scored) -> np.ndarray:
        """The picture main_predict.py saves: the image beside its heat map, anomalous region outlined."""
        return overlay_picture(s.image, self.thresholds.normalize_maps(s.map), s.map >= self.thresholds.pixel)

    def describe(self) -> dict:
        """What GET /models shows: method, settings, thresholds, provenance (no server paths)."""
        m = self.model
        return {'name': self.name, 'method': self.method, 'file': self.path.name,
                'settings': {'D': m.D, 'resize': m.resize, 'nn': m.nn},
                'thresholds': self.thresholds.to_dict(), 'provenance': m.info}


@contextlib.contextmanager
def open_scorer(name: str, path: Path, device: torch.device | str = 'cpu', batch_size: int = 32,
                cache_dir: Path | None = None) -> Iterator[PatchSVDDScorer]:
    """A loaded model ready to score; a problem with the file is a UserError naming it."""
    model = load_model(Path(path))
    with open_search(model, model.nn, cache_dir) as search:
        predictor = Predictor(model.encoder_module(device), search, model.thresholds, model.resize, device,
                              batch_size)
        scorer = PatchSVDDScorer(name, Path(path), model, predictor)
        # one image scored before the server says it is ready: the search's first-use set-up (centred rows,
        # coarse groups, about a second) is not paid by the first client
        scorer.score(np.clip(model.mean, 0, 255).astype(np.uint8)[None])
        yield scorer
