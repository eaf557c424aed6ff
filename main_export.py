"""Export a portable model file for prediction: `python main_export.py --obj=bottle --out=bottle.safetensors`.

From a class's images (the same flags as main_evaluate.py) it writes one file with the network's weights,
the method's fitted state (Patch SVDD's memory bank, or with --method psdl / padim / patchcore that
method's), the decision thresholds and the normalisation; main_predict.py --model then needs nothing else.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from codes import cli, export, model_file, thresholds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_export.py', description=__doc__, examples=(
        'python main_export.py --obj=bottle --data_root=/data/mvtec --ckpt=ckpts/bottle/enchier.pkl '
        '--model=bottle.safetensors',
        'python main_export.py --obj=bottle --data_root=/data/mvtec --method=patchcore --model=bottle-patchcore.safetensors',
        'python main_export.py --obj=my_line --data_root=/data/lines --epochs=300 --threshold_from=normal '
        '--model=my_line.safetensors'))
    parser.add_argument('--model', dest='out', default=None, help='the model file to write, e.g. bottle.safetensors')
    cli.add_alias(parser, '--out', 'out')
    cli.add_data_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_search_args(parser)
    cli.add_threshold_args(parser)
    cli.add_method_args(parser)
    cli.add_run_args(parser)
    args = parser.parse_args(argv)
    if args.out is None:
        parser.error('the following arguments are required: --model (the model file to write)')
    return args


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).expanduser()
    model_file.check_output(out)
    model = export.build_model(args, outputs=((out.parent, 'model'),))
    model_file.save_model(model, out)
    info = model.info
    how = f'search {model.nn}' if model.method == 'patchsvdd' else f'{model.method} on {model.settings["backbone"]}'
    print(f'{info["obj"]}: {info["n_train"]} training images ({info["n_normal_scored"]} scored by models without them: '
          f'{info["normal_scores"]}), {info["n_test"]} test images ({info["n_defective"]} defective'
          f'{", with masks" if info["has_masks"] else ""}), {how}')
    print(thresholds.describe(model.thresholds))
    print(f'model written to {out} ({out.stat().st_size / 2 ** 20:.1f} MiB, {info["export_seconds"]:.0f} s)')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
