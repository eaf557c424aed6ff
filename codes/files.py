"""Writing files so that a crash never leaves a half-written file under the real name."""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError


def make_dir(folder: Path, what: str) -> None:
    """Creates `folder` (and parents) or says in one line why it cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f'cannot create {what} folder {folder}: {e.strerror}; choose another location') from None
    if not os.access(folder, os.W_OK):
        raise UserError(f'{what} folder {folder} is not writable; choose another location')


def check_writable(folder: Path, what: str) -> None:
    """Fails now if `folder` could not be created and written later; creates nothing."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f'cannot create {what} folder {folder}: Not a directory; choose another location')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'{what} folder {folder} is not writable; choose another location')


# What to do about a file that cannot be written, by its errno.
_ADVICE = {errno.ENOSPC: 'free some space there or choose another location',
           errno.EDQUOT: 'free some space there (disk quota) or choose another location',
           errno.EROFS: 'the file system is read-only: choose another location',
           errno.EACCES: 'choose a location you may write to, or change its permissions',
           errno.EPERM: 'choose a location you may write to, or change its permissions'}
WRITE_ERRNOS = frozenset(_ADVICE)


def write_error(path: Path | str | None, e: OSError) -> UserError:
    """The one-line error for a file that could not be written: which file, why, and what to do."""
    advice = _ADVICE.get(e.errno, 'check the location or choose another one')
    return UserError(f'cannot write {path or e.filename or "a file"}: {e.strerror or e}; {advice}')


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = 'w') -> Iterator[IO]:
    """Yields a temporary file beside `path`; renames it into place only when the block succeeds. A write
    that fails (full disk, read-only or forbidden folder) leaves nothing and raises write_error's UserError."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def atomic_save(path: Path, write: Callable[[IO], Any], binary: bool = True) -> None:
    with atomic_open(path, 'wb' if binary else 'w') as f:
        write(f)


def write_json(path: Path, data: dict) -> None:
    with atomic_open(path, 'w') as f:
        json.dump(data, f, indent=1)
        f.write('\n')


def append_csv_row(path: Path, row: dict) -> None:
    """Appends a row (writing the header first for a new file); the whole file is replaced atomically."""
    old = path.read_text() if path.exists() else ''
    with atomic_open(path, 'w') as f:
        f.write(old)
        writer = csv.DictWriter(f, fieldnames=list(row))
        if not old:
            writer.writeheader()
        writer.writerow(row)
