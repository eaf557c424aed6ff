"""The memory bank, Patch SVDD's fitted state: a checkpoint's training-patch embeddings and their search
indexes, computed once and cached; evaluation, export, prediction and the service search it through
`MemoryBank.search` / `MemoryBank.distances`.

A cache entry is a folder named by a digest of its key: the checkpoint's SHA-256, each training
image's name and SHA-256, the resize filter and the bank format. Changed inputs give another key;
an entry whose stored key or arrays do not match is rebuilt, never used. The exact search's index
of each bank (`exact64.npz`, `exact32.npz`) and the NGT index (`ngt32/`) are added to the entry
the first time they are needed, each written atomically and checked against the bank when read.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import state_cache
from .checkpoints import file_sha256
from .embeddings import embed_images
from .mvtecad import ClassFiles, load_images, mean_image
from .nearest_neighbor import (DEFAULT_EPS, ApproxSearch, ExactSearch, NGTSearch, make_search,
                               nearest_distances)
from .networks import EncoderHier

BANK_FORMAT = 1
ARRAYS = ('mean', 'emb64', 'emb32')
BANK_FILE = 'bank.npz'


@dataclass
class MemoryBank:
    """Patch SVDD's fitted state and its searches: the training codes, and the search objects over them, made
    once per run (from the cache entry's or the model file's saved index when there is one, else built)."""
    mean: np.ndarray              # the training set's mean image (HxWx3 float32), to standardise test images
    emb64: np.ndarray             # (N_train, 13, 13, D) codes of the 64x64 patches
    emb32: np.ndarray             # (N_train, 57, 57, D) codes of the 32x32 patches
    folder: Path | None = None    # its cache entry, where search indexes are kept; None: not cached
    # the exact search's cell indexes as arrays (`exact64.<name>`, `exact32.<name>`): read from a model file,
    # or as this run used them (so that an export writes them into the model file)
    index: dict[str, np.ndarray] = field(default_factory=dict)
    ngt_path: Path | None = None  # where the K=32 NGT index is kept when the bank has no cache entry
    searches: dict = field(default_factory=dict, repr=False)   # (K, method, device) -> fitted search

    @property
    def ngt32(self) -> Path | None:
        """Where the NGT index of emb32 is (or is to be) kept."""
        return self.folder / 'ngt32' if self.folder is not None else self.ngt_path

    def codes(self, K: str) -> np.ndarray:
        return self.emb64 if K == '64' else self.emb32

    def search(self, K: str, method: str, device: torch.device | str = 'cpu', background: bool = False,
               eps: float = DEFAULT_EPS):
        """The fitted search object of method over the K ('64' or '32') bank, ready to query: from this run,
        else from the cache entry or the saved index, else built (and added to the entry). `background`: the
        caller runs on another thread than torch's work (the exact search then leaves torch's thread count
        alone). `eps`: approx's certified ratio; approx shares the exact search's cell index."""
        device = torch.device(device)
        key = (K, method, str(device)) + ((float(eps),) if method == 'approx' else ())
        if method == 'approx' and device.type != 'cuda':
            if key not in self.searches:
                self.searches[key] = ApproxSearch.of(self.search(K, 'exact', device, background), eps)
        elif key not in self.searches:
            emb = self.codes(K)
            if method == 'exact' and device.type != 'cuda':
                self.searches[key] = self._exact_search(K, emb, device, background).prepare()
            elif method == 'ngt' and K == '32':
                self.searches[key] = NGTSearch(self.ngt32).fit(emb)
            else:
                self.searches[key] = make_search(method, device, eps=eps).fit(emb)
        return self.searches[key]

    def _exact_search(self, K: str, emb: np.ndarray, device: torch.device, background: bool) -> ExactSearch:
        prefix = f'exact{K}.'
        saved = {k[len(prefix):]: v for k, v in self.index.items() if k.startswith(prefix)}
        search = ExactSearch.from_arrays(emb, saved, device) if saved else None
        if search is None:
            search = (cached_exact_search(emb, self.folder / f'exact{K}.npz', device, background)
                      if self.folder is not None else ExactSearch(device).fit(emb, background=background))
        if search.arrays() is not None:
            self.index.update({prefix + k: v for k, v in search.arrays().items()})
        return search

    def image_of_rows(self, K: str) -> np.ndarray:
        """For each row of the K bank, the training image it came from."""
        emb = self.codes(K)
        return np.repeat(np.arange(len(emb)), emb[0, ..., 0].size)

    def distances(self, K: str, queries: np.ndarray, method: str, device: torch.device | str = 'cpu',
                  eps: float = DEFAULT_EPS, leave_out: np.ndarray | None = None) -> np.ndarray:
        """Distance of each query code (n, h, w, D) to its nearest K bank row. `leave_out` (one training image
        per query image) keeps each query away from its own image's rows: leave-one-image-out, by an exact
        search of its own (in which equal rows of different images are kept apart), made once per run."""
        if leave_out is None:
            return nearest_distances(queries, self.codes(K), method, device, desc=f'search K={K}',
                                     search=self.search(K, method, device, eps=eps))
        key = (K, 'leave_out', str(device))
        if key not in self.searches:
            self.searches[key] = ExactSearch(device).fit(self.codes(K), self.image_of_rows(K))
        groups = np.repeat(np.asarray(leave_out), queries[0, ..., 0].size)
        return nearest_distances(queries, self.codes(K), 'exact', device, desc=f'search K={K} (leave one out)',
                                 query_groups=groups, bank_groups=self.image_of_rows(K), search=self.searches[key])


def build_bank(enc: EncoderHier, train_images: np.ndarray, device: torch.device | str,
               batch_size: int = 8) -> MemoryBank:
    mean = mean_image(train_images)
    emb64, emb32 = embed_images(enc, train_images, mean, torch.device(device), batch_size, desc='embed train')
    return MemoryBank(mean, emb64, emb32)


def bank_key(ckpt: Path, files: ClassFiles, resize: str) -> dict:
    return {'format': BANK_FORMAT, 'checkpoint_sha256': file_sha256(ckpt), 'resize': resize,
            'train': [[p.name, file_sha256(p)] for p in files.train]}


def load_or_build(enc: EncoderHier, ckpt: Path, files: ClassFiles, resize: str, device: torch.device | str,
                  cache_dir: Path | None, batch_size: int = 8,
                  before_build: Callable[[], object] = lambda: None) -> tuple[MemoryBank, str]:
    """The bank for this checkpoint, training set and filter, and how it was had: 'cached', 'built' or
    'rebuilt' (an entry was there but did not match). With cache_dir None nothing is cached.
    `before_build` runs before a bank is built (not when it is read): a check that may stop the run."""
    if cache_dir is None:
        before_build()
        return build_bank(enc, load_images(files.train, resize, f'{files.obj} train'), device, batch_size), 'built'
    key = bank_key(ckpt, files, resize)
    folder = state_cache.entry_folder(cache_dir, key)
    bank = read_entry(folder, key, enc.D)
    if bank is not None:
        return bank, 'cached'
    before_build()
    how = 'rebuilt' if folder.exists() else 'built'
    bank = build_bank(enc, load_images(files.train, resize, f'{files.obj} train'), device, batch_size)
    if state_cache.write_new_entry(cache_dir, folder, key, {name: getattr(bank, name) for name in ARRAYS}, BANK_FILE):
        bank.folder = folder     # where its search indexes go
    return bank, how


def read_entry(folder: Path, key: dict, D: int) -> MemoryBank | None:
    """The cached bank if the entry is complete and its key and shapes match; else None."""
    arrays = state_cache.read_entry(folder, key, BANK_FILE)
    if arrays is None or set(ARRAYS) - set(arrays):
        return None
    n = len(key['train'])
    if arrays['emb64'].shape[::3] != (n, D) or arrays['emb32'].shape[::3] != (n, D) or arrays['mean'].ndim != 3:
        return None
    return MemoryBank(**{name: arrays[name] for name in ARRAYS}, folder=folder)


def bank_checksum(emb: np.ndarray) -> int:
    """CRC-32 of the bank's bytes: ties a saved index to the exact bank it was built on."""
    return zlib.crc32(np.ascontiguousarray(emb, np.float32).data)


def cached_exact_search(emb: np.ndarray, path: Path, device: torch.device, background: bool = False) -> ExactSearch:
    """The exact search over `emb` with its cell index read from `path` when that file is sound and was built
    on this very bank; otherwise built and written there (a failed write is one warning, and the run goes on)."""
    checksum = bank_checksum(emb)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        if int(arrays.pop('bank_crc32')[0]) == checksum:
            search = ExactSearch.from_arrays(emb, arrays, device)
            if search is not None:
                return search
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile):
        pass
    search = ExactSearch(device).fit(emb, background=background)
    state_cache.try_write(path, lambda: write_index(path, search, checksum))
    return search


def write_index(path: Path, search: ExactSearch, checksum: int) -> None:
    """The exact search's index beside the bank (temporary file, then rename; nothing left on failure)."""
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.npz', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **search.arrays(), bank_crc32=np.array([checksum], np.int64))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
