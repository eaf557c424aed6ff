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
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import check_writable, make_dir, write_error

State = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/patchsvdd, else ~/.cache/patchsvdd."""
    return Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'patchsvdd'


def warn(message: str) -> None:
    print(f'warning: {message}', file=sys.stderr)


def cache_dir_for(cache_dir: str | Path | None, no_cache: bool) -> Path | None:
    """The cache folder the flags name (--cache_dir, else the default); None with --no_cache, or when the
    folder cannot be written: a cache only saves time, so that is one warning line and a run without it."""
    if no_cache:
        return None
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        check_writable(folder, 'cache')
    except UserError as e:
        warn(f'{e}: this run goes on without a cache (or pass --no_cache)')
        return None
    return folder


def try_write(what: Path, write: Callable[[], None]) -> bool:
    """Runs a write into the cache; when it fails (a full disk, a read-only or forbidden folder) says so in one
    warning line and returns False: the run goes on without the entry, and the write left nothing behind."""
    try:
        write()
        return True
    except OSError as e:
        reason = write_error(what, e)
    except UserError as e:
        reason = e
    warn(f'{reason}; the cache was not written, this run goes on without it (or pass --no_cache)')
    return False


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
    write_new_entry(cache_dir, folder, key, state)
    return state, how


def write_new_entry(cache_dir: Path, folder: Path, key: dict, state: State, arrays: str = 'state.npz') -> bool:
    """write_entry, creating the cache folder; False (one warning line, nothing left) when it cannot be written."""
    return try_write(folder, lambda: (make_dir(cache_dir, 'cache'), write_entry(folder, key, state, arrays)))
