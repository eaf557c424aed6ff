"""What the methods on a pre-trained backbone (PSDL, PaDiM, PatchCore) share: the method object from its flags
or a model file's settings, fitting with the cache, and `BackboneDetector`, which scores images with a fitted
method for evaluation, export, prediction and the service alike (base.Detector).

The fitted state is the method's memory bank, cached by codes/state_cache.py under a key of the
method and its settings, the backbone weights' SHA-256 and every training image's name and SHA-256.
"""
from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import metrics
from ..backbones import Backbone
from ..checkpoints import file_sha256
from ..errors import UserError
from ..inputs import Inputs, resolve
from ..model_file import Model
from ..mvtecad import (GOOD, ClassFiles, LoadedClass, find_class, load_class_cropped, load_images_cropped,
                      resize_center_crop)
from ..reports import note_undefined_metrics
from ..state_cache import load_or_fit
from ..thresholds import Thresholds
from .base import Clock, Method
from .padim import DEFAULT_D, PaDiM
from .patchcore import PatchCore
from .psdl import PSDL

STATE_FORMAT = 1


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


@dataclass
class Fitted:
    """A backbone method fitted on a class's training images (or read from the cache)."""
    backbone: Backbone
    method: Method
    train: tuple[Path, ...]
    source: str                            # 'cached', 'built', 'rebuilt'
    state: dict[str, np.ndarray]
    batch_size: int
    features: dict[str, torch.Tensor] | None = None     # every training image's maps, when the fit computed them

    def features_of(self, which: np.ndarray) -> dict[str, torch.Tensor]:
        """The backbone maps of the training images `which` (indices into `train`): the fit's own when it asks
        for all of them in order (the same call would give the same maps), else read and computed again."""
        which = np.asarray(which)
        if self.features is not None and np.array_equal(which, np.arange(len(self.train))):
            return self.features
        paths = tuple(self.train[i] for i in which)
        return self.backbone.features(load_images_cropped(paths, self.method.resize_filter, 'train'), self.batch_size)


def fit_method(args: argparse.Namespace, inputs: Inputs, clock: Clock, before_fit=lambda method: None,
               keep_features: bool = False) -> Fitted:
    """The backbone and --method, fitted on the training images or loaded from the cache. `before_fit` runs
    before anything is computed (evaluation reads its test images there: a bad one stops the run first).
    `keep_features`: a fit keeps the training images' maps on the result (export's held-out scores need them)."""
    backbone = Backbone(args.backbone, args.backbone_weights, inputs.device)
    method = make_method(args, backbone)
    train = training_files(inputs.files, getattr(args, 'pool_classes', False))
    clock.lap('load_backbone')
    before_fit(method)

    kept: dict[str, dict[str, torch.Tensor]] = {}

    def fit() -> dict[str, np.ndarray]:
        images = load_images_cropped(train, method.resize_filter, 'train')
        clock.lap('load_train')
        features = backbone.features(images, args.batch_size)
        clock.lap('features_train')
        if keep_features:
            kept['features'] = features
        state = method.fit(features)
        clock.lap('fit')
        return state

    key = state_key(method, backbone, train)
    clock.lap('cache_key')
    state, source = load_or_fit(inputs.cache_dir, key, fit, method.valid)
    clock.lap('state')      # reading a cached entry (or writing a new one)
    method.load_state(state)
    return Fitted(backbone, method, train, source, state, args.batch_size, kept.get('features'))


def run_method(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()
               ) -> tuple[MethodResult, LoadedClass, Backbone, Inputs]:
    """Fits (or loads the cached state of) --method on the training images, scores the test images and
    measures them. Inputs are checked, and output folders found writable, before any work."""
    clock = Clock()
    inputs = resolve(args, outputs)
    files = inputs.files
    note_undefined_metrics(files.labels, files.masks)
    loaded: list[LoadedClass] = []

    def load_test(method: Method) -> None:
        loaded.append(load_class_cropped(files, method.resize_filter, train=False))
        clock.lap('load_test')

    fitted = fit_method(args, inputs, clock, before_fit=load_test)
    data, method = loaded[0], fitted.method
    maps, scores = BackboneDetector(fitted.backbone, method, None, args.batch_size).score(data.test)
    clock.lap('score')
    result_metrics = metrics.map_metrics(files.labels, data.masks, maps, scores)
    clock.lap('metrics')
    times = {**clock.times, **{f'fit_{k}': v for k, v in getattr(method, 'times', {}).items()}}
    return (MethodResult(method.name, maps, scores, result_metrics, fitted.source, len(fitted.train),
                         method.resize_filter, method.settings(), times), data, fitted.backbone, inputs)


def method_from_settings(name: str, settings: dict, backbone: Backbone) -> Method:
    """The method object a model file describes (its `settings`: the method's own, as settings() gives them)."""
    if name == 'psdl':
        return PSDL(backbone.channels, settings['type'], settings.get('layer') or 'layer3', settings['iterations'])
    if name == 'padim':
        return PaDiM(backbone.channels, int(settings['d']))
    if name == 'patchcore':
        return PatchCore(float(settings['coreset_ratio']), device=backbone.device)
    raise ValueError(f'{name!r} is not a method on a pre-trained backbone')


class BackboneDetector:
    """A fitted backbone method scoring images (base.Detector): the same calls for evaluation, export, predict
    and the service, so that one image gets one score. Images are 224x224 crops (`prepare`)."""

    def __init__(self, backbone: Backbone, method: Method, thresholds: Thresholds | None, batch_size: int = 16):
        self.backbone, self.fitted, self.thresholds, self.batch_size = backbone, method, thresholds, batch_size
        self.method, self.resize = method.name, method.resize_filter

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded HxWx3 uint8 image as the method reads it: short side 256, centre crop 224."""
        return np.asarray(resize_center_crop(Image.fromarray(rgb), self.resize))

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(maps (n, 224, 224) float64, image scores (n,)): the method's own image score, else the map's max."""
        maps, scores = self.fitted.score(self.backbone.features(images, self.batch_size))
        return maps, (scores if scores is not None else metrics.image_scores(maps))


@contextlib.contextmanager
def open_detector(model: Model, device: torch.device, batch_size: int = 32, nn: str | None = None,
                  cache_dir: Path | None = None) -> Iterator[BackboneDetector]:
    """A PSDL, PaDiM or PatchCore model file's detector: the backbone rebuilt from the file's weights, the
    method from its settings and fitted state (`nn` and `cache_dir` are Patch SVDD's and do not apply)."""
    backbone = Backbone.from_weights(model.settings['backbone'], model.weights, model.settings['backbone_sha256'],
                                     device)
    method = method_from_settings(model.method, model.settings, backbone)
    if not method.valid(model.state):
        raise UserError(f'model file {model.info.get("file", "")}: its {model.method} state does not fit its settings; '
                        'write it again with main_export.py')
    method.load_state(model.state)
    yield BackboneDetector(backbone, method, model.thresholds, batch_size)
