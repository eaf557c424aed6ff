"""Training iteration speed: the original's iteration against ours, same batches, same seed.

    python benchmarks/train_speed.py [--batch_size 64] [--steps 8] [--device cpu]

Both make one encoder call per patch tensor (measured here: one call over all tensors of a size is
slower on a CPU, the 1,024 quadrant patches fall out of cache); ours runs in channels-last layout.
Prints patch pairs per second for both and the losses of the first steps side
by side, starting from the same weights, to show the math is unchanged.
"""
from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

import common  # noqa: E402,F401  (puts the repository on the path)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch_size', type=int, default=64)
    parser.add_argument('--steps', type=int, default=8)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--repeats', type=int, default=3, help='alternating runs of each; the median is reported')
    args = parser.parse_args()
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
    print(f'\nlargest loss difference over {args.steps} steps: {worst:.2e}')


if __name__ == '__main__':
    main()
