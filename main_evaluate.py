"""Evaluate a Patch SVDD encoder on a class: `python main_evaluate.py --obj=bottle --epochs=300`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from codes import cli, inspection, mvtecad, reports
from codes.checkpoints import file_sha256, load_encoder
from codes.nearest_neighbor import METHODS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_data_args(parser)
    cli.add_checkpoint_args(parser)
    parser.add_argument('--nn', choices=METHODS, default='ngt',
                        help='nearest-neighbour search: ngt = exact at K=64 and NGT at K=32, as the original '
                             '(default); exact = exact at both; faiss = faiss flat index at both (needs faiss-cpu)')
    parser.add_argument('--batch_size', type=cli.positive_int, default=8, help='images per encoder pass (default 8)')
    parser.add_argument('--results_dir', default='results', help='where result JSON files go (default results)')
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device, files, ckpt = cli.resolve_inputs(args)
    enc = load_encoder(ckpt, args.D, device)
    t = time.perf_counter()
    data = mvtecad.load_class(files, args.resize)
    load_time = time.perf_counter() - t
    result = inspection.evaluate(enc, data, args.nn, device, args.batch_size)
    print(inspection.result_line(result.aurocs, args.obj))
    record = {
        'obj': args.obj,
        'aurocs': result.aurocs,
        'settings': {'resize': args.resize, 'nn': args.nn, 'D': args.D, 'device': str(device),
                     'data_root': str(files.folder.parent), 'checkpoint': str(ckpt), 'checkpoint_sha256': file_sha256(ckpt),
                     'n_train': len(files.train), 'n_test': len(files.test)},
        'times_s': {'load': load_time, **result.times, 'total': time.perf_counter() - started},
    }
    path = reports.write_result(Path(args.results_dir), args.obj, reports.run_name(ckpt, args.resize, args.nn), record)
    print(f'results written to {path}')
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: evaluate(args), args.debug)


if __name__ == '__main__':
    main()
