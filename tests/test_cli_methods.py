"""`--method psdl|padim|patchcore` as a user runs them, on tiny synthetic classes, with the real Lite0 weights."""
import csv
import json
import re

import numpy as np
import torch

from codes.checkpoints import save_module
from codes.networks import EncoderHier
from codes.synthetic import make_synthetic_class
from tests.test_cli import run, written


def test_each_method_evaluates_and_caches(synthetic_root, tmp_path):
    flags = [f'--data_root={synthetic_root}', '--obj=synthetic', f'--cache_dir={tmp_path / "cache"}']
    for method in ('psdl', 'padim', 'patchcore'):
        proc = run('main_evaluate.py', f'--method={method}', *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert re.fullmatch(rf'\|{method}\| Det: +[\d.]+ Seg: +[\d.]+ \(synthetic\)', proc.stdout.splitlines()[0])
        assert proc.stdout.splitlines()[1].split()[:3] == ['AUPRO', 'pixAP', 'F1max']
        record = json.loads((tmp_path / written(proc)).read_text())
        assert record['method'] == method and record['settings']['fitted_state'] == 'built'
        assert set(record['metrics'][method]) >= {'det', 'seg', 'aupro', 'pixel_ap', 'f1_max'}
        again = run('main_evaluate.py', f'--method={method}', *flags, '--save_maps', cwd=tmp_path)
        record2 = json.loads((tmp_path / written(again)).read_text())
        assert record2['settings']['fitted_state'] == 'cached' and record2['metrics'] == record['metrics']
        maps = np.load(tmp_path / record2['maps_npz'])
        assert maps[f'maps_{method}'].shape == (record['settings']['n_test'], 224, 224)
    rows = list(csv.DictReader((tmp_path / 'results' / 'summary.csv').open()))
    assert [r['method'] for r in rows] == ['psdl', 'psdl', 'padim', 'padim', 'patchcore', 'patchcore']


def test_summary_mixes_patchsvdd_and_methods_and_the_table_has_a_method_column(tmp_path):
    torch.manual_seed(0)
    for obj in ('bottle', 'zipper'):
        make_synthetic_class(tmp_path / 'data', obj, n_train=3, n_good=2, n_defect=1, size=64)
    save_module(EncoderHier(64, 64), tmp_path / 'ckpts' / 'bottle' / 'enchier.pkl')
    svdd = run('main_evaluate.py', f'--data_root={tmp_path / "data"}', '--no_cache', '--nn=exact', cwd=tmp_path)
    assert svdd.returncode == 0, svdd.stderr
    header = (tmp_path / 'results' / 'summary.csv').read_text().splitlines()[0]
    assert 'method' not in header                  # Patch SVDD's file as before
    proc = run('main_evaluate.py', '--obj=all', '--method=psdl', '--pool_classes', f'--data_root={tmp_path / "data"}',
               f'--cache_dir={tmp_path / "cache"}', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    table = out[out.index('| class | method | Det | Seg | AUPRO | pixel AP | F1-max |'):]
    assert table[2].startswith('| bottle | psdl |') and table[3].startswith('| zipper | psdl |')
    assert table[4].startswith('| **mean** (2) | psdl |')
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / 'results').rglob('*_psdl_*.json'))]
    # one model pooled over both classes: fitted once, read from the cache for the second class
    assert [r['settings']['n_train'] for r in records] == [6, 6]
    assert sorted(r['settings']['fitted_state'] for r in records) == ['built', 'cached']
    rows = list(csv.DictReader((tmp_path / 'results' / 'summary.csv').open()))
    assert [(r['obj'], r['method']) for r in rows] == [('bottle', 'patchsvdd'), ('bottle', 'psdl'), ('zipper', 'psdl')]
    assert rows[0]['det_mult'] != '' and rows[1]['det'] != '' and rows[1]['det_mult'] == ''


def test_method_errors_are_one_line(synthetic_root, tmp_path):
    flags = [f'--data_root={synthetic_root}', '--obj=synthetic', '--method=padim']
    (tmp_path / 'resnet18-f37072fd.pth').write_bytes(b'not weights')
    for extra, message in [(['--backbone=resnet18'], "error: --backbone resnet18 needs torchvision's ImageNet weights"),
                           (['--backbone=resnet18', '--backbone_weights=resnet18-f37072fd.pth'],
                            'error: --backbone_weights resnet18-f37072fd.pth: SHA-256 begins'),
                           (['--padim_d=999'], 'error: --padim_d must be between 1 and 176'),
                           (['--coreset_ratio=2', '--method=patchcore'], 'error: --coreset_ratio must be in (0, 1]')]:
        proc = run('main_evaluate.py', *flags, *extra, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith(message) and proc.stderr.count('\n') == 1, proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ['resnet18-f37072fd.pth']
