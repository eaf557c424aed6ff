"""Result files: one JSON per evaluation run, with its numbers, settings and timings."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from .files import make_dir, write_json


def run_name(ckpt: Path, resize: str, nn: str) -> str:
    stamp = dt.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f'{stamp}_{ckpt.stem}_{resize}_{nn}'


def write_result(results_dir: Path, obj: str, name: str, record: dict) -> Path:
    """Writes results/<obj>/<name>.json atomically and returns its path."""
    folder = results_dir / obj
    make_dir(folder, 'results')
    path = folder / f'{name}.json'
    write_json(path, record)
    return path
