"""Every method on larger classes, cold: seconds per stage and peak memory, as a user's run takes them.

    python benchmarks/scale.py                                    # the four methods, 209/400/800 images + commutator
    python benchmarks/scale.py --methods padim --sizes 209 --classes copies
    python benchmarks/scale.py --methods patchsvdd --classes commutator --nn approx

Cells: each method of --methods (patchsvdd with the authors' bottle encoder, --ckpt; psdl, padim and
patchcore with the default backbone) on each class of --classes:
- `copies`: for each N of --sizes, a class of N training images, bottle's own and transformed copies of
  them (flips, crops, shifts: benchmarks/nn_search.py's, written as PNGs at the original size), with
  bottle's 83 test images and masks, in MVTec layout in a temporary folder;
- any other name: that class under one of the data roots (../shared/data/<root>/<name>, e.g. commutator).
Each cell is `main_evaluate.py --method M --no_cache` in a fresh process: the stages are the `times_s` of
its result JSON (`total` includes the imports), `wall` is the process's, and `peak GiB` its own peak
resident memory (VmHWM, read by the process itself as it exits).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from common import REPO, SHARED  # noqa: E402  (puts the repository on the path)
from nn_search import variant  # noqa: E402

METHODS = ('patchsvdd', 'psdl', 'padim', 'patchcore')
# the child reports its own high-water mark: a fork's ru_maxrss could include this process's memory
PRELUDE = ('import atexit, runpy, sys\n'
           'def peak():\n'
           '    for line in open("/proc/self/status"):\n'
           '        if line.startswith("VmHWM:"):\n'
           '            print(f"PEAK_KIB {line.split()[1]}", file=sys.stderr, flush=True)\n'
           'atexit.register(peak)\n'
           'sys.argv = sys.argv[1:]\n'
           'runpy.run_path(sys.argv[0], run_name="__main__")\n')


def write_copies(source: Path, pool: Path, n: int) -> list[Path]:
    """`n` training images in `pool`: bottle's own (copy 0), then transformed copies of each in turn."""
    originals = sorted((source / 'train' / 'good').glob('*.png'))
    pool.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> Path:
        path = pool / f'{i // len(originals):02d}_{originals[i % len(originals)].name}'
        if not path.exists():
            image = np.asarray(Image.open(originals[i % len(originals)]))
            Image.fromarray(np.ascontiguousarray(variant(image, i // len(originals)))).save(path, compress_level=1)
        return path

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool_threads:
        return list(pool_threads.map(one, range(n)))


def copies_class(root: Path, source: Path, images: list[Path], name: str) -> None:
    """root/name in MVTec layout: train/good links to `images`; test and ground_truth link to the source's."""
    folder = root / name
    (folder / 'train' / 'good').mkdir(parents=True)
    for path in images:
        (folder / 'train' / 'good' / path.name).symlink_to(path)
    for part in ('test', 'ground_truth'):
        (folder / part).symlink_to(source / part, target_is_directory=True)


def find_root(name: str) -> Path:
    """The data root holding class `name` (../shared/data/*/name)."""
    for root in sorted((SHARED / 'data').iterdir()):
        if (root / name / 'train' / 'good').is_dir():
            return root
    raise SystemExit(f'class {name!r} not found under {SHARED / "data"}/*/')


def run_cell(method: str, obj: str, data_root: Path, args: argparse.Namespace, results: Path) -> dict:
    command = [sys.executable, '-c', PRELUDE, str(REPO / 'main_evaluate.py'), f'--method={method}', f'--obj={obj}',
               f'--data_root={data_root}', f'--results_dir={results}', '--no_cache']
    if method == 'patchsvdd':
        command += [f'--ckpt={args.ckpt}', f'--nn={args.nn}'] + ([f'--nn_eps={args.nn_eps}'] if args.nn_eps else [])
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f'{method} on {obj} failed:\n{proc.stderr.strip()[-2000:]}')
    record = json.loads(sorted((results / obj).glob('*.json'), key=lambda p: p.stat().st_mtime)[-1].read_text())
    peaks = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith('PEAK_KIB ')]
    record.update(wall=wall, peak_gib=peaks[-1] / 2 ** 20 if peaks else float('nan'),
                  line=proc.stdout.splitlines()[0] if proc.stdout else '')
    return record


def method_metrics(record: dict) -> dict:
    """The record's main map's metrics (Patch SVDD's: the multi-scale map)."""
    m = record['metrics']
    return m[record['method']] if 'method' in record else m.get('mult', next(iter(m.values())))


def print_table(method: str, cells: list[tuple[str, dict]]) -> None:
    stages: list[str] = []
    for _, r in cells:
        stages += [s for s in r['times_s'] if s != 'total' and s not in stages]
    print(f'\n### {method}: seconds per stage, cold (--no_cache)\n')
    print('| stage | ' + ' | '.join(label for label, _ in cells) + ' |')
    print('|---|' + '---|' * len(cells))
    for stage in stages + ['total']:
        print(f'| {stage} | ' + ' | '.join(f'{r["times_s"][stage]:.1f}' if stage in r['times_s'] else ''
                                           for _, r in cells) + ' |')
    print('| wall (process) | ' + ' | '.join(f'{r["wall"]:.1f}' for _, r in cells) + ' |')
    print('| peak GiB | ' + ' | '.join(f'{r["peak_gib"]:.2f}' for _, r in cells) + ' |')
    for key, name in (('det', 'Det'), ('seg', 'Seg'), ('aupro', 'AUPRO')):
        values = [method_metrics(r).get(key) for _, r in cells]
        print(f'| {name} | ' + ' | '.join('n/a' if v is None else f'{100 * v:.1f}' for v in values) + ' |')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--methods', default=','.join(METHODS), help=f'comma list of {", ".join(METHODS)}')
    parser.add_argument('--sizes', default='209,400,800', help='training images of the `copies` classes')
    parser.add_argument('--classes', default='copies,commutator',
                        help='comma list: copies (bottle copies at --sizes) and class names under ../shared/data/*/')
    parser.add_argument('--source', default=str(SHARED / 'data' / 'mvtec' / 'bottle'), help='class the copies are of')
    parser.add_argument('--ckpt', default=str(SHARED / 'ckpts' / 'bottle' / 'enchier.pkl'),
                        help="patchsvdd's encoder (default the authors' bottle encoder, for every class)")
    parser.add_argument('--nn', default='exact', help="patchsvdd's --nn")
    parser.add_argument('--nn_eps', default=None, help="patchsvdd's --nn_eps (with --nn approx)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(',') if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f'unknown methods: {", ".join(sorted(unknown))}')
    sizes = [int(s) for s in args.sizes.split(',') if s]
    source = Path(args.source)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes: list[tuple[str, str, Path]] = []        # (label, obj, data root)
        for name in args.classes.split(','):
            if name == 'copies':
                print(f'writing {max(sizes)} training images ({source.name} and copies)...', flush=True)
                images = write_copies(source, tmp / 'pool', max(sizes))
                for n in sizes:
                    copies_class(tmp / 'data', source, images[:n], f'{source.name}{n}')
                    classes.append((f'{n} images', f'{source.name}{n}', tmp / 'data'))
            elif name:
                classes.append((name, name, find_root(name)))
        for method in methods:
            cells = []
            for label, obj, root in classes:
                print(f'{method} on {label}...', flush=True)
                record = run_cell(method, obj, root, args, tmp / 'results')
                print(f'  {record["line"]}  total {record["times_s"]["total"]:.1f} s, peak {record["peak_gib"]:.2f} GiB',
                      flush=True)
                cells.append((label, record))
            print_table(method, cells)
    nn = f', patchsvdd --nn {args.nn}' + (f' --nn_eps {args.nn_eps}' if args.nn_eps else '') if 'patchsvdd' in methods else ''
    print(f'\ncopies of {source.name} with its {source.name} test images; {os.cpu_count()} CPUs{nn}')


if __name__ == '__main__':
    main()
