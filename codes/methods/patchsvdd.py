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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..checkpoints import load_encoder, resolve_encoder_path
from ..devices import resolve_device
from ..embeddings import embed_images
from ..errors import UserError
from ..files import check_writable, make_dir
from ..inspection import score_maps
from ..inspection import search_methods as method_pair
from ..memory_bank import MemoryBank, load_or_build
from ..model_file import Model
from ..mvtecad import ClassFiles, LoadedClass, find_class, load_class, resize, resolve_data_root
from ..nearest_neighbor import METHODS, ExactSearch, nearest_distances
from ..networks import EncoderHier
from ..reports import note_undefined_metrics
from ..state_cache import cache_dir_for, try_write
from ..thresholds import Thresholds


def encoder_path(args: argparse.Namespace, obj: str | None = None) -> Path:
    return resolve_encoder_path(obj or args.obj, args.ckpt, args.ckpt_dir, args.epochs, args.lambda_value, args.D)


def resolve_inputs(args: argparse.Namespace) -> tuple[torch.device, ClassFiles, Path]:
    """Device, the class's files and the encoder checkpoint, checked in that order before any work."""
    device = resolve_device(args.device)
    files = find_class(resolve_data_root(args.data_root), args.obj)
    return device, files, encoder_path(args)


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
    device, files, ckpt = resolve_inputs(args)
    note_undefined_metrics(files.labels, files.masks)
    for folder, what in outputs:
        check_writable(folder, what)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
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


def search_methods(nn: str) -> tuple[str, str]:
    """(K=64 method, K=32 method) for --nn, as evaluation pairs them; an unknown method is refused."""
    if nn not in METHODS:
        raise UserError(f'--nn must be one of {", ".join(METHODS)}, not {nn!r}')
    return method_pair(nn)


@dataclass
class SearchBank:
    """The memory bank as the searches see it, kept for the whole run so that its search state is reused.

    `ngt32` is where a K=32 NGT index is kept (built on first use, reopened after); `index` holds the
    exact search's cell indexes (`exact64.<name>`, `exact32.<name>`: read from a model file, or built on
    first use and then saved with an exported model); `searches` the fitted search objects of this run.
    """
    mean: np.ndarray            # (256,256,3) training mean image
    emb64: np.ndarray           # (M64, D) rows
    emb32: np.ndarray           # (M32, D) rows
    nn: str
    ngt32: Path | None = None
    index: dict[str, np.ndarray] = field(default_factory=dict)
    groups: tuple[np.ndarray, np.ndarray] | None = None   # per row: the training image it came from
    searches: dict = field(default_factory=dict, repr=False)

    def exact_search(self, K: str, device: torch.device | str, leave_out: bool = False) -> ExactSearch:
        """The fitted exact search over the K bank: from the saved index, else built once for the run.
        Leave-one-out needs its own index (equal rows of different images are kept apart)."""
        key = (K, str(device), leave_out)
        if key not in self.searches:
            emb = self.emb64 if K == '64' else self.emb32
            prefix = f'exact{K}.'
            saved = {k[len(prefix):]: v for k, v in self.index.items() if k.startswith(prefix)}
            search = None if leave_out or not saved else ExactSearch.from_arrays(emb, saved, device)
            if search is None:
                groups = self.groups[0 if K == '64' else 1] if leave_out else None
                search = ExactSearch(device).fit(emb, groups)
                if not leave_out and search.arrays() is not None:
                    self.index.update({prefix + k: v for k, v in search.arrays().items()})
            self.searches[key] = search
        return self.searches[key]

    @classmethod
    def from_arrays(cls, mean: np.ndarray, emb64: np.ndarray, emb32: np.ndarray, nn: str,
                    ngt32: Path | None = None, index: dict[str, np.ndarray] | None = None) -> SearchBank:
        n = len(emb64)
        groups = (np.repeat(np.arange(n), emb64[0, ..., 0].size), np.repeat(np.arange(n), emb32[0, ..., 0].size))
        return cls(mean, emb64.reshape(-1, emb64.shape[-1]), emb32.reshape(-1, emb32.shape[-1]), nn, ngt32,
                   index or {}, groups)

    def distances(self, q64: np.ndarray, q32: np.ndarray, device: torch.device | str = 'cpu',
                  leave_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Patch scores of (n,13,13,D) and (n,57,57,D) queries: one search per K for the whole batch.

        `leave_out` (one training image index per query image) excludes that image's own patches from
        its search (leave-one-image-out, exact search only)."""
        method64, method32 = search_methods(self.nn)
        groups64 = groups32 = bank64 = bank32 = None
        if leave_out is not None:
            method64 = method32 = 'exact'
            groups64 = np.repeat(leave_out, q64[0, ..., 0].size)
            groups32 = np.repeat(leave_out, q32[0, ..., 0].size)
            bank64, bank32 = self.groups
        loo = leave_out is not None
        s64 = nearest_distances(q64, self.emb64, method64, device, desc='search K=64',
                                query_groups=groups64, bank_groups=bank64,
                                search=self.exact_search('64', device, loo) if method64 == 'exact' else None)
        ngt = self.ngt32 if method32 == 'ngt' else None
        s32 = nearest_distances(q32, self.emb32, method32, device, desc='search K=32', ngt_path=ngt,
                                query_groups=groups32, bank_groups=bank32,
                                search=self.exact_search('32', device, loo) if method32 == 'exact' else None)
        return s64, s32


@contextlib.contextmanager
def open_search(model: Model, nn: str, cache_dir: Path | None) -> Iterator[SearchBank]:
    """The model's bank ready to search with `nn`. An NGT index is built once (by the first search): under
    <cache_dir>/models/<bank id>/ngt32 to be reused by later runs, or in a temporary folder with no cache;
    a model built from the memory bank cache uses the index kept there."""
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
        yield SearchBank.from_arrays(model.mean, model.emb64, model.emb32, nn, ngt32, model.index)


ENCODER_BATCH = 8   # images per encoder pass, evaluation's default; a search batch may hold several passes


class PatchSVDDDetector:
    """Scores batches of 256x256 uint8 images with an encoder and a memory bank (base.Detector); `batch_size`
    images are read together and searched with one call per K."""
    method = 'patchsvdd'

    def __init__(self, enc: EncoderHier, search: SearchBank, thresholds: Thresholds | None, resize_filter: str,
                 device: torch.device | str = 'cpu', batch_size: int = 8):
        self.enc, self.search, self.thresholds = enc.eval(), search, thresholds
        self.resize, self.device, self.batch_size = resize_filter, torch.device(device), batch_size

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """A decoded HxWx3 uint8 image as the model reads it: squashed to 256x256 with the model's filter."""
        return resize(rgb, self.resize)

    def maps(self, images: np.ndarray) -> np.ndarray:
        """The `mult` maps (n,256,256) float64: one embedding pass and one search per K for the batch."""
        q64, q32 = embed_images(self.enc, images, self.search.mean, self.device, min(self.batch_size, ENCODER_BATCH),
                                desc='embed')
        s64, s32 = self.search.distances(q64, q32, self.device)
        return score_maps(s64, s32)['mult']

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mult maps, image scores: each map's maximum), as evaluation scores them."""
        maps = self.maps(images)
        return maps, maps.max(axis=(1, 2))


@contextlib.contextmanager
def open_detector(model: Model, device: torch.device, batch_size: int = 32, nn: str | None = None,
                  cache_dir: Path | None = None) -> Iterator[PatchSVDDDetector]:
    """A Patch SVDD model file's detector, its search (`nn`, default the model's) kept while it is open."""
    with open_search(model, nn or model.nn, cache_dir) as search:
        yield PatchSVDDDetector(model.encoder_module(device), search, model.thresholds, model.resize, device,
                                batch_size)
