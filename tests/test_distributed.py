"""Training under torchrun with 2 gloo ranks on the CPU: the same run as one process, rank 0's files,
a rank killed mid-epoch, and --resume with the same or another number of processes."""
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main_train
from codes import distributed
from codes.errors import Interrupted, UserError
from codes.training import PatchSVDD, TrainConfig, train
from tests.conftest import REPO

# 3 real bottle images x repeat 7 = 21 items in batches of 5: steps of 5, 5, 5, 5, 1, so the 2 ranks
# split most batches 3 + 2 and the last 1 + 0 (rank 1 then joins the all-reduce with share 0).
SUBSET = dict(obj='bottle3', epochs=1, repeat=7, batch_size=5, seed=1, device='cpu')
TINY = dict(obj='synthetic', epochs=2, repeat=6, batch_size=5, seed=3, device='cpu')


def flags(cfg: dict, data_root: Path, ckpt_dir: Path) -> list[str]:
    return [f'--{k}={v}' for k, v in cfg.items()] + [f'--data_root={data_root}', f'--ckpt_dir={ckpt_dir}']


def torchrun(nproc: int, args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    """As the README says to launch it; OMP_NUM_THREADS=1 per rank is torchrun's own default."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(REPO / 'main_train.py'), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=300)
    return out, err


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location='cpu', weights_only=True)


def relative_difference(a: Path, b: Path) -> float:
    """Largest over the tensors of |wa - wb| / |wb| (Frobenius norms), computed here independently of the code."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max(((wa[k] - wb[k]).norm() / wb[k].norm()).item() for k in wa)


def update_difference(a: Path, b: Path, start: dict[str, torch.Tensor]) -> float:
    """|wa - wb| / |wb - w0| over all tensors together: how far two runs' trainings differ, measured
    against how far training moved the weights from their common start w0."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() == start.keys()
    flat = lambda w: torch.cat([w[k].flatten() for k in sorted(w)])
    return ((flat(wa) - flat(wb)).norm() / (flat(wb) - flat(start)).norm()).item()


def log_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(path.open()))


@pytest.fixture(scope='module')
def bottle3(mvtec_root, tmp_path_factory):
    """A small real class: 3 bottle training images, one good and one broken test image with its mask."""
    root = tmp_path_factory.mktemp('bottle3')
    src, dst = mvtec_root / 'bottle', root / 'bottle3'
    for sub, names in (('train/good', ('000.png', '001.png', '002.png')), ('test/good', ('000.png',)),
                       ('test/broken_large', ('000.png',)), ('ground_truth/broken_large', ('000_mask.png',))):
        (dst / sub).mkdir(parents=True)
        for name in names:
            (dst / sub / name).symlink_to(src / sub / name)
    return root


@pytest.fixture(scope='module')
def straight_tiny(synthetic_root, tmp_path_factory):
    """An uninterrupted two-epoch single-process run on the synthetic class."""
    cfg = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path_factory.mktemp('straight'), **TINY)
    return cfg, train(cfg)


def test_two_gloo_ranks_train_what_one_process_trains(bottle3, tmp_path):
    """The 2-rank run, evaluating after its epoch on rank 0, against the same run in one process."""
    proc = torchrun(2, flags(SUBSET, bottle3, tmp_path / 'ddp') + ['--eval_every=1'], cwd=tmp_path)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    one = TrainConfig(data_root=bottle3, ckpt_dir=tmp_path / 'one', **SUBSET)
    path = train(one)
    ddp = tmp_path / 'ddp' / 'bottle3'
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in path.parent.iterdir())   # nothing else
    torch.manual_seed(SUBSET['seed'])   # the encoder both runs started from, as train() builds it
    start = PatchSVDD(64, 1e-3).enc.state_dict()
    difference = update_difference(ddp / path.name, path, start)
    print(f'2 gloo ranks vs 1 process: encoder updates differ by {difference:.1%}')   # (for README, -s)
    # Adam's first steps are about lr * sign(gradient), so weights whose gradient is near zero move a full
    # step either way on a different float summation order: a few per cent of the update, not a different
    # training (which the losses below, equal to 1e-4, would show)
    assert 0 < difference <= 0.25
    for k in (64, 32):
        name = f'1_0.001_64_position_classifier_K{k}.pkl'
        assert relative_difference(ddp / name, path.parent / name) <= 1e-3

    # rank 0 alone prints and logs, and what it logs are the means over the whole global batches
    assert len(re.findall(r'^epoch 1/1  pos_64 ', out, re.M)) == 1 and out.count('encoder saved to') == 1
    assert len(re.findall(r'^epoch 1: \|K64\| Det: ', out, re.M)) == 1
    (row,), (ref,) = log_rows(ddp / '1_0.001_64_log.csv'), log_rows(one.path('log.csv'))
    for k in ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total'):
        assert float(row[k]) == pytest.approx(float(ref[k]), rel=1e-4)   # svdd ~1e-4: float noise
    aurocs = {k: float(row[k]) for k in row if k.startswith(('det_', 'seg_'))}
    assert len(aurocs) == 8 and all(0 <= v <= 1 for v in aurocs.values())
    state = torch.load(ddp / '1_0.001_64_state.pt', weights_only=True)
    assert (state['epoch'], state['step'], state['world_size']) == (2, 0, 2)


def rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 60) -> int:
    """The process id of a rank among the launcher's children, from their environment (Linux /proc)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path('/proc').iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / 'stat').read_text().rsplit(')', 1)[1].split()[1])
                env = (entry / 'environ').read_bytes().split(b'\0') if ppid == launcher.pid else []
            except (OSError, IndexError, ValueError):
                continue
            if f'RANK={rank}'.encode() in env:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f'rank {rank} not found among the children of {launcher.pid}')


def test_rank_killed_mid_epoch_keeps_the_last_state_and_resume_continues(straight_tiny, synthetic_root, tmp_path):
    _, straight = straight_tiny
    args = flags(TINY, synthetic_root, tmp_path)
    proc = torchrun(2, args + ['--num_workers=1'], cwd=tmp_path)
    victim = rank_pid(proc, 1)
    assert proc.stdout.readline().startswith('epoch 1/2  pos_64 ')   # rank 0 finished epoch 1 and saved
    log = tmp_path / 'synthetic' / '2_0.001_64_log.csv'
    while not log.exists():     # written atomically after the line: then rank 0 is done with epoch 1
        time.sleep(0.02)
    os.kill(victim, signal.SIGKILL)                                     # rank 1 dies during epoch 2
    out, err = finish(proc)
    assert proc.returncode != 0
    # one line from us; rank 0 either sees its peer's connection close or is stopped by torchrun first
    ours = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(ours) == 1, err
    assert re.fullmatch(r'error: (rank 0: training stopped in epoch 2: another rank failed or was stopped \(.*\)'
                        r'|training stopped by SIG(TERM|INT) in epoch 2); the state saved after epoch 1 is kept at '
                        r'.*/2_0.001_64_state.pt: continue with the same command and --resume \(with any number '
                        r'of processes\)', ours[0]), ours[0]
    folder = tmp_path / 'synthetic'
    assert sorted(p.name for p in folder.iterdir()) == ['2_0.001_64_log.csv', '2_0.001_64_state.pt']   # no temporaries
    state = torch.load(folder / '2_0.001_64_state.pt', weights_only=True)
    assert (state['epoch'], state['step']) == (2, 0)

    resumed = torchrun(2, args + ['--resume'], cwd=tmp_path)
    out, err = finish(resumed)
    assert resumed.returncode == 0, err
    assert out.startswith('resuming from ') and 'epoch 2/2  pos_64' in out and 'epoch 1/2' not in out
    assert relative_difference(folder / straight.name, straight) <= 1e-3
    assert [r['epoch'] for r in log_rows(folder / '2_0.001_64_log.csv')] == ['1', '2']


def test_single_process_state_resumes_under_torchrun(straight_tiny, synthetic_root, tmp_path):
    """A run stopped by Ctrl-C mid-epoch in one process goes on in 2 ranks and ends as the straight run."""
    cfg, straight = straight_tiny
    stopped = TrainConfig(data_root=synthetic_root, ckpt_dir=tmp_path, **TINY)

    def press_ctrl_c(epoch, enc):       # lands between epoch 1 and the first step of epoch 2
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted, match='training stopped at epoch 2, step 1 of 8'):
        train(stopped, press_ctrl_c)
    proc = torchrun(2, flags(TINY, synthetic_root, tmp_path) + ['--resume'], cwd=tmp_path)
    out, err = finish(proc)
    assert proc.returncode == 0, err
    assert out.startswith(f'resuming from {stopped.path("state.pt")} at epoch 2, step 1')
    assert relative_difference(tmp_path / 'synthetic' / straight.name, straight) <= 1e-3
    # epoch 2's logged means combine the step done in one process with the 7 done in 2 ranks
    for got, want in zip(log_rows(stopped.path('log.csv')), log_rows(cfg.path('log.csv'))):
        for k in ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total'):
            assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-4)


def test_each_rank_takes_a_contiguous_slice_of_the_global_batch():
    ranks = [distributed.Context(rank=r, world_size=3) for r in range(3)]
    assert [distributed.shard([9, 4, 7, 1, 3, 8, 5], c) for c in ranks] == [
        ([9, 4, 7], 3 / 7), ([1, 3], 2 / 7), ([8, 5], 2 / 7)]
    # fewer items than ranks: the rank left out computes on the first item with share 0
    assert [distributed.shard([6, 2], c) for c in ranks] == [([6], 0.5), ([2], 0.5), ([6], 0.0)]
    # DDP averages over 3 ranks: scaled shares make the global batch's mean
    assert [distributed.backward_scale(s, ranks[0]) for s in (3 / 7, 0.0)] == pytest.approx([9 / 7, 0.0])
    assert distributed.backward_scale(1.0, distributed.Context()) == 1.0


def test_devices_refused_under_torchrun():
    with pytest.raises(UserError, match=r'--device cuda:1: under torchrun each rank uses the GPU numbered by its '
                                        r'LOCAL_RANK; pass --device cuda'):
        distributed.rank_device(torch.device('cuda', 1), 0)
    count = torch.cuda.device_count()
    with pytest.raises(distributed.RankError, match=rf'rank with LOCAL_RANK {count}: this machine shows {count} '
                                                    rf'GPU\(s\); start at most {count} processes on it'):
        distributed.rank_device(torch.device('cuda'), count)
    assert distributed.rank_device(torch.device('cpu'), 3) == torch.device('cpu')


def test_amp_is_refused_on_the_cpu(synthetic_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main_train.main(['--obj=synthetic', f'--data_root={synthetic_root}', f'--ckpt_dir={tmp_path}',
                         '--device=cpu', '--amp'])
    assert stop.value.code == 2
    assert capsys.readouterr().err == 'error: --amp: bf16 autocast needs a CUDA device, not cpu; leave out --amp on the CPU\n'
    assert list(tmp_path.iterdir()) == []


def test_a_peer_failure_is_told_apart_and_shortened():
    launched = distributed.Context(world_size=2, launched=True)
    gloo = RuntimeError('[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error '
                        '[127.0.0.1]:36264: Connection reset by peer. This is typically caused by a remote...')
    assert distributed.is_peer_failure(gloo, launched)
    assert not distributed.is_peer_failure(gloo, distributed.Context())   # one process has no peers
    assert not distributed.is_peer_failure(RuntimeError('mat1 and mat2 shapes cannot be multiplied'), launched)
    assert distributed.first_line(gloo) == 'Read error [127.0.0.1]:36264: Connection reset by peer'
