"""Training speed, three tables (`--tables`, default all):

    python benchmarks/train_speed.py [--tables iteration,loader,processes] [--batch_size 64] [--device cpu]

iteration: the original's iteration against ours, same batches, same seed. Both make one encoder
call per patch tensor (measured here: one call over all tensors of a size is slower on a CPU, the
1,024 quadrant patches fall out of cache); ours runs in channels-last layout. Prints patch pairs per
second for both and the losses of the first steps side by side, starting from the same weights, to
show the math is unchanged.

loader: how fast the data loader makes global batches with 0, 1, 2... worker processes; a GPU step
of 9 ms needs about 110 batches/s, which tells how many workers a GPU needs.

processes: main_train.py as a user runs it, on a real class (default bottle, --repeat 2: 7 steps an
epoch, 2 epochs, the last timed): one process, then torchrun with 1 and 2 gloo ranks on the CPU; where
CUDA is present, one GPU without and with --amp (and torchrun over all GPUs when there are several).
Prints steps/s and pairs/s, the mean loss of the first epoch (the same fixed steps for every row)
and the largest relative weight difference to the first row of the same device.
"""
from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import common  # noqa: E402,F401  (puts the repository on the path)
from torch.utils.data import DataLoader  # noqa: E402

from codes import distributed  # noqa: E402
from codes.datasets import to_device, training_datasets  # noqa: E402
from codes.losses import patch_svdd_losses  # noqa: E402
from codes.networks import EncoderHier, PositionClassifier  # noqa: E402

LAMBDA = 1e-3


def original_losses(enc, cls_64, cls_32, batch, lambda_value):
    """The authors' loop body: PositionClassifier.infer and SVDD_Dataset.infer, one encoder call per tensor."""
    def position(cls, encoder, pair):
        x1, x2, y = pair
        return F.cross_entropy(cls(encoder(x1), encoder(x2)), y)

    def svdd(encoder, pair):
        x1, x2 = pair
        return (encoder(x1) - encoder(x2)).norm(dim=1).mean()

    losses = {'pos_64': position(cls_64, enc, batch['pos_64']), 'pos_32': position(cls_32, enc.enc, batch['pos_32']),
              'svdd_64': svdd(enc, batch['svdd_64']), 'svdd_32': svdd(enc.enc, batch['svdd_32'])}
    losses['total'] = losses['pos_64'] + losses['pos_32'] + lambda_value * (losses['svdd_64'] + losses['svdd_32'])
    return losses


def make_batches(batch_size: int, steps: int, seed: int) -> list[dict]:
    """Real training batches from images with some structure (a smooth random field), made once."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    x = np.repeat(np.repeat(base, 8, axis=2), 8, axis=3) * 0.2          # 4 images of 256x256
    dataset = training_datasets(x, repeat=batch_size * steps, seed=seed)
    return [default_collate([dataset[i] for i in range(s * batch_size, (s + 1) * batch_size)]) for s in range(steps)]


def run(step_fn, modules, batches, device, channels_last: bool) -> tuple[float, list[dict]]:
    """Trains on the batches; returns seconds per step (after one warm-up step) and the losses."""
    enc, cls_64, cls_32 = modules
    if channels_last:   # as codes/training.py does
        enc.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=1e-4)
    history = []
    started = None
    for i, batch in enumerate(batches):
        if i == 1:
            started = time.perf_counter()
        batch = to_device(batch, device) if channels_last else {k: tuple(t.to(device) for t in v)
                                                                   for k, v in batch.items()}
        losses = step_fn(enc, cls_64, cls_32, batch, LAMBDA)
        opt.zero_grad(set_to_none=True)
        losses['total'].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    return (time.perf_counter() - started) / (len(batches) - 1), history


def iteration_table(args) -> None:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    modules = [EncoderHier(64, 64).to(device), PositionClassifier(64, 64).to(device), PositionClassifier(32, 64).to(device)]
    batches = make_batches(args.batch_size, args.steps, args.seed)
    times_orig, times_ours = [], []
    for _ in range(args.repeats):   # alternating, as single runs on a shared CPU vary by 10%
        t, h_orig = run(original_losses, copy.deepcopy(modules), batches, device, channels_last=False)
        times_orig.append(t)
        t, h_ours = run(patch_svdd_losses, copy.deepcopy(modules), batches, device, channels_last=True)
        times_ours.append(t)
    t_orig, t_ours = float(np.median(times_orig)), float(np.median(times_ours))

    print(f'training iteration, batch {args.batch_size}, {args.steps} steps, median of {args.repeats} alternating '
          f'runs, device {device}, {torch.get_num_threads()} threads')
    print('| iteration | s/step | patch pairs/s | speed-up |')
    print('|---|---|---|---|')
    pairs = 4 * args.batch_size   # pos_64, pos_32, svdd_64, svdd_32 pairs per step
    print(f'| original-style | {t_orig:.3f} | {pairs / t_orig:.0f} | 1.00x |')
    print(f'| ours | {t_ours:.3f} | {pairs / t_ours:.0f} | {t_orig / t_ours:.2f}x |')
    print()
    print('| step | loss | original-style | ours | abs diff |')
    print('|---|---|---|---|---|')
    worst = 0.0
    for step, (a, b) in enumerate(zip(h_orig, h_ours)):
        for k in ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total'):
            diff = abs(a[k] - b[k])
            worst = max(worst, diff)
            if step < 3:
                print(f'| {step} | {k} | {a[k]:.7f} | {b[k]:.7f} | {diff:.1e} |')
    print(f'\nlargest loss difference over {args.steps} steps: {worst:.2e}\n')


def loader_table(args) -> None:
    """Global batches per second from the training loader (codes/training.py's), by worker count."""
    from codes.training import EpochItems, Progress, RunBatches, TrainConfig
    x, _ = class_images(args)
    dataset = training_datasets(x, repeat=100, seed=args.seed)
    cfg = TrainConfig(obj=args.obj, data_root=Path(args.data_root), batch_size=args.batch_size, epochs=1, repeat=100)
    print(f'data loader, global batches of {args.batch_size} pairs of each kind ({args.obj}), '
          f'{os.cpu_count()} CPU cores')
    print('| workers | batches/s | ms/batch |')
    print('|---|---|---|')
    for workers in args.workers:
        loader = DataLoader(EpochItems(dataset), batch_sampler=RunBatches(cfg, distributed.Context(), len(dataset),
                                                                          Progress(1, 0, {})),
                            num_workers=workers, prefetch_factor=4 if workers else None)
        batches = iter(loader)
        next(batches)   # workers started
        started = time.perf_counter()
        for _ in range(args.loader_batches):
            next(batches)
        rate = args.loader_batches / (time.perf_counter() - started)
        print(f'| {workers} | {rate:.1f} | {1000 / rate:.1f} |')
        del batches
    print()


def class_images(args) -> tuple[np.ndarray, int]:
    from codes import mvtecad
    files = mvtecad.find_class(Path(args.data_root), args.obj)
    images = mvtecad.load_images(files.train, args.resize, f'{args.obj} train')
    return mvtecad.standardize(images, mvtecad.mean_image(images)), len(files.train)


def train_run(launcher: list[str], flags: list[str], env: dict[str, str], out: Path) -> dict:
    """One main_train.py run; its log's rows, the encoder's weights and the wall time of the last epoch."""
    cmd = launcher + [str(common.REPO / 'main_train.py'), *flags, f'--ckpt_dir={out}']
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode:
        raise SystemExit(f'failed: {" ".join(cmd)}\n{proc.stderr[-2000:]}')
    folder = next(p for p in out.iterdir() if p.is_dir())
    rows = list(csv.DictReader(next(folder.glob('*_log.csv')).open()))
    weights = torch.load(next(folder.glob('*_enchier.pkl')), map_location='cpu', weights_only=True)
    return {'rows': rows, 'weights': weights}


def relative_difference(a: dict, b: dict) -> tuple[float, str]:
    """The largest over the tensors of |a - b| / |b| (Frobenius norms), and that tensor's name."""
    return max((((a[k] - b[k]).norm() / b[k].norm()).item(), k) for k in a)


def processes_table(args) -> None:
    n_train = class_images(args)[1]
    steps = -(-n_train * args.repeat // args.batch_size)
    flags = [f'--obj={args.obj}', f'--data_root={args.data_root}', f'--resize={args.resize}',
             f'--epochs={args.epochs}', f'--repeat={args.repeat}', f'--batch_size={args.batch_size}', '--seed=0']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    # The 1-thread process shows how far float summation order alone moves the weights (its convolutions
    # add up in another order), the yardstick for the ranks' difference.
    configs = [('CPU, 1 process', [sys.executable], ['--device=cpu'], {}),
               ('CPU, 1 process, OMP_NUM_THREADS=1', [sys.executable], ['--device=cpu'], {'OMP_NUM_THREADS': '1'}),
               ('CPU, torchrun 1 gloo rank', torchrun + ['--nproc_per_node=1'], ['--device=cpu'], {}),
               ('CPU, torchrun 2 gloo ranks', torchrun + ['--nproc_per_node=2'], ['--device=cpu'], {})]
    if torch.cuda.is_available():
        configs += [('1 GPU', [sys.executable], ['--device=cuda'], {}),
                    ('1 GPU, --amp', [sys.executable], ['--device=cuda', '--amp'], {})]
        if torch.cuda.device_count() > 1:
            n = torch.cuda.device_count()
            configs.append((f'{n} GPUs, torchrun, --amp', torchrun + [f'--nproc_per_node={n}'],
                            ['--device=cuda', '--amp'], {}))
    print(f'main_train.py, {args.obj} ({n_train} images) x repeat {args.repeat}: {steps} steps of {args.batch_size} '
          f'pairs of each kind per epoch, {args.epochs} epochs, the last timed; {os.cpu_count()} CPU cores'
          + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ', no GPU'))
    print('| run | s/step | steps/s | pairs/s | epoch-1 mean loss | largest relative weight difference |')
    print('|---|---|---|---|---|---|')
    first: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, launcher, extra, env) in enumerate(configs):
            result = train_run(launcher, flags + extra, env, Path(tmp) / str(i))
            seconds = float(result['rows'][-1]['seconds'])
            kind = 'cpu' if name.startswith('CPU') else 'gpu'
            base = first.setdefault(kind, result)
            diff, where = relative_difference(result['weights'], base['weights'])
            print(f'| {name} | {seconds / steps:.4f} | {steps / seconds:.2f} | {4 * args.batch_size * steps / seconds:.0f} '
                  f'| {float(result["rows"][0]["total"]):.6f} | {"(reference)" if result is base else f"{diff:.1e} ({where})" if diff else "0 (bit for bit)"} |',
                  flush=True)
    print()


def main() -> None:
    parser = common.class_parser(__doc__)
    parser.add_argument('--tables', default='iteration,loader,processes')
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=8, help='iteration table: steps timed')
    parser.add_argument('--device', default='cpu', help='iteration table: device')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--repeats', type=int, default=3, help='iteration table: alternating runs of each; the median')
    parser.add_argument('--workers', type=lambda t: [int(v) for v in t.split(',')], default=[0, 1, 2],
                        help='loader table: worker counts (comma list)')
    parser.add_argument('--loader_batches', type=int, default=20, help='loader table: batches timed')
    parser.add_argument('--repeat', type=int, default=2, help='processes table: visits of each image per epoch')
    parser.add_argument('--epochs', type=int, default=2, help='processes table: epochs (the last is timed)')
    args = parser.parse_args()
    tables = args.tables.split(',')
    if 'iteration' in tables:
        iteration_table(args)
    if 'loader' in tables:
        loader_table(args)
    if 'processes' in tables:
        processes_table(args)


if __name__ == '__main__':
    main()
