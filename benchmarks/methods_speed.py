"""PSDL, PaDiM and PatchCore on one class, cold (nothing cached) and cached: metrics and seconds per stage.

    python benchmarks/methods_speed.py [--obj bottle] [--data_root ../shared/data/mvtec]
                                       [--methods psdl,padim,patchcore] [--backbone efficientnet_lite0]
                                       [--threads N]

Each method runs as `main_evaluate.py --method M --no_cache` would, in a fresh process (imports
included in `total`), then (unless `--cold_only`) twice with a state cache, the second reading the
fitted state (the `cached` columns).
`--threads` sets torch's thread count in those processes (default: torch's own choice).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, class_parser  # noqa: E402  (puts the repository on the path)

STAGES = ('load_backbone', 'load_test', 'cache_key', 'load_train', 'features_train', 'fit', 'state',
          'features_test', 'score', 'metrics')


def run(method: str, args, results: Path, cache: Path | None) -> dict:
    command = [sys.executable, str(REPO / 'main_evaluate.py'), f'--method={method}', f'--obj={args.obj}',
               f'--data_root={args.data_root}', f'--backbone={args.backbone}', f'--results_dir={results}']
    command += [f'--cache_dir={cache}'] if cache else ['--no_cache']
    if args.backbone_weights:
        command.append(f'--backbone_weights={args.backbone_weights}')
    env = dict(os.environ)
    prelude = f'import torch; torch.set_num_threads({args.threads}); ' if args.threads else ''
    if prelude:
        command = [sys.executable, '-c', prelude + 'import runpy, sys; sys.argv = sys.argv[1:]; '
                   'runpy.run_path(sys.argv[0], run_name="__main__")'] + command[1:]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f'{method} failed: {proc.stderr.strip()[-500:]}')
    path = sorted((results / args.obj).glob(f'*_{method}_*.json'))[-1]
    record = json.loads(path.read_text())
    record['wall'] = wall
    record['line'] = proc.stdout.splitlines()[0]
    return record


def main() -> None:
    parser = class_parser(__doc__)
    parser.add_argument('--methods', default='psdl,padim,patchcore')
    parser.add_argument('--backbone', default='efficientnet_lite0')
    parser.add_argument('--backbone_weights', default=None)
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--cold_only', action='store_true', help='skip the cached runs')
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(','):
            cold = run(method, args, Path(tmp) / 'cold', None)
            cached = None
            if not args.cold_only:
                run(method, args, Path(tmp) / 'warm', Path(tmp) / 'cache')          # fills the cache
                cached = run(method, args, Path(tmp) / 'warm', Path(tmp) / 'cache')
            rows.append((method, cold, cached))
            print(cold['line'], flush=True)
    print(f'\n{args.obj}, backbone {args.backbone}, torch threads {args.threads or "default"}: seconds per stage')
    runs = [(f'{m} cold', cold) for m, cold, _ in rows]
    if not args.cold_only:
        runs = [run for (m, cold, cached) in rows for run in ((f'{m} cold', cold), (f'{m} cached', cached))]
    print('| stage | ' + ' | '.join(name for name, _ in runs) + ' |')
    print('|---|' + '---|' * len(runs))
    for stage in STAGES + ('total',):
        print(f'| {stage} | ' + ' | '.join(f'{r["times_s"].get(stage, 0):.1f}' for _, r in runs) + ' |')
    print('| wall (process) | ' + ' | '.join(f'{r["wall"]:.1f}' for _, r in runs) + ' |')
    print('\n| method | Det | Seg | AUPRO | pixel AP | F1-max |\n|---|---|---|---|---|---|')
    for method, cold, _ in rows:
        m = cold['metrics'][method]
        print(f'| {method} | ' + ' | '.join('n/a' if m[k] is None else f'{100 * m[k]:.1f}'
                                            for k in ('det', 'seg', 'aupro', 'pixel_ap', 'f1_max')) + ' |')


if __name__ == '__main__':
    main()
