"""Prediction on new images, for every method: find the inputs, read them, and score them a batch at a time.

A batch of images is read (on a small thread pool, the next batch while the current one is scored) and
scored by the model's detector (codes/methods/base.py), the code evaluation scores with: Patch SVDD embeds
a batch and searches it with one call per K, so that a search's per-call cost is paid once per batch.
`Inspector` is the Python API over the same objects.
"""
from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .devices import resolve_device
from .embeddings import iter_batches
from .errors import UserError
from .methods import BACKBONE_METHODS, backbone, patchsvdd
from .methods.base import Detector
from .model_file import Model, load_model
from .mvtecad import IMAGE_EXTENSIONS, read_image, to_rgb_array

OPENERS = {'patchsvdd': patchsvdd.open_detector, **{name: backbone.open_detector for name in BACKBONE_METHODS}}


def open_detector(model: Model, device: torch.device | str = 'cpu', batch_size: int = 32, nn: str | None = None,
                  cache_dir: Path | None = None) -> contextlib.AbstractContextManager[Detector]:
    """A model file's detector, ready to score (Patch SVDD's search state kept while it is open). `nn` and
    `cache_dir` concern Patch SVDD's search only."""
    return OPENERS[model.method](model, torch.device(device), batch_size, nn, cache_dir)


@dataclass
class ImageResult:
    """One input's outcome: its map (None when it failed) and the numbers derived from it."""
    path: Path
    image: np.ndarray | None = None     # the image as the method read it (256x256, or the 224x224 crop)
    map: np.ndarray | None = None       # the raw map (Patch SVDD's mult map)
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


def read_input(path: Path, prepare: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The image as the model reads it (`prepare` of its RGB array), or a UserError saying why not (one
    line, naming the file)."""
    try:
        if path.stat().st_size == 0:
            raise UserError(f'cannot read image {path}: the file is empty (0 bytes)')
    except OSError as e:
        raise UserError(f'cannot read image {path}: {e.strerror}') from None
    im = read_image(path)
    if im.width == 0 or im.height == 0:
        raise UserError(f'cannot read image {path}: it has 0 pixels ({im.width}x{im.height})')
    return prepare(to_rgb_array(im))


def _read_batch(pool: ThreadPoolExecutor, inputs: list, prepare: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray | str]:
    def one(p) -> np.ndarray | str:
        if isinstance(p, np.ndarray):       # an image already decoded (the Python API): RGB uint8
            return prepare(as_rgb(p))
        try:
            return read_input(p, prepare)
        except UserError as e:
            return str(e)
        except Exception as e:   # whatever a decoder raises on a hostile file (e.g. a decompression bomb): skip it
            return f'cannot read image {p}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
    return list(pool.map(one, inputs))


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An HxW (grey) or HxWx3 / HxWx4 uint8 array as HxWx3 RGB; anything else is a UserError."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise UserError(f'an image array must be uint8 HxW, HxWx3 or HxWx4, not {image.dtype} {image.shape}')
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3])


def predict(detector: Detector, paths: list) -> Iterator[ImageResult]:
    """Results in input order, a batch at a time; the next batch is read while this one is scored.
    An input is a file path, or an RGB uint8 array (the Python API)."""
    batches = [paths[sl] for sl in iter_batches(len(paths), detector.batch_size)]
    t = detector.thresholds
    # Two pools: one thread that reads the next batch ahead, using a pool of decoders (PIL releases the GIL).
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as readers, ThreadPoolExecutor(1) as ahead:
        def read_ahead(k: int):
            return ahead.submit(_read_batch, readers, batches[k], detector.prepare) if k < len(batches) else None
        pending = read_ahead(0)
        for k, batch in enumerate(batches):
            read = pending.result()
            pending = read_ahead(k + 1)
            good = [i for i, r in enumerate(read) if not isinstance(r, str)]
            scored = detector.score(np.stack([read[i] for i in good])) if good else ((), ())
            by_index = {i: (m, s) for i, m, s in zip(good, *scored)}
            for i, path in enumerate(batch):
                if i not in by_index:
                    yield ImageResult(path, error=read[i])
                    continue
                m, score = by_index[i]
                score = float(score)
                yield ImageResult(path, read[i], m, score, float(t.normalize_scores(score)),
                                  bool(t.is_anomalous(score)), float(t.anomalous_area(m)))


class Inspector:
    """The Python API: a model file loaded once, scoring images given as paths or RGB uint8 arrays.

        with Inspector('bottle.safetensors') as inspector:
            for r in inspector.predict(['a.png', array]):
                print(r.score, r.anomalous, r.map.shape)
    """

    def __init__(self, model_path: str | Path, device: str | None = None, batch_size: int = 32,
                 nn: str | None = None, cache_dir: Path | None = None) -> None:
        self.model = load_model(Path(model_path).expanduser())
        self._stack = contextlib.ExitStack()
        device = resolve_device(device)
        self.detector = self._stack.enter_context(open_detector(self.model, device, batch_size, nn, cache_dir))
        self.thresholds = self.model.thresholds

    def predict(self, images: list) -> list[ImageResult]:
        """One ImageResult per input, in order: score, normalised score, decision, area, map (or error)."""
        return list(predict(self.detector, [i if isinstance(i, np.ndarray) else Path(i) for i in images]))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
