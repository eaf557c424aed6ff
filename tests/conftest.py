"""Fixtures: the real material some tests need, and a tiny synthetic class made per session.

The golden and real-data tests need the MVTec AD bottle class, the authors' checkpoints and, for the
backbone check, ImageNet photos. They are found through environment variables (PATCHSVDD_MVTEC: the
folder holding bottle/; PATCHSVDD_CKPTS: the folder holding <obj>/enchier.pkl; PATCHSVDD_SHARED: a
folder laid out as ../shared) or in ../shared beside the checkout. Where one is missing, the tests that
need it are skipped with one line naming it and how to provide it; under PATCHSVDD_REQUIRE_ALL=1 (which
.ci/run sets) such a skip is a failure. The original code's reference outputs that the golden tests
compare against are in tests/fixtures/.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest

from codes.synthetic import make_synthetic_class

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / 'tests' / 'fixtures'
SHARED = Path(os.environ.get('PATCHSVDD_SHARED', REPO.parent / 'shared'))
MVTEC_URL = 'https://www.mvtec.com/company/research/datasets/mvtec-ad'


def missing(what: str, how: str) -> NoReturn:
    """Skips the test (fails it under PATCHSVDD_REQUIRE_ALL) with one line: what is missing, how to provide it."""
    message = f'needs {what}: {how}'
    if os.environ.get('PATCHSVDD_REQUIRE_ALL'):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope='session')
def mvtec_root() -> Path:
    root = Path(os.environ.get('PATCHSVDD_MVTEC', SHARED / 'data' / 'mvtec'))
    if not (root / 'bottle' / 'train' / 'good').is_dir():
        missing(f'the MVTec AD bottle class (not at {root / "bottle"})',
                f'download MVTec AD from {MVTEC_URL} and set PATCHSVDD_MVTEC to the folder holding bottle/')
    return root


@pytest.fixture(scope='session')
def ckpt_dir() -> Path:
    folder = Path(os.environ.get('PATCHSVDD_CKPTS', SHARED / 'ckpts'))
    if not (folder / 'bottle' / 'enchier.pkl').is_file():
        missing(f"the authors' checkpoints (not at {folder / 'bottle' / 'enchier.pkl'})",
                'python -m codes.pretrained download all --ckpt_dir=DIR, then set PATCHSVDD_CKPTS=DIR')
    return folder


@pytest.fixture(scope='session')
def bottle_ckpt(ckpt_dir: Path) -> Path:
    return ckpt_dir / 'bottle' / 'enchier.pkl'


@pytest.fixture(scope='session')
def ckpt_sums(ckpt_dir: Path) -> dict[str, str]:
    """{'bottle/enchier.pkl': sha256, ...} from the checkpoint folder's SHA256SUMS (../shared has one)."""
    path = ckpt_dir / 'SHA256SUMS'
    if not path.is_file():
        missing(f'the checkpoints\' published digests (not at {path})',
                'set PATCHSVDD_SHARED to a folder laid out as ../shared (ckpts/SHA256SUMS)')
    return dict(line.split()[::-1] for line in path.read_text().splitlines() if line)


@pytest.fixture(scope='session')
def imagenet_photos() -> Path:
    folder = SHARED / 'imagenet_check'
    if not any(folder.glob('*.jpeg')):
        missing(f'ImageNet photos with their classes (not at {folder})',
                'set PATCHSVDD_SHARED to a folder laid out as ../shared (imagenet_check/)')
    return folder


def load_reference(resize: str) -> tuple[dict, dict[str, np.ndarray]]:
    """What the authors' code printed and computed on bottle with the authors' encoder (tests/fixtures)."""
    info = json.loads((FIXTURES / f'bottle_original_{resize}.json').read_text())
    maps = dict(np.load(FIXTURES / f'bottle_original_{resize}_maps.npz'))
    return info, maps


@pytest.fixture(scope='session')
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp('synthetic_data')
    make_synthetic_class(root, 'synthetic', n_train=6, n_good=2, n_defect=2, size=96)
    return root
