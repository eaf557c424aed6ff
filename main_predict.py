"""Predict on new images: `python main_predict.py --model=bottle.safetensors --input=new_images/`.

Per image: the raw score (the method's image score: for Patch SVDD the maximum of the mult map), a
normalised score (0.5 = the threshold), the decision (anomalous when score >= threshold), the
anomalous-area fraction and the map. With --model (of any method) nothing else is needed; without it,
the evaluation flags (--obj, --data_root, --ckpt, --method, ...) give the fitted state (from the cache)
and the thresholds are computed as main_export.py would.
Exit status: 0 all images predicted, 1 some could not be read (see their rows), 2 a usage error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from codes import cli, export, model_file, prediction, prediction_outputs
from codes.errors import UserError
from codes.files import check_writable
from codes.state_cache import cache_dir_for


class SomeImagesFailed(UserError):
    """Some inputs could not be predicted; the others were: exit status 1."""
    exit_code = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_predict.py', description=__doc__, examples=(
        'python main_predict.py --model=bottle.safetensors --input=new_images/',
        'python main_predict.py --model=bottle.safetensors --input="line3/**/*.png" --no_pictures --save_maps=npy',
        'python main_predict.py --obj=bottle --data_root=/data/mvtec --input=new_images/    # no model file'))
    parser.add_argument('--input', nargs='+', required=True,
                        help='image files, folders (searched recursively) or globs (quote them: "imgs/**/*.png")')
    parser.add_argument('--model', default=None, help='a model file from main_export.py; then nothing else is needed')
    parser.add_argument('--out_dir', default='predictions', help='output folder (default predictions)')
    parser.add_argument('--save_maps', choices=prediction_outputs.MAP_FORMATS, default=None,
                        help='also write each raw map: npy or tiff (float32, raw values) or png16 (16-bit, '
                             'normalised: 32768 = threshold)')
    parser.add_argument('--save_masks', action='store_true', help='also write the anomalous pixels as binary PNG masks')
    parser.add_argument('--no_pictures', action='store_true', help='no heat-map pictures (faster)')
    cli.add_data_args(parser)
    cli.add_checkpoint_args(parser)
    # Larger batches than evaluation's: a search call has a fixed cost (opening an index) to spread.
    cli.add_search_args(parser, batch_size=32, batch_help='images read, embedded and searched together')
    cli.add_threshold_args(parser)
    cli.add_method_args(parser)
    cli.add_run_args(parser)
    # With --model, its D, search and method apply unless these are given; None tells them apart.
    parser.set_defaults(D=None, nn=None, **{k: None for k in cli.METHOD_DEFAULTS})
    return parser.parse_args(argv)


def check_method_flags(args: argparse.Namespace, model: model_file.Model) -> None:
    """A model file fixes its method and settings: a method flag beside --model is a mistake, said in one line."""
    if args.method is not None and args.method != model.method:
        raise UserError(f'--method {args.method} but {args.model} holds a {model.method} model: drop --method')
    given = [k for k in cli.METHOD_DEFAULTS if k != 'method' and getattr(args, k) is not None]
    if given:
        raise UserError(f'--{given[0]} is fixed by the model file {args.model} (a {model.method} model): drop it, '
                        'or export another model with it')


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    paths = prediction.find_inputs(args.input)
    out_dir = Path(args.out_dir).expanduser()
    check_writable(out_dir, 'output')
    device = cli.resolve_device(args.device)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
    if args.model:
        model = model_file.load_model(Path(args.model).expanduser(), args.D)
        check_method_flags(args, model)
    else:
        defaults = {k: v for k, v in cli.METHOD_DEFAULTS.items() if getattr(args, k) is None}
        args = argparse.Namespace(**{**vars(args), **defaults, 'D': args.D or 64, 'nn': args.nn or 'exact'})
        model = export.build_model(args, outputs=((out_dir, 'output'),))
    nn = (args.nn or model.nn) if model.method == 'patchsvdd' else 'exact'
    loaded = time.perf_counter()
    with prediction.open_detector(model, device, args.batch_size, nn, cache_dir) as detector:
        writer = prediction_outputs.PredictionWriter(out_dir, model.thresholds, prediction_outputs.output_names(paths),
                                                     not args.no_pictures, args.save_maps, args.save_masks)
        failed = 0
        looped = time.perf_counter()
        with tqdm(total=len(paths), desc='predict', unit='img', disable=None) as bar:
            for result in prediction.predict(detector, paths):
                writer.add(result)
                if result.error:
                    failed += 1
                    tqdm.write(f'error: {result.error}', file=sys.stderr)
                bar.update()
        done = time.perf_counter()
    summary = {'model': {**model.info, 'file': args.model, 'method': model.method, 'settings': model.settings,
                         'preprocessing': model.preprocessing, 'resize': model.resize, 'nn': nn,
                         **({'D': model.D} if model.method == 'patchsvdd' else {})},
               'thresholds': model.thresholds.to_dict(),
               'decision_rule': 'anomalous when score >= thresholds.image; a pixel is anomalous when its map '
                                'value >= thresholds.pixel',
               'n_images': len(paths), 'n_failed': failed,
               'times_s': {'model': round(loaded - started, 3), 'search_setup': round(looped - loaded, 3),
                           'predict': round(done - looped, 3)}}
    written = writer.finish(summary)
    n_anomalous = sum(r['decision'] == 'anomalous' for r in writer.rows)
    print(f'{len(paths) - failed} images predicted: {n_anomalous} anomalous (score >= {model.thresholds.image:.6g}), '
          f'{len(paths) - failed - n_anomalous} normal{f"; {failed} failed" if failed else ""}')
    print(f'written to {out_dir}: {written["csv"].name}, {written["json"].name}, {written["html"].name}')
    if failed:
        raise SomeImagesFailed(f'{failed} of {len(paths)} images could not be read; see their rows in '
                               f'{written["csv"]}')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
