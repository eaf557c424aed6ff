"""Training is repeatable with a seed, and an interrupted run resumed ends where a straight one does."""
import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codes.errors import Interrupted, UserError
from codes.training import TrainConfig, train
from tests.conftest import REPO

TINY = dict(obj='synthetic', epochs=2, repeat=6, batch_size=4, seed=3, device='cpu')


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)


def losses(log: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k != 'seconds'} for row in csv.DictReader(log.open())]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope='module')
def straight(synthetic_root, tmp_path_factory):
    """An uninterrupted two-epoch run."""
    cfg = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path_factory.mktemp('straight'), **TINY)
    return cfg, train(cfg)


def test_same_seed_same_run(straight, synthetic_root, tmp_path):
    cfg, path = straight
    again = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, **TINY)
    assert_same_weights(train(again), path)
    assert losses(again.path('log.csv')) == losses(cfg.path('log.csv')) and len(losses(cfg.path('log.csv'))) == 2
    other = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path / 'other', **{**TINY, 'seed': 4})
    assert not torch.equal(weights(train(other))['conv2.weight'], weights(path)['conv2.weight'])


def test_loader_workers_change_nothing(straight, synthetic_root, tmp_path):
    """One loader spans the run: worker processes make each epoch's items from (seed, epoch, index) alike."""
    cfg, path = straight
    workers = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, **{**TINY, 'num_workers': 2})
    assert_same_weights(train(workers), path)
    assert losses(workers.path('log.csv')) == losses(cfg.path('log.csv'))


def test_stopped_mid_epoch_then_resumed_equals_straight(straight, synthetic_root, tmp_path):
    cfg, path = straight
    stopped = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, **TINY)

    def press_ctrl_c(epoch, enc):       # lands between epoch 1 and the first step of epoch 2
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match=r'training stopped at epoch 2, step 1 of 9; state saved to .*'
                                          r'2_0.001_64_state.pt: continue with the same command and --resume'):
        train(stopped, press_ctrl_c)
    assert not (tmp_path / 'synthetic' / '2_0.001_64_enchier.pkl').exists()
    state = torch.load(stopped.path('state.pt'), weights_only=True)
    assert (state['epoch'], state['step']) == (2, 1)
    resumed = train(TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, resume=True, **TINY))
    assert_same_weights(resumed, path)
    assert losses(stopped.path('log.csv')) == losses(cfg.path('log.csv'))
    assert not [p for p in (tmp_path / 'synthetic').iterdir() if p.name.startswith('.')]   # no temporaries


def test_resume_needs_a_state_and_the_same_seed(straight, synthetic_root, tmp_path):
    cfg, _ = straight
    with pytest.raises(UserError, match='--resume: no saved training state at .*; start without --resume'):
        train(TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, resume=True, **TINY))
    with pytest.raises(UserError, match=r'--resume: .* was trained with --seed 3, not 5; pass the same value'):
        train(TrainConfig(data_root=synthetic_root, ckpt_dir=cfg.ckpt_dir, resume=True, **{**TINY, 'seed': 5}))


def test_ctrl_c_on_the_command_line_then_resume(straight, synthetic_root, tmp_path):
    """As a user: Ctrl-C during the second epoch, then the same command with --resume."""
    _, path = straight
    cmd = [sys.executable, str(REPO / 'main_train.py'), f'--data_root={synthetic_root}', '--obj=synthetic',
           '--epochs=2', '--repeat=6', '--batch_size=4', '--seed=3', '--device=cpu', f'--ckpt_dir={tmp_path}']
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout.readline().startswith('epoch 1/2  pos_64 ')
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert 'error: training stopped at epoch 2, step ' in err and err.rstrip().endswith('and --resume')
    done = subprocess.run(cmd + ['--resume'], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith('resuming from ') and 'epoch 2/2  pos_64' in done.stdout
    assert_same_weights(tmp_path / 'synthetic' / '2_0.001_64_enchier.pkl', path)
