"""Patch SVDD as a detector: its encoder and memory bank (the fitted state), what evaluation prepares from the
flags (encoder, cached bank, test set), the bank as the searches see it, and `PatchSVDDDetector`, which scores
images for evaluation's callers, export, prediction and the service alike (base.Detector).

The image score is the maximum of the `mult` map (K=64 map x K=32 map, 256x256), as in the original.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_encoder, resolve_encoder_path
from ..files import make_dir
from ..inputs import resolve
from ..inspection import Evaluation, anomaly_maps, score_maps
from ..inspection import search_methods
from ..memory_bank import MemoryBank, load_or_build
from ..model_file import Model
from ..mvtecad import LoadedClass, load_class, resize
from ..nearest_neighbor import DEFAULT_EPS
from ..networks import EncoderHier
from ..reports import note_undefined_metrics
from ..state_cache import try_write
from ..thresholds import Thresholds


def encoder_path(args: argparse.Namespace, obj: str | None = None) -> Path:
    return resolve_encoder_path(obj or args.obj, args.ckpt, args.ckpt_dir, args.epochs, args.lambda_value, args.D)


@dataclass
class Prepared:
    """What an evaluation needs, loaded from the flags."""
    device: torch.device
    ckpt: Path
    enc: EncoderHier
    bank: MemoryBank
    bank_source: str      # 'cached', 'built' or 'rebuilt'
    data: LoadedClass     # test images and masks (training images are in the bank)
    times: dict[str, float]


def prepare(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()) -> Prepared:
    """Checks the inputs and that the (folder, what) outputs can be written, then loads the encoder, the
    memory bank (cached when allowed) and the test set. Folders are created only when written to."""
    inputs = resolve(args, outputs, checks=(lambda: encoder_path(args),))
    device, files, cache_dir, ckpt = inputs.device, inputs.files, inputs.cache_dir, encoder_path(args)
    note_undefined_metrics(files.labels, files.masks)
    enc = load_encoder(ckpt, args.D, device)
    times: dict[str, float] = {}

    def load_test() -> LoadedClass:
        started = time.perf_counter()
        data = load_class(files, args.resize, train=False)
        times['load_test'] = time.perf_counter() - started
        return data

    # The test set is read while a cached bank is read. A bank that has to be built waits for the test set
    # first: a bad test image stops the run before anything is written.
    with ThreadPoolExecutor(max_workers=1) as reader:
        test = reader.submit(load_test)
        started = time.perf_counter()
        bank, source = load_or_build(enc, ckpt, files, args.resize, device, cache_dir, args.batch_size,
                                     before_build=test.result)
        times['bank'] = time.perf_counter() - started
        data = test.result()
    return Prepared(device, ckpt, enc, bank, source, data, times)


@contextlib.contextmanager
def open_bank(model: Model, nn: str, cache_dir: Path | None) -> Iterator[MemoryBank]:
    """A model file's memory bank, ready to search with `nn` (the exact search's cell indexes come with the
    file). An NGT index is built once (by the first search): under <cache_dir>/models/<bank id>/ngt32 to be
    reused by later runs, or in a temporary folder with no cache; a model built from the memory bank cache
    uses the index kept there."""
    search_methods(nn)
    with contextlib.ExitStack() as stack:
        ngt32 = None
        if nn == 'ngt' and model.ngt32 is not None:     # built beside the memory bank's cache entry
            ngt32 = model.ngt32
        elif nn == 'ngt':
            folder = cache_dir / 'models' / model.bank_id if cache_dir is not None and model.bank_id else None
            if folder is None or not try_write(folder, lambda: make_dir(folder, 'cache')):
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix='patchsvdd-ngt-')))
            ngt32 = folder / 'ngt32'
        yield MemoryBank(model.mean, model.emb64, model.emb32, index=dict(model.index), ngt_path=ngt32)


ENCODER_BATCH = 8   # images per encoder pass, evaluation's default; a search batch may hold several passes


class PatchSVDDDetector:
    """Scores batches of 256x256 uint8 images with an encoder and a memory bank (base.Detector), through
    inspection.anomaly_maps, the code evaluation measures: one embedding pass and one search per K a batch."""
    method = 'patchsvdd'

    def __init__(self, enc: EncoderHier, bank: MemoryBank, thresholds: Thresholds | None, resize_filter: str,
                 nn: str = 'exact', device: torch.device | str = 'cpu', batch_size: int = 8,
                 eps: float = DEFAULT_EPS):
        search_methods(nn)
        self.enc, self.bank, self.thresholds, self.nn, self.eps = enc.eval(), bank, thresholds, nn, eps
        self.resize, self.device, self.batch_size = resize_filter, torch.device(device), batch_size

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded HxWx3 uint8 image as the model reads it: squashed to 256x256 with the model's filter."""
        return resize(rgb, self.resize)

    def evaluate(self, images: np.ndarray) -> Evaluation:
        """The patch scores and the four maps (K64, K32, sum, mult) of 256x256 images."""
        return anomaly_maps(self.enc, self.bank, images, self.nn, self.device,
                            min(self.batch_size, ENCODER_BATCH), self.eps)

    def maps(self, images: np.ndarray) -> np.ndarray:
        """The `mult` maps (n,256,256) float64."""
        return self.evaluate(images).maps['mult']

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mult maps, image scores: each map's maximum), as evaluation scores them."""
        maps = self.maps(images)
        return maps, maps.max(axis=(1, 2))


def normal_scores(bank: MemoryBank, which: np.ndarray, device: torch.device | str = 'cpu',
                  chunk: int = 16) -> tuple[np.ndarray, float, float]:
    """The training images `which`, each scored against the bank without its own patches (leave-one-image-out,
    exact; one search per K), and the lowest and highest pixel of their maps (assembled `chunk` at a time)."""
    s64 = bank.distances('64', bank.emb64[which], 'exact', device, leave_out=which)
    s32 = bank.distances('32', bank.emb32[which], 'exact', device, leave_out=which)
    scores, low, high = np.empty(len(which)), np.inf, -np.inf
    for start in range(0, len(which), chunk):
        maps = score_maps(s64[start:start + chunk], s32[start:start + chunk])['mult']
        scores[start:start + chunk] = maps.max(axis=(1, 2))
        low, high = min(low, float(maps.min())), max(high, float(maps.max()))
    return scores, low, high


@contextlib.contextmanager
def open_detector(model: Model, device: torch.device, batch_size: int = 32, nn: str | None = None,
                  cache_dir: Path | None = None) -> Iterator[PatchSVDDDetector]:
    """A Patch SVDD model file's detector, its search (`nn`, default the model's) kept while it is open."""
    nn = nn or model.nn
    with open_bank(model, nn, cache_dir) as bank:
        yield PatchSVDDDetector(model.encoder_module(device), bank, model.thresholds, model.resize, nn, device,
                                batch_size)
