"""Building a Model from a class's checkpoint and images: the memory bank, the leave-one-image-out
scores of the training images, the test set's scores (when it has one) and the thresholds from them."""
from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch

from . import cli
from .checkpoints import file_sha256, load_encoder
from .embeddings import iter_batches
from .errors import UserError
from .files import check_writable
from .inspection import score_maps
from .memory_bank import load_or_build
from .model_file import Model
from .mvtecad import GOOD, ClassFiles, find_class, list_images, load_class, resolve_data_root
from .state_cache import cache_dir_for
from .prediction import Predictor, SearchBank, search_methods
from .thresholds import compute_thresholds

MAP_CHUNK = 16   # images whose maps are assembled at once (bounds memory, 0.5 MiB per map)


def find_export_class(root: Path, obj: str) -> ClassFiles:
    """The class's files; unlike evaluation, a class with normal training images only (no test set) is fine."""
    folder = root / obj
    test_dir = folder / 'test'
    has_test = test_dir.is_dir() and any(list_images(d) for d in test_dir.iterdir() if d.is_dir())
    if has_test or not folder.is_dir() or not list_images(folder / 'train' / GOOD):
        return find_class(root, obj)     # its checks and messages
    return ClassFiles(obj, folder, tuple(list_images(folder / 'train' / GOOD)), (), np.zeros(0, np.int32), None)


def loo_images(n_train: int, limit: int | None) -> np.ndarray:
    """Which training images are scored leave-one-out: all, or `limit` of them evenly spaced."""
    if n_train < 2:
        raise UserError('thresholds from normal images need at least 2 training images '
                        '(each is scored against the others)')
    if limit is None or limit >= n_train:
        return np.arange(n_train)
    return np.unique(np.linspace(0, n_train - 1, max(limit, 1)).round().astype(np.int64))


def leave_one_out(search: SearchBank, emb64: np.ndarray, emb32: np.ndarray, which: np.ndarray,
                  device: torch.device | str = 'cpu') -> tuple[np.ndarray, float, float]:
    """Each chosen training image's score against the bank without its own patches (one search per K),
    and the lowest and highest pixel of their maps."""
    s64, s32 = search.distances(emb64[which], emb32[which], device, leave_out=which)
    scores, low, high = np.empty(len(which)), np.inf, -np.inf
    for sl in iter_batches(len(which), MAP_CHUNK):
        maps = score_maps(s64[sl], s32[sl])['mult']
        scores[sl] = maps.max(axis=(1, 2))
        low, high = min(low, float(maps.min())), max(high, float(maps.max()))
    return scores, low, high


def build_model(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()) -> Model:
    """The model for args (main_evaluate.py's flags plus --normal_quantile, --threshold_from,
    --normal_images). Checks the inputs and that `outputs` can be written before any work."""
    started = time.perf_counter()
    device = cli.resolve_device(args.device)
    files = find_export_class(resolve_data_root(args.data_root), args.obj)
    ckpt = cli.encoder_path(args)
    for folder, what in outputs:
        check_writable(folder, what)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
    enc = load_encoder(ckpt, args.D, device)
    test = load_class(files, args.resize, train=False) if files.test else None   # bad images stop it before writes
    bank, _ = load_or_build(enc, ckpt, files, args.resize, device, cache_dir, args.batch_size)
    search = SearchBank.from_arrays(bank.mean, bank.emb64, bank.emb32, args.nn, bank.ngt32)
    if 'exact' in search_methods(args.nn) and device.type != 'cuda':
        for K in ('64', '32'):     # the cell indexes cached with the memory bank travel in the model file
            cached = bank.search(K, 'exact', device)
            search.searches[(K, str(device), False)] = cached
            search.index.update({f'exact{K}.{k}': v for k, v in cached.arrays().items()})
    which = loo_images(len(files.train), args.normal_images)
    train_scores, pixel_low, pixel_high = leave_one_out(search, bank.emb64, bank.emb32, which, device)
    test_scores = test_maps = None
    if test is not None:
        test_maps = Predictor(enc, search, None, args.resize, device, args.batch_size).maps(test.test)
        test_scores = test_maps.max(axis=(1, 2))
    thresholds = compute_thresholds(train_scores, (pixel_low, pixel_high), args.normal_quantile, args.threshold_from,
                                    test_scores, files.labels if test is not None else None, test_maps,
                                    test.masks if test is not None else None)
    info = {'obj': args.obj, 'checkpoint': ckpt.name, 'checkpoint_sha256': file_sha256(ckpt),
            'n_train': len(files.train), 'n_normal_scored': len(which), 'n_test': len(files.test),
            'n_defective': int(files.labels.sum()), 'has_masks': files.masks is not None,
            'threshold_from': args.threshold_from or 'auto',
            'created': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
            'export_seconds': round(time.perf_counter() - started, 1)}
    encoder = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in enc.state_dict().items()}
    return Model(args.D, args.resize, args.nn, encoder, bank.mean, bank.emb64, bank.emb32, thresholds, info,
                 index=search.index, ngt32=bank.ngt32)
