"""Custom datasets: many image formats and sizes, masks paired by name, classes without masks."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from codes import mvtecad
from codes.checkpoints import save_module
from codes.networks import EncoderHier
from tests.conftest import REPO


@pytest.fixture
def messy_class(tmp_path):
    """train/good in six formats and sizes; test images whose masks have other extensions and no order."""
    rng = np.random.default_rng(0)
    folder = tmp_path / 'data' / 'widget'
    train = folder / 'train' / 'good'
    train.mkdir(parents=True)
    rgb = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(train / 'a.PNG')
    Image.fromarray(rgb).convert('L').save(train / 'b.jpg', quality=95)
    Image.fromarray(np.dstack([rgb, np.full((90, 120), 7, np.uint8)])).save(train / 'c.tif')      # RGBA
    Image.fromarray(rgb[..., 0]).convert('LA').save(train / 'd.png')                               # grey + alpha
    Image.fromarray((rng.integers(0, 65536, (300, 200))).astype(np.uint16)).save(train / 'e.TIFF')  # 16-bit
    Image.fromarray(rgb[:64, :64]).save(train / 'f.bmp')
    for defect, names in (('dent', ('x', 'y')), ('good', ('z',))):
        (folder / 'test' / defect).mkdir(parents=True)
        for name in names:
            Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(folder / 'test' / defect / f'{name}.jpeg')
    return tmp_path / 'data', folder


def test_every_format_loads_as_256x256_rgb(messy_class):
    root, folder = messy_class
    files = mvtecad.find_class(root, 'widget')
    assert [p.name for p in files.train] == ['a.PNG', 'b.jpg', 'c.tif', 'd.png', 'e.TIFF', 'f.bmp']
    assert files.masks is None and files.labels.tolist() == [1, 1, 0]
    data = mvtecad.load_class(files)
    assert data.train.shape == (6, 256, 256, 3) and data.train.dtype == np.uint8 and data.masks is None
    a, c = data.train[0], data.train[2]
    assert np.array_equal(a, c)                                    # RGBA: the alpha channel is dropped
    b = data.train[1]
    assert np.array_equal(b[..., 0], b[..., 1]) and np.array_equal(b[..., 0], b[..., 2])   # grey to 3 channels
    e = np.asarray(Image.open(folder / 'train' / 'good' / 'e.TIFF'), dtype=np.float64)
    assert abs(data.train[4].mean() - (e / 257).mean()) < 2        # 16-bit scaled to 8-bit


def test_masks_are_paired_by_name_not_order(messy_class):
    root, folder = messy_class
    gt = folder / 'ground_truth' / 'dent'
    gt.mkdir(parents=True)
    m = np.zeros((80, 80), np.uint8)
    m[:10] = 255
    Image.fromarray(m).save(gt / 'y_mask.bmp')     # another extension, and written before x's
    Image.fromarray(m.T.copy()).save(gt / 'x_mask.png')
    files = mvtecad.find_class(root, 'widget')
    assert [p.name for p in files.masks[:2]] == ['x_mask.png', 'y_mask.bmp'] and files.masks[2] is None
    masks = mvtecad.load_class(files).masks
    assert masks[0][:, :32].all() and not masks[0][:, 40:].any()    # x: the transposed mask (left columns)
    assert masks[1][:32].all() and not masks[1][40:].any()          # y: top rows
    assert not masks[2].any()


def test_class_without_masks_reports_detection_only(messy_class, tmp_path):
    root, _ = messy_class
    torch.manual_seed(0)
    save_module(EncoderHier(64, 64), tmp_path / 'enc.pkl')
    proc = subprocess.run([sys.executable, str(REPO / 'main_evaluate.py'), '--obj=widget', f'--data_root={root}',
                           f'--ckpt={tmp_path / "enc.pkl"}', '--no_cache', '--nn=exact'],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith('|K64| Det: ') and '|mult| Det: ' in lines[0] and lines[0].count('Seg:  n/a') == 4
    assert '(no ground-truth masks: segmentation metrics are not available)' in lines
    record = json.loads((tmp_path / next(l for l in lines if l.startswith('results written to '))
                         .removeprefix('results written to ')).read_text())
    assert record['settings']['has_masks'] is False and record['aurocs']['seg_mult'] is None
    assert record['metrics']['mult']['aupro'] is None and 0 <= record['aurocs']['det_mult'] <= 1
