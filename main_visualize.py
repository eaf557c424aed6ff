"""Write anomaly-map pictures for a class's test images: `python main_visualize.py --obj=bottle`
(`--method psdl|padim|patchcore` for the methods on a pre-trained backbone)."""
from __future__ import annotations

import argparse
from pathlib import Path

from codes import cli, inspection, methods, mvtecad, visualization


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_visualize.py', description=__doc__)
    cli.add_data_args(parser)
    cli.add_checkpoint_args(parser)
    cli.add_search_args(parser)
    parser.add_argument('--out_dir', default=None, help='output folder (default anomaly_maps/<obj>)')
    parser.add_argument('--normalize', choices=visualization.NORMALIZATIONS, default='test_set',
                        help='colour scale: one for the whole test set (default) or per image')
    cli.add_method_args(parser)
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    out_dir = Path(args.out_dir) if args.out_dir else Path('anomaly_maps') / args.obj
    if args.method != 'patchsvdd':
        device = cli.resolve_device(args.device)
        files = mvtecad.find_class(mvtecad.resolve_data_root(args.data_root), args.obj)
        result, data, _ = methods.run_method(args, files, device, outputs=((out_dir, 'output'),))
        written = visualization.save_all(data, result.maps, out_dir, args.normalize, f'{result.method} map')
        print(f'{len(written["panels"])} panels, {", ".join(f.name for f in written["figures"])} and index.html '
              f'written to {out_dir}')
        print(f'open {written["index"]} in a browser')
        return
    prepared = cli.prepare(args, outputs=((out_dir, 'output'),))
    result = inspection.anomaly_maps(prepared.enc, prepared.bank, prepared.data.test, args.nn, prepared.device,
                                     args.batch_size)
    written = visualization.save_all(prepared.data, result.maps['mult'], out_dir, args.normalize)
    print(f'{len(written["panels"])} panels, {", ".join(f.name for f in written["figures"])} and index.html '
          f'written to {out_dir}')
    print(f'open {written["index"]} in a browser')


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
