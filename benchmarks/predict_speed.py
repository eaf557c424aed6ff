"""Prediction speed with a model file: images/s cold, warm, and with pictures, as a user runs main_predict.py.

    python benchmarks/predict_speed.py [--method patchsvdd|psdl|padim|patchcore|all] [--obj bottle]
                                       [--data_root ../shared/data/mvtec] [--ckpt ../shared/ckpts/bottle/enchier.pkl]
                                       [--nn exact] [--model FILE] [--n_images 0] [--normal_images 20]

1. Without an existing --model, exports one first (main_export.py, timed, with an empty cache: the method is
   fitted cold), scoring --normal_images training images with models that did not see them.
2. Predicts the class's test images (900x900 PNGs for bottle: reading and resizing included) with
   `main_predict.py --model` in a fresh process each time:
   - cold: empty search cache (an NGT index is built; the model file is read from disk);
   - warm: the same again (search index cached, files in the OS cache);
   - with pictures: warm, writing the heat-map pictures and index.html too.
   images/s = images / the process's wall time (start-up, model load and writing included); the
   predict loop's own rate (from the progress bar's total) is shown beside it.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, checkpoint_path, class_parser  # noqa: E402  (puts the repository on the path)
from codes.mvtecad import find_class  # noqa: E402


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(argv: list[str]) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, all threads) and stdout of a fresh process."""
    started, cpu = time.perf_counter(), child_cpu()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f'{" ".join(argv)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}')
    return wall, child_cpu() - cpu, proc.stdout


def main() -> None:
    parser = class_parser(__doc__)
    parser.add_argument('--method', default='patchsvdd',
                        help='patchsvdd, psdl, padim, patchcore, a comma list or all (default patchsvdd)')
    parser.add_argument('--nn', default='exact', help="Patch SVDD's search for export and predict (default exact)")
    parser.add_argument('--model', default=None, help='one method: the model file to use; exported there first if it '
                                                      'does not exist (default: a temporary one)')
    parser.add_argument('--n_images', type=int, default=0, help='predict only the first N test images (0: all)')
    parser.add_argument('--normal_images', type=int, default=20,
                        help='training images scored by models without them at export (default 20)')
    parser.add_argument('--search_cache', default=None,
                        help='a search cache that already holds the index: skips the cold run (default: a fresh one)')
    parser.add_argument('--batch_size', type=int, default=None, help="main_predict.py's --batch_size (default its own)")
    args = parser.parse_args()
    methods = ['patchsvdd', 'psdl', 'padim', 'patchcore'] if args.method == 'all' else args.method.split(',')
    files = find_class(Path(args.data_root), args.obj)
    images = [str(p) for p in files.test[:args.n_images or None]]
    summary = []
    for method in methods:
        with tempfile.TemporaryDirectory(prefix='predict-speed-') as tmp:
            summary.append(measure(args, method, images, Path(tmp)))
    if len(methods) > 1:
        print(f'## {args.obj}: every method exported and predicting\n')
        print('| method | model file MiB | export s (--normal_images ' + str(args.normal_images) + ') | '
              'predict images/s (process, --no_pictures) | images/s (predict loop) |')
        print('|---|---|---|---|---|')
        for method, size, export_s, rate, loop_rate in summary:
            print(f'| {method} | {size:.1f} | {export_s:.1f} | {rate:.2f} | {loop_rate:.2f} |')


def measure(args, method: str, images: list[str], tmp: Path) -> tuple:
    """One method: export (unless --model exists), then predict cold, warm and with pictures; prints its table."""
    rows = []
    model = Path(args.model) if args.model else tmp / f'{args.obj}-{method}.safetensors'
    export_s = float('nan')
    if not model.exists():
        argv = [str(REPO / 'main_export.py'), f'--obj={args.obj}', f'--data_root={args.data_root}', f'--method={method}',
                f'--normal_images={args.normal_images}', f'--cache_dir={tmp / "state_cache"}', '--device=cpu',
                f'--out={model}']
        if method == 'patchsvdd':
            argv += [f'--ckpt={checkpoint_path(args)}', f'--resize={args.resize}', f'--nn={args.nn}']
        export_s, cpu, out = timed_run(argv)
        print(out)
        rows.append(('export (fitted cold, training images scored held out, test set scored, thresholds)', export_s,
                     cpu, None, None, {}, None))
    base = [str(REPO / 'main_predict.py'), '--model', str(model), '--input', *images,
            f'--cache_dir={args.search_cache or tmp / "search_cache"}', '--device=cpu']
    if method == 'patchsvdd':
        base.append(f'--nn={args.nn}')
    if args.batch_size:
        base.append(f'--batch_size={args.batch_size}')
    runs = (('cold, --no_pictures', ['--no_pictures']), ('warm, --no_pictures', ['--no_pictures']),
            ('warm, with pictures', []))
    for name, extra in runs[1:] if args.search_cache else runs:
        wall, cpu, out = timed_run(base + [f'--out_dir={tmp / "out"}'] + extra)
        times = json.loads((tmp / 'out' / 'predictions.json').read_text())['times_s']
        rows.append((f'predict {len(images)} images, {name}', wall, cpu, len(images) / wall,
                     len(images) / times['predict'], times, out.splitlines()[0]))
    search = f'search {args.nn}, ' if method == 'patchsvdd' else ''
    print(f'## {args.obj}, {method}: predict with a model file ({search}2 CPU threads unless told; '
          f'model file {model.stat().st_size / 2 ** 20:.1f} MiB)\n')
    print('| run | wall s | CPU s | images/s (process) | images/s (predict loop) | model load s |')
    print('|---|---|---|---|---|---|')
    for name, wall, cpu, rate, loop_rate, times, _ in rows:
        cells = ['' if v is None else f'{v:.2f}' for v in (rate, loop_rate, times.get('model'))]
        print(f'| {name} | {wall:.1f} | {cpu:.1f} | ' + ' | '.join(cells) + ' |')
    load = os.getloadavg()
    verdict = ('above the core count: other processes shared the CPU and the wall times are inflated'
               if load[0] > (os.cpu_count() or 1) else 'not above the core count')
    print(f'\nload average (1, 5, 15 min) at the end: {", ".join(f"{v:.1f}" for v in load)} on {os.cpu_count()} '
          f'cores, {verdict}; CPU s is the processes\' own user + system time.')
    print('\n' + '\n'.join(f'{name}: {line}' for name, *_, line in rows if line) + '\n')
    warm = next(r for r in rows if r[0].endswith('warm, --no_pictures'))
    return method, model.stat().st_size / 2 ** 20, export_s, warm[3], warm[4]


if __name__ == '__main__':
    main()
