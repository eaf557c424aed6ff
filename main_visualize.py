"""Write anomaly-map pictures for a class's test images: `python main_visualize.py --obj=bottle`
(`--method psdl|padim|patchcore` for the methods on a pre-trained backbone; `--method all` or a comma list
for one panel per image with every method's map; `--obj` a comma list or all)."""
from __future__ import annotations

import argparse
from pathlib import Path

from codes import cli, inspection, runs, visualization
from codes.methods import TITLES, patchsvdd
from codes.methods.backbone import run_method
from codes.errors import UserError
from codes.visualization import MethodMaps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_visualize.py', description=__doc__, examples=(
        'python main_visualize.py --obj=bottle --data_root=/data/mvtec --ckpt=ckpts/bottle/enchier.pkl',
        'python main_visualize.py --obj=bottle --data_root=/data/mvtec --method=patchcore',
        'python main_visualize.py --obj=bottle --data_root=/data/mvtec --ckpt_dir=ckpts --method=all'))
    cli.add_data_args(parser, obj_help='class name, comma list of names, or all (default bottle)')
    cli.add_checkpoint_args(parser)
    cli.add_search_args(parser)
    parser.add_argument('--out_dir', default=None, help='output folder (default anomaly_maps/<obj>; with several '
                                                        'classes <out_dir>/<obj>)')
    parser.add_argument('--normalize', choices=visualization.NORMALIZATIONS, default='test_set',
                        help='colour scale: one for the whole test set (default) or per image')
    cli.add_method_args(parser, several=True)
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def method_maps(args: argparse.Namespace, out_dir: Path) -> MethodMaps:
    """One method's maps and image scores on args.obj's test images (the method's own image score)."""
    if args.method != 'patchsvdd':
        result, data, _, _ = run_method(args, outputs=((out_dir, 'output'),))
        return MethodMaps(result.method, data, result.maps, result.image_scores)
    prepared = patchsvdd.prepare(args, outputs=((out_dir, 'output'),))
    result = inspection.anomaly_maps(prepared.enc, prepared.bank, prepared.data.test, args.nn, prepared.device,
                                     args.batch_size, args.nn_eps)
    mult = result.maps['mult']
    return MethodMaps('patchsvdd', prepared.data, mult, mult.max(axis=(1, 2)))


def visualize_one(args: argparse.Namespace, out_dir: Path) -> None:
    names = cli.methods_of(args)
    results = [method_maps(one, out_dir) for one in runs.method_runs(args, args.obj)]
    if not results:
        raise UserError(f'no method could run on {args.obj}')
    if len(names) == 1:
        r = results[0]
        written = visualization.save_all(r.data, r.maps, out_dir, args.normalize,
                                         'mult map' if r.method == 'patchsvdd' else f'{r.method} map', r.scores,
                                         TITLES[r.method])
    else:
        written = visualization.save_comparison(results, out_dir, args.normalize)
    figures = ''.join(f'{f.name}, ' for f in written['figures'])
    print(f'{len(written["panels"])} panels, {figures}index.html written to {out_dir}')
    print(f'open {written["index"]} in a browser')


def run(args: argparse.Namespace) -> None:
    if not runs.several_classes(args):
        visualize_one(args, Path(args.out_dir) if args.out_dir else Path('anomaly_maps') / args.obj)
        return
    present = runs.classes(args)
    base = Path(args.out_dir or 'anomaly_maps')
    _, failed = runs.each([(obj, argparse.Namespace(**{**vars(args), 'obj': obj})) for obj in present],
                          lambda one: visualize_one(one, base / one.obj))
    runs.check_failures(failed, len(present), 'classes')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
