"""Train Patch SVDD on a class's normal images: `python main_train.py --obj=bottle --lambda_value=1e-3`.

Several processes (GPUs or machines): `torchrun --nproc_per_node=N main_train.py ...` (README.md).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from codes import cli, distributed, inspection, mvtecad
from codes.memory_bank import build_bank
from codes.training import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_train.py', description=__doc__, examples=(
        'python main_train.py --obj=bottle --data_root=/data/mvtec --lambda_value=1e-3',
        'python main_train.py --obj=bottle --data_root=/data/mvtec --epochs=300 --resume',
        'torchrun --nproc_per_node=4 main_train.py --obj=bottle --data_root=/data/mvtec --amp'))
    cli.add_data_args(parser)
    cli.add_model_args(parser)
    parser.add_argument('--epochs', type=cli.positive_int, default=300,
                        help='training passes (default 300; the original made epochs - 1)')
    parser.add_argument('--lr', type=cli.positive_float, default=1e-4, help='Adam learning rate (default 1e-4)')
    parser.add_argument('--batch_size', type=cli.positive_int, default=64,
                        help='patch pairs of each kind per step, in all processes together (default 64)')
    parser.add_argument('--repeat', type=cli.positive_int, default=100,
                        help='times each training image is visited per epoch (default 100)')
    parser.add_argument('--num_workers', type=cli.non_negative_int, default=None,
                        help='data loader processes per rank (default: 0 on the CPU; on a GPU up to 8, '
                             'sharing the cores among the ranks on a machine)')
    parser.add_argument('--amp', action='store_true',
                        help='bf16 autocast (CUDA only): faster steps, the same losses within bf16 tolerance')
    parser.add_argument('--seed', type=cli.non_negative_int, default=0, help='random seed (default 0)')
    parser.add_argument('--ckpt_dir', default='ckpts', help='checkpoint folder (default ckpts)')
    parser.add_argument('--eval_every', type=cli.non_negative_int, default=0,
                        help='evaluate on the test set every K epochs (default 0: off; the original did every epoch)')
    parser.add_argument('--resume', action='store_true', help='continue from the state saved after the last epoch')
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    device = cli.resolve_device(args.device)
    cfg = TrainConfig(obj=args.obj, data_root=mvtecad.resolve_data_root(args.data_root), ckpt_dir=Path(args.ckpt_dir),
                      epochs=args.epochs, lambda_value=args.lambda_value, D=args.D, lr=args.lr,
                      batch_size=args.batch_size, repeat=args.repeat, num_workers=args.num_workers, seed=args.seed,
                      resize=args.resize, device=str(device), resume=args.resume, amp=args.amp)
    loaded: list[mvtecad.LoadedClass] = []   # train and test images, read on the first evaluation only
    columns = [f'{kind}_{name}' for name in inspection.MAP_NAMES for kind in ('det', 'seg')]

    def evaluate(epoch: int, enc) -> dict:
        """Rank 0 only (train() calls it there), with evaluation's default search; its AUROCs go to the log."""
        if not args.eval_every:
            return {}
        if epoch % args.eval_every:
            return dict.fromkeys(columns, '')
        if not loaded:
            loaded.append(mvtecad.load_class(mvtecad.find_class(cfg.data_root, cfg.obj), cfg.resize))
        on = next(enc.parameters()).device          # this rank's device (under torchrun, its own GPU)
        bank = build_bank(enc, loaded[0].train, on)   # the encoder changed: nothing to cache
        result = inspection.evaluate(enc, bank, loaded[0], device=on)
        print(f'epoch {epoch}: ' + inspection.result_line(result.aurocs, cfg.obj), flush=True)
        enc.train()
        return {k: '' if result.aurocs[k] is None else result.aurocs[k] for k in columns}

    with distributed.session(device) as ctx:
        path = train(replace(cfg, device=str(ctx.device)), evaluate, ctx)
    if ctx.is_main:
        print(f'encoder saved to {path}')
        print(f'evaluate it with: python main_evaluate.py --obj={cfg.obj} --epochs={cfg.epochs} '
              f'--lambda_value={cfg.lambda_value} --D={cfg.D} --ckpt_dir={cfg.ckpt_dir}')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
