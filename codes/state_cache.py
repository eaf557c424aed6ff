"""A method's fitted state (its memory bank: arrays only), cached like Patch SVDD's bank.

An entry is a folder named by a digest of its key (a JSON-able dict: the method and its settings,
the backbone weights' SHA-256, each training image's name and SHA-256, a format number), holding
`key.json` and `state.npz` (read with allow_pickle=False). It is written to a temporary folder beside
it and renamed into place, so a crash never leaves half an entry; an entry whose key does not match
or whose arrays cannot be read or are refused by the caller's check is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import make_dir

State = dict[str, np.ndarray]


def entry_folder(cache_dir: Path, key: dict) -> Path:
    return cache_dir / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def read_entry(folder: Path, key: dict, arrays: str = 'state.npz') -> State | None:
    """The stored arrays if the entry is complete and was written for exactly this key; else None."""
    try:
        if json.loads((folder / 'key.json').read_text()) != json.loads(json.dumps(key)):
            return None
        with np.load(folder / arrays, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError, zipfile.BadZipFile):
        return None


def write_entry(folder: Path, key: dict, state: State, arrays: str = 'state.npz') -> None:
    """Writes into a temporary folder beside the entry, then renames it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f'.{folder.name}.', dir=folder.parent))
    try:
        np.savez(tmp / arrays, **state)
        (tmp / 'key.json').write_text(json.dumps(key))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_or_fit(cache_dir: Path | None, key: dict, fit: Callable[[], State],
                valid: Callable[[State], bool] = lambda state: True) -> tuple[State, str]:
    """The state for `key` and how it was had: 'cached', 'built', or 'rebuilt' (an entry was there but was
    stale or damaged). `valid` checks a read entry's arrays (shapes, names). cache_dir None: nothing kept."""
    if cache_dir is None:
        return fit(), 'built'
    folder = entry_folder(cache_dir, key)
    state = read_entry(folder, key)
    if state is not None and valid(state):
        return state, 'cached'
    how = 'rebuilt' if folder.exists() else 'built'
    state = fit()
    make_dir(cache_dir, 'cache')
    write_entry(folder, key, state)
    return state, how
