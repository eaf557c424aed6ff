"""The interfaces every method implements.

`Detector`: a fitted method scoring images, whatever the method: `prepare` turns a decoded RGB image into
what the method reads (Patch SVDD: squashed to 256x256; the others: short side 256, centre crop 224), and
`score` gives each image's map and its image score (Patch SVDD: the mult map's maximum; PatchCore: its
re-weighted score; PSDL, PaDiM: the map's maximum). Evaluation, export, main_predict.py, the Python API and
the service all score through it, so one image gets one score.

`Method`: a method on a pre-trained backbone, on the backbone's layer1-3 maps: `fit` -> its fitted state
(arrays: what the cache and the model file hold), `load_state`, `valid` (a cached entry fits these
settings), `settings`, `score`, and `held_out`: training images scored by a model that did not see them
(for normal-only thresholds, each method in its own way; `held_out_rule` says how, in words).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ..thresholds import Thresholds

FeaturesOf = Callable[[np.ndarray], dict[str, torch.Tensor]]   # training image indices -> their backbone maps


class Detector(Protocol):
    method: str
    thresholds: Thresholds | None
    batch_size: int                  # images read and scored together

    def prepare(self, rgb: np.ndarray) -> np.ndarray: ...
    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class Method(Protocol):
    name: str
    resize_filter: str
    held_out_rule: str

    def settings(self) -> dict: ...
    def fit(self, features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...
    def valid(self, state: dict[str, np.ndarray]) -> bool: ...
    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]: ...
    def held_out(self, features_of: FeaturesOf, which: np.ndarray,
                 n_train: int) -> tuple[np.ndarray, np.ndarray | None]: ...


class Clock:
    """Seconds per named stage of a run (a stage named twice adds up)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now
