"""Building a Model from a class's images: Patch SVDD's memory bank from its checkpoint, or a backbone method's
fitted state; the training images scored honestly (none by a model that saw it), the test set's scores (when
it has one) and the thresholds from them."""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np

from . import metrics
from .backbones import feature_weights
from .checkpoints import file_sha256, load_encoder
from .errors import UserError
from .inputs import resolve
from .memory_bank import load_or_build
from .methods.backbone import BackboneDetector, fit_method
from .methods.base import Clock
from .methods.patchsvdd import PatchSVDDDetector, encoder_path, normal_scores
from .model_file import Model
from .mvtecad import CROP_RESIZE, CROP_SIZE, load_class, load_class_cropped
from .thresholds import compute_thresholds

def loo_images(n_train: int, limit: int | None) -> np.ndarray:
    """Which training images are scored leave-one-out: all, or `limit` of them evenly spaced."""
    if n_train < 2:
        raise UserError('thresholds from normal images need at least 2 training images '
                        '(each is scored against the others)')
    if limit is None or limit >= n_train:
        return np.arange(n_train)
    return np.unique(np.linspace(0, n_train - 1, max(limit, 1)).round().astype(np.int64))


def build_model(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()) -> Model:
    """The model for args (main_evaluate.py's flags plus --normal_quantile, --threshold_from,
    --normal_images), of --method. Checks the inputs and that `outputs` can be written before any work."""
    if getattr(args, 'method', None) not in (None, 'patchsvdd'):
        return build_method_model(args, outputs)
    started = time.perf_counter()
    inputs = resolve(args, outputs, normal_only=True, checks=(lambda: encoder_path(args),))
    device, files, ckpt = inputs.device, inputs.files, encoder_path(args)
    enc = load_encoder(ckpt, args.D, device)
    test = load_class(files, args.resize, train=False) if files.test else None   # bad images stop it before writes
    bank, _ = load_or_build(enc, ckpt, files, args.resize, device, inputs.cache_dir, args.batch_size)
    if args.nn != 'brute' and device.type != 'cuda':
        for K in ('64', '32'):     # the cell indexes (cached with the memory bank) travel in the model file
            bank.search(K, 'exact', device)
    which = loo_images(len(files.train), args.normal_images)
    train_scores, pixel_low, pixel_high = normal_scores(bank, which, device)
    test_scores = test_maps = None
    if test is not None:
        detector = PatchSVDDDetector(enc, bank, None, args.resize, args.nn, device, args.batch_size, args.nn_eps)
        test_maps, test_scores = detector.score(test.test)
    thresholds = compute_thresholds(train_scores, (pixel_low, pixel_high), args.normal_quantile, args.threshold_from,
                                    test_scores, files.labels if test is not None else None, test_maps,
                                    test.masks if test is not None else None)
    info = {'obj': args.obj, 'checkpoint': ckpt.name, 'checkpoint_sha256': file_sha256(ckpt),
            'normal_scores': 'leave-one-image-out (the memory bank without the image\'s patches)',
            'n_train': len(files.train), 'n_normal_scored': len(which), 'n_test': len(files.test),
            'n_defective': int(files.labels.sum()), 'has_masks': files.masks is not None,
            'threshold_from': args.threshold_from or 'auto',
            'created': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
            'export_seconds': round(time.perf_counter() - started, 1)}
    encoder = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in enc.state_dict().items()}
    return Model.patchsvdd(args.D, args.resize, args.nn, encoder, bank.mean, bank.emb64, bank.emb32, thresholds, info,
                           index=bank.index, ngt32=bank.ngt32)


def build_method_model(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()) -> Model:
    """A model of a backbone method (--method psdl, padim or patchcore): the fitted state (cached like
    evaluation's), the backbone's layer1-3 weights, and thresholds from the training images scored by a
    model that did not see them (each method's `held_out`) and from the test set when there is one."""
    started = time.perf_counter()
    inputs = resolve(args, outputs, normal_only=True)
    files = inputs.files
    test: list = []

    def load_test(method) -> None:       # bad test images stop the export before anything is computed
        test.append(load_class_cropped(files, method.resize_filter, train=False) if files.test else None)

    fitted = fit_method(args, inputs, Clock(), before_fit=load_test, keep_features=True)
    backbone, method = fitted.backbone, fitted.method
    which = loo_images(len(fitted.train), args.normal_images)
    train_maps, train_scores = method.held_out(fitted.features_of, which, len(fitted.train))
    if train_scores is None:
        train_scores = metrics.image_scores(train_maps)
    test_maps = test_scores = None
    if test[0] is not None:
        test_maps, test_scores = BackboneDetector(backbone, method, None, args.batch_size).score(test[0].test)
    thresholds = compute_thresholds(train_scores, (float(train_maps.min()), float(train_maps.max())),
                                    args.normal_quantile, args.threshold_from, test_scores,
                                    files.labels if test_scores is not None else None, test_maps,
                                    test[0].masks if test_scores is not None else None)
    info = {'obj': args.obj, 'backbone': backbone.name, 'backbone_file': backbone.path.name,
            'backbone_sha256': backbone.sha256, 'n_train': len(fitted.train), 'n_normal_scored': len(which),
            'normal_scores': method.held_out_rule,
            'n_test': len(files.test), 'n_defective': int(files.labels.sum()), 'has_masks': files.masks is not None,
            'threshold_from': args.threshold_from or 'auto', 'fitted_state': fitted.source,
            'created': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
            'export_seconds': round(time.perf_counter() - started, 1)}
    settings = {'backbone': backbone.name, 'backbone_sha256': backbone.sha256, **method.settings()}
    preprocessing = {'resize': method.resize_filter, 'size': CROP_RESIZE, 'crop': CROP_SIZE}
    return Model(method.name, settings, preprocessing, feature_weights(backbone.name, backbone.module),
                 dict(fitted.state), thresholds, info)
