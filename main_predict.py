"""Predict on new images: `python main_predict.py --model=bottle.safetensors --input=new_images/`.

Per image: the raw score (the maximum of the mult map), a normalised score (0.5 = the threshold), the
decision (anomalous when score >= threshold), the anomalous-area fraction and the map. With --model
nothing else is needed; without it, the evaluation flags (--obj, --data_root, --ckpt, ...) give the
memory bank (from the cache) and the thresholds are computed as main_export.py would.
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
    parser = cli.ArgumentParser(prog='main_predict.py', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    cli.add_run_args(parser)
    # With --model, its D and search apply unless these are given; None tells them apart.
    parser.set_defaults(D=None, nn=None)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    paths = prediction.find_inputs(args.input)
    out_dir = Path(args.out_dir).expanduser()
    check_writable(out_dir, 'output')
    device = cli.resolve_device(args.device)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
    if args.model:
        model = model_file.load_model(Path(args.model).expanduser(), args.D)
    else:
        args = argparse.Namespace(**{**vars(args), 'D': args.D or 64, 'nn': args.nn or 'exact'})
        model = export.build_model(args, outputs=((out_dir, 'output'),))
    nn = args.nn or model.nn
    loaded = time.perf_counter()
    with prediction.open_search(model, nn, cache_dir) as search:
        predictor = prediction.Predictor(model.encoder_module(device), search, model.thresholds, model.resize,
                                         device, args.batch_size)
        writer = prediction_outputs.PredictionWriter(out_dir, model.thresholds, prediction_outputs.output_names(paths),
                                                     not args.no_pictures, args.save_maps, args.save_masks)
        failed = 0
        looped = time.perf_counter()
        with tqdm(total=len(paths), desc='predict', unit='img', disable=None) as bar:
            for result in prediction.predict(predictor, paths):
                writer.add(result)
                if result.error:
                    failed += 1
                    tqdm.write(f'error: {result.error}', file=sys.stderr)
                bar.update()
        done = time.perf_counter()
    summary = {'model': {**model.info, 'file': args.model, 'D': model.D, 'resize': model.resize, 'nn': nn},
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
