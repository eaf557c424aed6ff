"""The entry scripts as a user runs them, on a tiny synthetic class, on the CPU."""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO

TRAIN_FLAGS = ['--epochs=1', '--repeat=4', '--batch_size=8', '--device=cpu']


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def written(proc: subprocess.CompletedProcess) -> Path:
    """The result JSON path that main_evaluate.py printed."""
    return Path(next(line for line in proc.stdout.splitlines() if line.startswith('results written to '))
                .removeprefix('results written to '))


@pytest.fixture(scope='module')
def trained(synthetic_root, tmp_path_factory):
    """main_train.py run once; the tests below read what it left."""
    work = tmp_path_factory.mktemp('work')
    proc = run('main_train.py', '--obj=synthetic', f'--data_root={synthetic_root}', *TRAIN_FLAGS, cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work, proc


def test_training_writes_checkpoints_and_log(trained):
    work, proc = trained
    folder = work / 'ckpts' / 'synthetic'
    assert sorted(p.name for p in folder.iterdir()) == [
        '1_0.001_64_enchier.pkl', '1_0.001_64_log.csv', '1_0.001_64_position_classifier_K32.pkl',
        '1_0.001_64_position_classifier_K64.pkl', '1_0.001_64_state.pt']
    rows = list(csv.DictReader((folder / '1_0.001_64_log.csv').open()))
    assert len(rows) == 1 and rows[0]['epoch'] == '1'
    losses = {k: float(rows[0][k]) for k in ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total')}
    assert 1.5 < losses['pos_64'] < 3.0 and 1.5 < losses['pos_32'] < 3.0   # near ln 8 = 2.08 after one short epoch
    assert losses['total'] == pytest.approx(losses['pos_64'] + losses['pos_32']
                                            + 1e-3 * (losses['svdd_64'] + losses['svdd_32']), rel=1e-6)
    assert 'epoch 1/1  pos_64' in proc.stdout and 'ckpts/synthetic/1_0.001_64_enchier.pkl' in proc.stdout


def test_evaluate_finds_the_trained_checkpoint_and_writes_json(trained, synthetic_root):
    work, _ = trained
    proc = run('main_evaluate.py', '--obj=synthetic', '--epochs=1', '--device=cpu', '--cache_dir=cache', cwd=work,
               env={'MVTEC_ROOT': str(synthetic_root)})
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.splitlines()[0]
    assert line.startswith('|K64| Det: ') and ' |K32| Det: ' in line and ' |mult| Det: ' in line
    assert line.endswith('(synthetic)')
    path = written(proc)
    record = json.loads((work / path).read_text())
    assert set(record['aurocs']) == {f'{m}_{k}' for m in ('det', 'seg') for k in ('64', '32', 'sum', 'mult')}
    assert all(0 <= v <= 1 for v in record['aurocs'].values())
    assert f"Det: {record['aurocs']['det_mult'] * 100:4.1f}" in line
    assert record['settings']['resize'] == 'nearest' and record['settings']['nn'] == 'exact'
    assert record['settings']['n_train'] == 6 and record['settings']['n_test'] == 6
    assert record['settings']['checkpoint'].endswith('1_0.001_64_enchier.pkl')
    assert record['settings']['memory_bank'] == 'built'
    again = run('main_evaluate.py', '--obj=synthetic', '--epochs=1', '--device=cpu', '--cache_dir=cache', cwd=work,
                env={'MVTEC_ROOT': str(synthetic_root)})
    assert again.returncode == 0, again.stderr
    second = json.loads((work / written(again)).read_text())
    assert second['settings']['memory_bank'] == 'cached'
    assert second['aurocs'] == record['aurocs'] and second['metrics'] == record['metrics']   # exact: same numbers
    assert second['aurocs']['det_64'] == record['aurocs']['det_64']    # exact at K=64: identical


def test_visualize_writes_panels_curves_and_an_index(trained, synthetic_root):
    work, _ = trained
    out = work / 'pictures'
    proc = run('main_visualize.py', '--obj=synthetic', f'--data_root={synthetic_root}', '--epochs=1',
               f'--out_dir={out}', '--nn=exact', cwd=work, env={'XDG_CACHE_HOME': str(work / 'xdg')})
    assert proc.returncode == 0, proc.stderr
    panels = sorted(f'{d}_{i:03d}.png' for d in ('good', 'scratch', 'spot') for i in range(2))
    assert sorted(p.name for p in out.iterdir()) == sorted(panels + ['index.html', 'pro_curve.png', 'roc_curve.png'])
    assert all((out / n).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for n in panels + ['roc_curve.png'])
    page = (out / 'index.html').read_text()
    scores = [float(s) for s in re.findall(r'score ([0-9.e+-]+)</figcaption>', page)]
    assert len(scores) == 6 and scores == sorted(scores, reverse=True)
    assert all(f'src="{p}"' in page for p in panels) and page.count('defective (') == 4
    assert len(list((work / 'xdg' / 'patchsvdd').iterdir())) == 1     # the bank went to the user's cache


def test_evaluate_all_classes_present_prints_the_table(tmp_path):
    from codes.checkpoints import save_module
    from codes.networks import EncoderHier
    from codes.synthetic import make_synthetic_class
    torch.manual_seed(0)
    for obj in ('bottle', 'zipper'):
        make_synthetic_class(tmp_path / 'data', obj, n_train=3, n_good=2, n_defect=1, size=64)
        save_module(EncoderHier(64, 64), tmp_path / 'authors' / obj / 'enchier.pkl')
    proc = run('main_evaluate.py', '--obj=all', f'--data_root={tmp_path / "data"}',
               f'--ckpt_dir={tmp_path / "authors"}', '--save_maps', '--no_cache', '--nn=exact', cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == ('not found under the data root, skipped: cable, capsule, carpet, grid, hazelnut, leather, '
                      'metal_nut, pill, screw, tile, toothbrush, transistor, wood')
    assert '== bottle' in out and '== zipper' in out
    table = out[out.index('| class | Det (ours) | Det (paper) | Seg (ours) | Seg (paper) | AUPRO | pixel AP | F1-max |'):]
    assert table[2].startswith('| bottle |') and ' | 98.6 | ' in table[2] and table[3].startswith('| zipper |')
    assert table[4].startswith('| **mean** (2) |')
    rows = list(csv.DictReader((tmp_path / 'results' / 'summary.csv').open()))
    assert [r['obj'] for r in rows] == ['bottle', 'zipper']
    for obj in ('bottle', 'zipper'):
        maps = np.load(next((tmp_path / 'results' / obj).glob('*_maps.npz')))
        assert maps['maps_mult'].shape == (4, 256, 256) and maps['labels'].tolist() == [1, 1, 0, 0]


def test_evaluate_several_classes_refuses_one_ckpt(synthetic_root, tmp_path):
    proc = run('main_evaluate.py', '--obj=bottle,zipper', f'--data_root={synthetic_root}', '--ckpt=x.pkl', cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith('error: --ckpt names one checkpoint; for several classes')


@pytest.mark.parametrize('args,message', [
    ([], 'error: no dataset root: pass --data_root=/path/to/mvtec_anomaly_detection or set the MVTEC_ROOT'),
    (['--data_root=/nonexistent/mvtec'], 'error: dataset root /nonexistent/mvtec is not a folder'),
    (['--obj=cable', '--data_root={root}'], 'error: class folder {root}/cable not found; classes under {root}: synthetic'),
    (['--obj=synthetic', '--data_root={root}', '--epochs=7'], 'error: checkpoint ckpts/synthetic/7_0.001_64_enchier.pkl not found'),
    (['--obj=synthetic', '--data_root={root}'], 'error: checkpoint ckpts/synthetic/enchier.pkl not found'),
    (['--obj=synthetic', '--data_root={root}', '--device=cuda'],
     'error: checkpoint ckpts/synthetic/enchier.pkl not found' if torch.cuda.is_available()
     else 'error: --device cuda: CUDA is not available'),
    (['--obj=synthetic', '--data_root={root}', '--device=tpu9'], "error: --device 'tpu9' is not a device"),
])
def test_evaluate_errors_are_one_line(args, message, synthetic_root, tmp_path):
    args = [a.format(root=synthetic_root) for a in args]
    proc = run('main_evaluate.py', *args, cwd=tmp_path, env={'MVTEC_ROOT': ''})
    assert proc.returncode == 2
    assert proc.stderr.startswith(message.format(root=synthetic_root)) and proc.stderr.count('\n') == 1
    assert proc.stdout == '' and list(tmp_path.iterdir()) == []


def test_bad_numbers_are_refused_by_name(tmp_path):
    proc = run('main_train.py', '--epochs=0', cwd=tmp_path)
    assert proc.returncode == 2 and 'argument --epochs: must be at least 1, not 0' in proc.stderr
    assert list(tmp_path.iterdir()) == []
