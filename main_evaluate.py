"""Evaluate a Patch SVDD encoder on a class: `python main_evaluate.py --obj=bottle --epochs=300`."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from codes import cli, inspection, reports
from codes.checkpoints import file_sha256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    cli.add_data_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_search_args(parser)
    parser.add_argument('--results_dir', default='results', help='where result JSON files go (default results)')
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    run = cli.prepare(args)
    result = inspection.evaluate(run.enc, run.bank, run.data, args.nn, run.device, args.batch_size)
    print(inspection.result_line(result.aurocs, args.obj))
    files = run.data.files
    record = {
        'obj': args.obj,
        'aurocs': result.aurocs,
        'settings': {'resize': args.resize, 'nn': args.nn, 'D': args.D, 'device': str(run.device),
                     'data_root': str(files.folder.parent), 'checkpoint': str(run.ckpt),
                     'checkpoint_sha256': file_sha256(run.ckpt), 'memory_bank': run.bank_source,
                     'n_train': len(files.train), 'n_test': len(files.test)},
        'times_s': {**run.times, **result.times, 'total': time.perf_counter() - started},
    }
    path = reports.write_result(Path(args.results_dir), args.obj, reports.run_name(run.ckpt, args.resize, args.nn),
                                record)
    print(f'results written to {path}')
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: evaluate(args), args.debug)


if __name__ == '__main__':
    main()
