"""Result files, printed blocks and the many-class table."""
import csv
import json

import numpy as np

from codes import reports


def record(obj, det=0.9, with_masks=True):
    m = {'det': det, 'seg': 0.95 if with_masks else None, 'aupro': 0.9 if with_masks else None,
         'pixel_ap': 0.5 if with_masks else None, 'f1_max': 0.8, 'f1_threshold': 1.5}
    metrics = {name: dict(m) for name in ('64', '32', 'sum', 'mult')}
    return {'obj': obj, 'metrics': metrics,
            'aurocs': {f'{k}_{n}': metrics[n][k] for n in metrics for k in ('det', 'seg')},
            'settings': {'checkpoint_sha256': 'ab' * 32, 'resize': 'nearest', 'nn': 'ngt'}}


def test_result_json_and_summary_rows(tmp_path):
    first = reports.write_result(tmp_path, 'bottle', 'run1', record('bottle'))
    reports.write_result(tmp_path, 'custom', 'run2', record('custom', 0.75, with_masks=False))
    assert first == tmp_path / 'bottle' / 'run1.json'
    assert json.loads(first.read_text())['metrics']['mult']['aupro'] == 0.9
    rows = list(csv.DictReader((tmp_path / 'summary.csv').open()))
    assert [r['run'] for r in rows] == ['run1', 'run2']
    assert rows[0]['det_mult'] == '0.9' and rows[0]['aupro_mult'] == '0.9' and rows[0]['json'] == 'bottle/run1.json'
    assert rows[1]['det_mult'] == '0.75' and rows[1]['seg_mult'] == '' and rows[1]['aupro_mult'] == ''
    assert sorted(p.name for p in tmp_path.rglob('*')) == ['bottle', 'custom', 'run1.json', 'run2.json', 'summary.csv']


def test_saved_maps(tmp_path):
    from pathlib import Path
    maps = {name: np.full((2, 256, 256), i, np.float64) for i, name in enumerate(('64', '32', 'sum', 'mult'))}
    path = tmp_path / 'm.npz'
    reports.save_maps(path, maps, maps['mult'].max(axis=(1, 2)), np.array([1, 0]),
                      (Path('test/crack/000.png'), Path('test/good/000.png')), (Path('ground_truth/crack/000_mask.png'), None))
    z = np.load(path)
    assert sorted(z.files) == ['image_scores', 'labels', 'maps_32', 'maps_64', 'maps_mult', 'maps_sum', 'mask_paths',
                               'test_paths']
    assert z['image_scores'].tolist() == [3.0, 3.0]
    assert z['maps_mult'].shape == (2, 256, 256) and z['maps_mult'].dtype == np.float32 and z['maps_mult'][0, 0, 0] == 3
    assert z['mask_paths'].tolist() == ['ground_truth/crack/000_mask.png', '']
    assert z['test_paths'].tolist() == ['test/crack/000.png', 'test/good/000.png']


def test_metrics_block():
    block = reports.metrics_block(record('bottle')['metrics'])
    assert block.splitlines()[0].split() == ['AUPRO', 'pixAP', 'F1max', '(F1', 'threshold)']
    assert block.splitlines()[4].split() == ['mult', '90.0', '50.0', '80.0', '(1.5)']
    no_masks = reports.metrics_block(record('custom', with_masks=False)['metrics'])
    assert no_masks.splitlines()[1].split() == ['K64', 'n/a', 'n/a', '80.0', '(1.5)']
    assert no_masks.splitlines()[-1] == '(no ground-truth masks: segmentation metrics are not available)'


def test_markdown_table_puts_the_paper_beside_ours():
    table = reports.markdown_table([record('bottle', 0.9), record('cable', 0.8)]).splitlines()
    assert table[0].startswith('| class | Det (ours) | Det (paper) | Seg (ours) | Seg (paper) |')
    assert table[2] == '| bottle | 90.0 | 98.6 | 95.0 | 98.1 | 90.0 | 50.0 | 80.0 |'
    assert table[3] == '| cable | 80.0 | 90.3 | 95.0 | 96.8 | 90.0 | 50.0 | 80.0 |'
    # (98.1 + 96.8) / 2 = 97.45 is 97.4499... in binary floating point
    assert table[4] == '| **mean** (2) | 85.0 | 94.5 | 95.0 | 97.4 | 90.0 | 50.0 | 80.0 |'
    custom = reports.markdown_table([record('mine', 0.7, with_masks=False)]).splitlines()
    assert custom[2] == '| mine | 70.0 | n/a | n/a | n/a | n/a | n/a | 80.0 |'
