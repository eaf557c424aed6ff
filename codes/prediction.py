"""Prediction on new images: find the inputs, read them, and score them a batch at a time.

A batch of images is read (on a small thread pool, the next batch while the current one is scored),
embedded, and searched with one nearest_distances call per K, so that a search's per-call cost (opening
an index, pruning) is paid once per batch, not per image. The image score is the maximum of the `mult`
map (K=64 map x K=32 map, 256x256), exactly as in evaluation.
"""
from __future__ import annotations

import contextlib
import glob
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .embeddings import embed_images, iter_batches
from .errors import UserError
from .files import make_dir
from .state_cache import try_write
from .inspection import score_maps
from .model_file import Model
from .mvtecad import IMAGE_EXTENSIONS, read_image, resize, to_rgb_array
from .inspection import search_methods as method_pair
from .nearest_neighbor import METHODS, ExactSearch, nearest_distances
from .networks import EncoderHier
from .thresholds import Thresholds


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


class Predictor:
    """Scores batches of 256x256 uint8 images with an encoder and a memory bank; `batch_size` images
    are read together and searched with one call per K."""

    def __init__(self, enc: EncoderHier, search: SearchBank, thresholds: Thresholds | None, resize_filter: str,
                 device: torch.device | str = 'cpu', batch_size: int = 8):
        self.enc, self.search, self.thresholds = enc.eval(), search, thresholds
        self.resize, self.device, self.batch_size = resize_filter, torch.device(device), batch_size

    def maps(self, images: np.ndarray) -> np.ndarray:
        """The `mult` maps (n,256,256) float64: one embedding pass and one search per K for the batch."""
        q64, q32 = embed_images(self.enc, images, self.search.mean, self.device, min(self.batch_size, ENCODER_BATCH),
                                desc='embed')
        s64, s32 = self.search.distances(q64, q32, self.device)
        return score_maps(s64, s32)['mult']


@dataclass
class ImageResult:
    """One input's outcome: its map (None when it failed) and the numbers derived from it."""
    path: Path
    image: np.ndarray | None = None     # the 256x256 resized image
    map: np.ndarray | None = None       # the raw mult map
    score: float | None = None
    normalized: float | None = None
    anomalous: bool | None = None
    area: float | None = None
    error: str | None = None


def find_inputs(inputs: list[str]) -> list[Path]:
    """Image files from --input values: a file as given, a folder searched recursively, or a glob.
    Folders and globs keep files with an image extension (any case); the result is sorted and unique."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            found += [p for p in path.rglob('*') if is_image_name(p) and not p.is_dir()]
        elif path.exists() or path.is_symlink():
            found.append(path)
        elif glob.has_magic(text):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=True)]
            found += [p for p in matches if is_image_name(p) and not p.is_dir()]
        else:
            raise UserError(f'--input {text}: no such file, folder or matching glob')
    unique = sorted(set(found), key=lambda p: p.as_posix())
    if not unique:
        raise UserError(f'--input {" ".join(inputs)}: no image files found '
                        f'(looked for {", ".join(IMAGE_EXTENSIONS)} in any case)')
    return unique


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_input(path: Path, resize_filter: str) -> np.ndarray:
    """A 256x256x3 uint8 image, or a UserError saying why not (one line, naming the file)."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f'cannot read image {path}: the file is empty (0 bytes)')
    except OSError as e:
        raise UserError(f'cannot read image {path}: {e.strerror}') from None
    im = read_image(path)
    if im.width == 0 or im.height == 0:
        raise UserError(f'cannot read image {path}: it has 0 pixels ({im.width}x{im.height})')
    return resize(to_rgb_array(im), resize_filter)


def _read_batch(pool: ThreadPoolExecutor, paths: list[Path], resize_filter: str) -> list[np.ndarray | str]:
    def one(p: Path) -> np.ndarray | str:
        try:
            return read_input(p, resize_filter)
        except UserError as e:
            return str(e)
        except Exception as e:   # whatever a decoder raises on a hostile file (e.g. a decompression bomb): skip it
            return f'cannot read image {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    return list(pool.map(one, paths))


def predict(predictor: Predictor, paths: list[Path]) -> Iterator[ImageResult]:
    """Results in input order, a batch at a time; the next batch is read while this one is scored."""
    batches = [paths[sl] for sl in iter_batches(len(paths), predictor.batch_size)]
    t = predictor.thresholds
    # Two pools: one thread that reads the next batch ahead, using a pool of decoders (PIL releases the GIL).
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as readers, ThreadPoolExecutor(1) as ahead:
        def read_ahead(k: int):
            return ahead.submit(_read_batch, readers, batches[k], predictor.resize) if k < len(batches) else None
        pending = read_ahead(0)
        for k, batch in enumerate(batches):
            read = pending.result()
            pending = read_ahead(k + 1)
            good = [i for i, r in enumerate(read) if not isinstance(r, str)]
            maps = predictor.maps(np.stack([read[i] for i in good])) if good else np.empty((0, 256, 256))
            by_index = dict(zip(good, maps))
            for i, path in enumerate(batch):
                if i not in by_index:
                    yield ImageResult(path, error=read[i])
                    continue
                m = by_index[i]
                score = float(m.max())
                yield ImageResult(path, read[i], m, score, float(t.normalize_scores(score)),
                                  bool(t.is_anomalous(score)), float(t.anomalous_area(m)))
