"""A two-minute tour on the CPU: make a small synthetic class, train briefly, evaluate, draw the maps.

    python main_demo.py [--out_dir demo_output]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import main_evaluate
import main_train
import main_visualize
from codes import cli
from codes.synthetic import make_synthetic_class

OBJ = 'synthetic'
EPOCHS = 4


def run(out_dir: Path, device: str) -> None:
    data_root = out_dir / 'data'
    ckpt_dir = out_dir / 'ckpts'
    make_synthetic_class(data_root, OBJ)
    print(f'1/4 synthetic class written to {data_root / OBJ}')
    common = [f'--obj={OBJ}', f'--data_root={data_root}', f'--ckpt_dir={ckpt_dir}', f'--device={device}']
    print(f'2/4 training ({EPOCHS} short epochs)')
    main_train.main(common + [f'--epochs={EPOCHS}', '--repeat=40', '--batch_size=32'])
    print('3/4 evaluating')
    main_evaluate.main(common + [f'--epochs={EPOCHS}', f'--out_dir={out_dir / "results"}'])
    print('4/4 drawing anomaly maps')
    main_visualize.main(common + [f'--epochs={EPOCHS}', f'--out_dir={out_dir / "anomaly_maps" / OBJ}'])
    print(f'done: data {data_root}, checkpoints {ckpt_dir / OBJ}, results {out_dir / "results" / OBJ}, '
          f'pictures {out_dir / "anomaly_maps" / OBJ}')


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog='main_demo.py', description=__doc__, examples=(
        'python main_demo.py', 'python main_demo.py --out_dir=demo_output'))
    parser.add_argument('--out_dir', default=None, help='where everything goes (default: a new temporary folder)')
    parser.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    args = parser.parse_args(argv)
    cli.run(lambda: run(Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix='patchsvdd-demo-')),
                        args.device))


if __name__ == '__main__':
    main()
