"""Prediction speed with a model file: images/s cold, warm, and with pictures, as a user runs main_predict.py.

    python benchmarks/predict_speed.py [--obj bottle] [--data_root ../shared/data/mvtec]
                                       [--ckpt ../shared/ckpts/bottle/enchier.pkl] [--nn exact]
                                       [--model FILE] [--n_images 0] [--normal_images 4]

1. Without an existing --model, exports one first (main_export.py, timed), scoring only --normal_images training
   images leave-one-out so that the export stays short with today's exact search.
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
    parser.add_argument('--nn', default='exact', help='search for export and predict (default exact)')
    parser.add_argument('--model', default=None, help='the model file to use; exported there first if it does not exist (default: a temporary one)')
    parser.add_argument('--n_images', type=int, default=0, help='predict only the first N test images (0: all)')
    parser.add_argument('--normal_images', type=int, default=4, help='training images scored leave-one-out at export')
    parser.add_argument('--search_cache', default=None,
                        help='a search cache that already holds the index: skips the cold run (default: a fresh one)')
    parser.add_argument('--batch_size', type=int, default=None, help="main_predict.py's --batch_size (default its own)")
    args = parser.parse_args()
    files = find_class(Path(args.data_root), args.obj)
    images = [str(p) for p in files.test[:args.n_images or None]]
    with tempfile.TemporaryDirectory(prefix='predict-speed-') as tmp:
        tmp = Path(tmp)
        rows = []
        model = Path(args.model) if args.model else tmp / f'{args.obj}.safetensors'
        if not model.exists():
            wall, cpu, out = timed_run([str(REPO / 'main_export.py'), f'--obj={args.obj}', f'--data_root={args.data_root}',
                                   f'--ckpt={checkpoint_path(args)}', f'--resize={args.resize}', f'--nn={args.nn}',
                                   f'--normal_images={args.normal_images}', f'--cache_dir={tmp / "bank_cache"}',
                                   '--device=cpu', f'--out={model}'])
            print(out)
            rows.append(('export (bank embedded, test set scored, thresholds)', wall, cpu, None, None, {}, None))
        base = [str(REPO / 'main_predict.py'), '--model', str(model), '--input', *images, f'--nn={args.nn}',
                f'--cache_dir={args.search_cache or tmp / "search_cache"}', '--device=cpu']
        if args.batch_size:
            base.append(f'--batch_size={args.batch_size}')
        runs = (('cold, --no_pictures', ['--no_pictures']), ('warm, --no_pictures', ['--no_pictures']),
                ('warm, with pictures', []))
        for name, extra in runs[1:] if args.search_cache else runs:
            wall, cpu, out = timed_run(base + [f'--out_dir={tmp / "out"}'] + extra)
            times = json.loads((tmp / 'out' / 'predictions.json').read_text())['times_s']
            rows.append((f'predict {len(images)} images, {name}', wall, cpu, len(images) / wall,
                         len(images) / times['predict'], times, out.splitlines()[0]))
    print(f'## {args.obj}: predict with a model file (search {args.nn}, 2 CPU threads unless told)\n')
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
    print('\n' + '\n'.join(f'{name}: {line}' for name, *_, line in rows if line))


if __name__ == '__main__':
    main()
