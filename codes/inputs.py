"""What every run checks and resolves before any work, whatever the method: the device, the class's files,
the method's own inputs (Patch SVDD: its checkpoint), that each output folder can be written, and the cache
folder. Evaluation, visualization, export and prediction all start here."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .devices import resolve_device
from .files import check_writable
from .mvtecad import GOOD, ClassFiles, find_class, list_images, resolve_data_root
from .state_cache import cache_dir_for


@dataclass
class Inputs:
    device: torch.device
    files: ClassFiles
    cache_dir: Path | None          # None: --no_cache, or a cache folder that cannot be used (said in one line)


def resolve(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = (), normal_only: bool = False,
            checks: tuple[Callable[[], object], ...] = ()) -> Inputs:
    """Checks, in this order and before any work: --device, the class under the data root, `checks` (the
    method's own inputs), and that each (folder, what) output can be written. `normal_only`: a class with
    training images only (no test set) is fine (export)."""
    device = resolve_device(args.device)
    files = (find_normal_class if normal_only else find_class)(resolve_data_root(args.data_root), args.obj)
    for check in checks:
        check()
    for folder, what in outputs:
        check_writable(folder, what)
    return Inputs(device, files, cache_dir_for(args.cache_dir, args.no_cache))


def find_normal_class(root: Path, obj: str) -> ClassFiles:
    """The class's files; unlike evaluation, a class with normal training images only (no test set) is fine."""
    folder = root / obj
    test_dir = folder / 'test'
    has_test = test_dir.is_dir() and any(list_images(d) for d in test_dir.iterdir() if d.is_dir())
    if has_test or not folder.is_dir() or not list_images(folder / 'train' / GOOD):
        return find_class(root, obj)     # its checks and messages
    return ClassFiles(obj, folder, tuple(list_images(folder / 'train' / GOOD)), (), np.zeros(0, np.int32), None)
