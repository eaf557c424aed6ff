"""The methods on a pre-trained backbone (PSDL, PaDiM, PatchCore): one small object each behind `make_method`,
and the evaluation they share.

Every method object has the same shape: `fit(features) -> state arrays` on the training images' backbone
maps, `load_state(arrays)`, `valid(arrays)` (a cached entry's arrays fit these settings), `settings()`
(what its cache key holds) and `score(features) -> (maps, image scores or None)` on the test images'.
The fitted state is the method's memory bank, cached by codes/state_cache.py under a key of the
method and its settings, the backbone weights' SHA-256 and every training image's name and SHA-256.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import metrics
from .backbones import Backbone
from .checkpoints import file_sha256
from .errors import UserError
from .files import check_writable
from .mvtecad import GOOD, ClassFiles, LoadedClass, find_class, load_class_cropped, load_images_cropped
from .padim import DEFAULT_D, PaDiM
from .patchcore import PatchCore
from .psdl import PSDL
from .reports import note_undefined_metrics
from .state_cache import cache_dir_for, load_or_fit

METHODS = ('patchsvdd', 'psdl', 'padim', 'patchcore')
PRETRAINED = METHODS[1:]
STATE_FORMAT = 1


class Method(Protocol):
    name: str
    resize_filter: str

    def settings(self) -> dict: ...
    def fit(self, features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]: ...
    def load_state(self, state: dict[str, np.ndarray]) -> None: ...
    def valid(self, state: dict[str, np.ndarray]) -> bool: ...
    def score(self, features: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray | None]: ...


def make_method(args: argparse.Namespace, backbone: Backbone) -> Method:
    """The method object named by --method, with its flags."""
    if args.method == 'psdl':
        return PSDL(backbone.channels, args.psdl_type, args.layer)
    if args.method == 'padim':
        return PaDiM(backbone.channels, args.padim_d or DEFAULT_D[backbone.name])
    if args.method == 'patchcore':
        if not 0 < args.coreset_ratio <= 1:
            raise UserError(f'--coreset_ratio must be in (0, 1], not {args.coreset_ratio}')
        return PatchCore(args.coreset_ratio, device=backbone.device)
    raise UserError(f'--method {args.method!r} does not run on a pre-trained backbone')


def training_files(files: ClassFiles, pool_classes: bool) -> tuple[Path, ...]:
    """The class's training images, or with pool_classes every class's under the data root (the
    PSDL repository's `class_name='all'`: sub-folders holding train/good, sorted by name)."""
    if not pool_classes:
        return files.train
    root = files.folder.parent
    classes = sorted(p.name for p in root.iterdir() if (p / 'train' / GOOD).is_dir())
    return tuple(path for obj in classes for path in find_class(root, obj).train)


def state_key(method: Method, backbone: Backbone, train: tuple[Path, ...]) -> dict:
    return {'format': STATE_FORMAT, 'method': method.name, 'settings': method.settings(),
            'backbone': backbone.name, 'backbone_sha256': backbone.sha256, 'resize': method.resize_filter,
            'train': [[f'{p.parent.parent.parent.name}/{p.name}', file_sha256(p)] for p in train]}


@dataclass
class MethodResult:
    method: str
    maps: np.ndarray                       # (N, 224, 224) float64
    image_scores: np.ndarray               # (N,)
    metrics: dict[str, float | None]
    state_source: str                      # 'cached', 'built', 'rebuilt'
    n_train: int
    method_resize: str                     # the PIL filter the images were resized with
    settings: dict                         # the method's settings (its cache key's)
    times: dict[str, float] = field(default_factory=dict)


class Clock:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


def run_method(args: argparse.Namespace, files: ClassFiles, device: torch.device,
               outputs: tuple[tuple[Path, str], ...] = ()) -> tuple[MethodResult, LoadedClass, Backbone]:
    """Fits (or loads the cached state of) --method on the training images, scores the test images and
    measures them. Inputs are checked, and output folders found writable, before any work."""
    clock = Clock()
    note_undefined_metrics(files.labels, files.masks)
    backbone = Backbone(args.backbone, args.backbone_weights, device)
    method = make_method(args, backbone)
    train = training_files(files, getattr(args, 'pool_classes', False))
    for folder, what in outputs:
        check_writable(folder, what)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
    clock.lap('load_backbone')
    data = load_class_cropped(files, method.resize_filter, train=False)    # bad test images stop it before any write
    clock.lap('load_test')

    def fit() -> dict[str, np.ndarray]:
        images = load_images_cropped(train, method.resize_filter, 'train')
        clock.lap('load_train')
        features = backbone.features(images, args.batch_size)
        clock.lap('features_train')
        state = method.fit(features)
        clock.lap('fit')
        return state

    key = state_key(method, backbone, train)
    clock.lap('cache_key')
    state, source = load_or_fit(cache_dir, key, fit, method.valid)
    clock.lap('state')      # reading a cached entry (or writing a new one)
    method.load_state(state)
    features = backbone.features(data.test, args.batch_size)
    clock.lap('features_test')
    maps, image_scores = method.score(features)
    clock.lap('score')
    result_metrics = metrics.map_metrics(files.labels, data.masks, maps, image_scores)
    clock.lap('metrics')
    times = {**clock.times, **{f'fit_{k}': v for k, v in getattr(method, 'times', {}).items()}}
    scores = image_scores if image_scores is not None else metrics.image_scores(maps)
    return (MethodResult(method.name, maps, scores, result_metrics, source, len(train), method.resize_filter,
                         method.settings(), times), data, backbone)


def result_line(method: str, m: dict[str, float | None], obj: str) -> str:
    """`|psdl| Det: 98.1 Seg: 97.0 (bottle)`, Patch SVDD's line for one map."""
    def pct(v: float | None) -> str:
        return f'{v * 100:4.1f}' if v is not None else ' n/a'
    return f'|{method}| Det: {pct(m["det"])} Seg: {pct(m["seg"])} ({obj})'
