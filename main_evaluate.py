"""Evaluate Patch SVDD encoders: `python main_evaluate.py --obj=bottle --epochs=300`,
or a method on a pre-trained backbone: `python main_evaluate.py --obj=bottle --method=psdl`.

--obj takes one class, a comma list, or `all` (the 15 MVTec AD classes found under the data root);
--method one method, a comma list, or `all` (one table of method x metrics and times at the end).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from codes import cli, inspection, metrics, mvtecad, reports, runs
from codes.methods import patchsvdd
from codes.methods.backbone import run_method
from codes.checkpoints import file_sha256
from codes.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_evaluate.py', description=__doc__, examples=(
        'python main_evaluate.py --obj=bottle --data_root=/data/mvtec --ckpt=ckpts/bottle/enchier.pkl',
        'python main_evaluate.py --obj=bottle --data_root=/data/mvtec --epochs=300    # main_train.py\'s checkpoint',
        'python main_evaluate.py --obj=all --data_root=/data/mvtec --ckpt_dir=ckpts --method=all'))
    cli.add_data_args(parser, obj_help='class name, comma list of names, or all (default bottle)')
    cli.add_checkpoint_args(parser)
    cli.add_search_args(parser)
    parser.add_argument('--out_dir', dest='results_dir', default='results',
                        help='where result files go (default results)')
    cli.add_alias(parser, '--results_dir', 'results_dir')
    parser.add_argument('--save_maps', action='store_true',
                        help='also write the four 256x256 maps, labels and mask paths to results/<obj>/<run>_maps.npz')
    cli.add_method_args(parser, several=True)
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def evaluate_method(args: argparse.Namespace) -> dict:
    """Evaluates args.obj with --method psdl / padim / patchcore: the result line, the metrics block, the files."""
    started = time.perf_counter()
    results_dir = Path(args.results_dir)
    result, data, backbone, inputs = run_method(args, outputs=((results_dir / args.obj, 'results'),))
    device, files = inputs.device, inputs.files
    print(reports.result_line({result.method: (result.metrics['det'], result.metrics['seg'])}, args.obj))
    print(reports.metrics_block({result.method: result.metrics}, metrics.undefined_metrics(files.labels, files.masks)))
    detail = {'psdl': f'{args.psdl_type}' + (f'-{args.layer}' if args.psdl_type == 'single' else '')
              + ('-pooled' if args.pool_classes else ''),
              'padim': f'd{args.padim_d}' if args.padim_d else '',
              'patchcore': f'coreset{args.coreset_ratio:g}'}[result.method]
    settings = {'backbone': backbone.name, 'backbone_weights': str(backbone.path), 'backbone_sha256': backbone.sha256,
                'resize': result.method_resize, 'image_size': mvtecad.CROP_SIZE, 'device': str(device),
                'data_root': str(files.folder.parent), 'fitted_state': result.state_source,
                'n_train': result.n_train, 'n_test': len(files.test), 'has_masks': files.masks is not None,
                **result.settings}
    if result.method == 'patchcore':
        settings['nn'] = 'exact'
    record = {'obj': args.obj, 'method': result.method,
              'aurocs': {'det': result.metrics['det'], 'seg': result.metrics['seg']},
              'metrics': {result.method: result.metrics}, 'settings': settings,
              'times_s': {**result.times, 'total': time.perf_counter() - started}}
    name = reports.method_run_name(result.method, backbone.name, detail)
    return write(args, name, record, {result.method: result.maps}, result.image_scores, files)


def write(args: argparse.Namespace, name: str, record: dict, maps: dict[str, np.ndarray], image_scores: np.ndarray,
          files: mvtecad.ClassFiles) -> dict:
    """The result files of one run: <out_dir>/<obj>/<name>.json, a summary.csv row and, with --save_maps,
    the maps beside them."""
    results_dir = Path(args.results_dir)
    if args.save_maps:
        maps_path = results_dir / args.obj / f'{name}_maps.npz'
        reports.save_maps(maps_path, maps, image_scores, files.labels, files.test, files.masks)
        record['maps_npz'] = str(maps_path)
        print(f'maps written to {maps_path}')
    path = reports.write_result(results_dir, args.obj, name, record)
    print(f'results written to {path}')
    return record


def evaluate_one(args: argparse.Namespace) -> dict:
    """Evaluates args.obj: prints the original's line and the further metrics, writes the result files."""
    if args.method != 'patchsvdd':
        return evaluate_method(args)
    started = time.perf_counter()
    results_dir = Path(args.results_dir)
    run = patchsvdd.prepare(args, outputs=((results_dir / args.obj, 'results'),))
    result = inspection.evaluate(run.enc, run.bank, run.data, args.nn, run.device, args.batch_size, args.nn_eps)
    print(inspection.result_line(result.aurocs, args.obj) + reports.search_note(args.nn, args.nn_eps))
    files = run.data.files
    print(reports.metrics_block(result.metrics, metrics.undefined_metrics(files.labels, files.masks)))
    record = {
        'obj': args.obj,
        'aurocs': result.aurocs,
        'metrics': result.metrics,
        'settings': {'resize': args.resize, 'nn': args.nn, **({'nn_eps': args.nn_eps} if args.nn == 'approx' else {}),
                     'D': args.D, 'device': str(run.device),
                     'data_root': str(files.folder.parent), 'checkpoint': str(run.ckpt),
                     'checkpoint_sha256': file_sha256(run.ckpt), 'memory_bank': run.bank_source,
                     'n_train': len(files.train), 'n_test': len(files.test), 'has_masks': files.masks is not None},
        'times_s': {**run.times, **result.times, 'total': time.perf_counter() - started},
    }
    name = reports.run_name(run.ckpt, args.resize, args.nn + (f'{args.nn_eps:g}' if args.nn == 'approx' else ''))
    return write(args, name, record, result.maps, result.maps['mult'].max(axis=(1, 2)), files)


def run(args: argparse.Namespace) -> None:
    methods = cli.methods_of(args)
    if not runs.several_classes(args) and len(methods) == 1:
        evaluate_one(args)
        return
    if args.ckpt and runs.several_classes(args) and 'patchsvdd' in methods:
        raise UserError('--ckpt names one checkpoint; for several classes use --ckpt_dir (holding <obj>/enchier.pkl) '
                        'or --epochs')
    present = runs.classes(args)
    todo = [(f'{obj} {one.method}' if len(methods) > 1 else obj, one)
            for obj in present for one in runs.method_runs(args, obj)]
    records, failed = runs.each(todo, evaluate_one)
    if records:
        print()
        print(reports.method_table(records, times=True) if len(methods) > 1 else reports.markdown_table(records))
    runs.check_failures(failed, len(present) * len(methods), 'runs' if len(methods) > 1 else 'classes')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
