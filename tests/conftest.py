"""Fixtures: the shared folder beside the checkout (real bottle data, the authors' checkpoints, the
reference outputs) and a tiny synthetic class made per session."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from codes.synthetic import make_synthetic_class

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    path = Path(os.environ.get('PATCHSVDD_SHARED', REPO.parent / 'shared'))
    if not (path / 'SPEC.md').is_file():
        pytest.fail(f'the shared folder is missing at {path}: put it beside the checkout or set PATCHSVDD_SHARED')
    return path


@pytest.fixture(scope='session')
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope='session')
def mvtec_root(shared: Path) -> Path:
    return shared / 'data' / 'mvtec'


@pytest.fixture(scope='session')
def bottle_ckpt(shared: Path) -> Path:
    return shared / 'ckpts' / 'bottle' / 'enchier.pkl'


def load_reference(shared: Path, resize: str) -> tuple[dict, dict[str, np.ndarray]]:
    info = json.loads((shared / 'reference' / f'bottle_original_{resize}.json').read_text())
    maps = dict(np.load(shared / 'reference' / f'bottle_original_{resize}_maps.npz'))
    return info, maps


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('synthetic_data')
    make_synthetic_class(root, 'synthetic', n_train=6, n_good=2, n_defect=2, size=96)
    return root
