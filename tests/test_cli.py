"""The entry scripts as a user runs them, on a tiny synthetic class, on the CPU."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

TRAIN_FLAGS = ['--epochs=1', '--repeat=4', '--batch_size=8', '--device=cpu']


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


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
    path = Path(proc.stdout.splitlines()[1].removeprefix('results written to '))
    record = json.loads((work / path).read_text())
    assert set(record['aurocs']) == {f'{m}_{k}' for m in ('det', 'seg') for k in ('64', '32', 'sum', 'mult')}
    assert all(0 <= v <= 1 for v in record['aurocs'].values())
    assert f"Det: {record['aurocs']['det_mult'] * 100:4.1f}" in line
    assert record['settings']['resize'] == 'nearest' and record['settings']['nn'] == 'ngt'
    assert record['settings']['n_train'] == 6 and record['settings']['n_test'] == 6
    assert record['settings']['checkpoint'].endswith('1_0.001_64_enchier.pkl')
    assert record['settings']['memory_bank'] == 'built'
    again = run('main_evaluate.py', '--obj=synthetic', '--epochs=1', '--device=cpu', '--cache_dir=cache', cwd=work,
                env={'MVTEC_ROOT': str(synthetic_root)})
    assert again.returncode == 0, again.stderr
    second = json.loads((work / again.stdout.splitlines()[1].removeprefix('results written to ')).read_text())
    assert second['settings']['memory_bank'] == 'cached'
    assert second['aurocs']['det_64'] == record['aurocs']['det_64']    # exact at K=64: identical


def test_visualize_writes_one_picture_per_test_image(trained, synthetic_root):
    work, _ = trained
    out = work / 'pictures'
    proc = run('main_visualize.py', '--obj=synthetic', f'--data_root={synthetic_root}', '--epochs=1',
               f'--out_dir={out}', '--nn=exact', cwd=work, env={'XDG_CACHE_HOME': str(work / 'xdg')})
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f'{d}_{i:03d}.png' for d in ('good', 'scratch', 'spot') for i in range(2))
    assert all((out / n).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' for n in names)
    assert len(list((work / 'xdg' / 'patchsvdd').iterdir())) == 1     # the bank went to the user's cache


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
