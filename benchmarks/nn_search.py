"""K=32 nearest-neighbour search: build and query seconds, peak memory and recall@1 against brute force.

    python benchmarks/nn_search.py                               # the class (bottle): exact, NGT batch
    python benchmarks/nn_search.py --methods exact,ngt,ngt_single,brute
    python benchmarks/nn_search.py --sizes 100,200,400,800,1600  # banks of that many training images
    python benchmarks/nn_search.py --methods exact,approx --data_root ../shared/data/kolektor --obj commutator \
        --ckpt ../shared/ckpts/bottle/enchier.pkl               # exact vs certified approx (--nn_eps, 0.01)

With --sizes, the banks are made of the class's real training images and transformed copies of them
(flips, shifts, crops: no two alike), embedded by the class's encoder; every test patch of the class
is queried; recall@1 is measured against float64 brute force on a sample of queries (exact must be
1.0). Each search runs in a child process, so its peak memory (max RSS) is its own. A last row
searches the bank of a barely trained encoder (codes nearly constant; NGT's build took ~350 s there).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import checkpoint_path, class_parser  # noqa: E402  (puts the repository on the path)
from codes import inspection, mvtecad  # noqa: E402
from codes.allocator import keep_freed_memory  # noqa: E402
from codes.checkpoints import load_encoder  # noqa: E402
from codes.embeddings import embed_images  # noqa: E402
from codes.memory_bank import build_bank  # noqa: E402
from codes.nearest_neighbor import NGTSearch, as_rows, distances_to, make_search, nearest_distances  # noqa: E402
from codes.networks import EncoderHier  # noqa: E402

RECALL_SAMPLE = 500
EPS = [0.01]     # approx's eps (--nn_eps), set once from the command line (children get it on theirs)


def ngt_single(queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, float, float]:
    """The original's loop: per patch one search(), one get_object() and a NumPy norm."""
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        index = NGTSearch.build(bank, Path(folder) / 'single')
        built = time.perf_counter() - t
        ids = np.empty(len(queries), np.int64)
        for k, q in enumerate(queries):
            ids[k] = index.search(q, 1)[0][0]
            np.linalg.norm(q - np.asarray(index.get_object(int(ids[k])), np.float32))   # the original's distance
        return ids, built, time.perf_counter() - t - built


def timed_search(method: str, queries: np.ndarray, bank: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(ids, build s, query s) of one method."""
    if method == 'ngt_single':
        return ngt_single(queries, bank)
    t = time.perf_counter()
    search = make_search(method, eps=EPS[0]).fit(bank)
    built = time.perf_counter() - t
    ids = search.nearest_ids(queries)
    return ids, built, time.perf_counter() - t - built


def peak_kib() -> int:
    """This process's peak resident memory (VmHWM, kB): its own, from its exec on."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1])
    raise RuntimeError('no VmHWM in /proc/self/status')


def child(bank_file: str, n_rows: int, method: str, query_file: str, out_file: str) -> None:
    """One search in this process (for its own peak memory): writes the distances and the times."""
    keep_freed_memory()      # as the entry scripts do (codes/cli.py run)
    with open(bank_file, 'rb') as f:      # read the rows, not mapped: a mapping would count in the peak memory
        np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        bank = np.fromfile(f, dtype=dtype, count=n_rows * shape[1]).reshape(n_rows, shape[1])
    queries = np.load(query_file)
    ids, built, queried = timed_search(method, queries, bank)
    np.save(out_file, distances_to(queries, bank, ids))
    print(json.dumps({'build': built, 'query': queried, 'peak_kib': peak_kib()}))


def run_child(bank_file: Path, n_rows: int, method: str, query_file: Path, folder: Path) -> dict:
    out = folder / f'd_{method}_{n_rows}.npy'
    proc = subprocess.Popen([sys.executable, __file__, '--child', str(bank_file), str(n_rows), method,
                             str(query_file), str(out), str(EPS[0])], stdout=subprocess.PIPE, text=True)
    _, status, _ = os.wait4(proc.pid, 0)
    text = proc.stdout.read()
    if status != 0:
        raise RuntimeError(f'{method} on {n_rows} rows failed')
    result = json.loads(text.strip().splitlines()[-1])
    # the child's own high-water mark: its ru_maxrss would include the parent's memory at the fork
    result['peak_gib'] = result['peak_kib'] / 2 ** 20
    result['distances'] = np.load(out)
    return result


def variant(image: np.ndarray, copy: int) -> np.ndarray:
    """Copy number `copy` of an image: a flip (4 kinds), a crop (offset and size vary) resized back, a shift."""
    if copy == 0:
        return image
    out = image[:, ::-1] if copy % 2 else image
    out = out[::-1] if (copy // 2) % 2 else out
    side = image.shape[0]
    crop = side - 8 - (copy * 5) % 24
    y, x = (copy * 7) % (side - crop + 1), (copy * 13) % (side - crop + 1)
    out = np.asarray(Image.fromarray(np.ascontiguousarray(out[y:y + crop, x:x + crop])).resize((side, side),
                                                                                               Image.BILINEAR))
    return np.roll(out, ((copy * 3) % 9, (copy * 5) % 9), axis=(0, 1))


def max_ratio(found: np.ndarray, truth: np.ndarray) -> float:
    """The largest found / nearest distance ratio (approx certifies at most 1 + eps); 0/0 counts as 1."""
    found, truth = found.astype(np.float64), truth.astype(np.float64)
    return float(np.max(np.where(truth > 0, found / np.where(truth > 0, truth, 1), np.where(found > 0, np.inf, 1))))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of queries answered with a row as near as the nearest (ties count)."""
    return float(np.mean(found <= truth * (1 + 1e-6) + 1e-7))


def sizes_table(args, data, enc) -> None:
    sizes = [int(s) for s in args.sizes.split(',')]
    methods = args.methods.split(',')
    n_train = len(data.train)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images = np.stack([variant(data.train[i % n_train], i // n_train) for i in range(max(sizes))])
        mean = mvtecad.mean_image(data.train)
        print(f'embedding {len(images)} training images and {len(data.test)} test images...', flush=True)
        bank = np.lib.format.open_memmap(folder / 'bank.npy', 'w+', np.float32, (len(images) * 57 * 57, enc.D))
        for start in range(0, len(images), 100):
            part = embed_images(enc, images[start:start + 100], mean, torch.device('cpu'))[1]
            bank[start * 57 * 57:(start + len(part)) * 57 * 57] = as_rows(part)
        bank.flush()
        queries = as_rows(embed_images(enc, data.test, mean, torch.device('cpu'))[1])
        np.save(folder / 'queries.npy', queries)
        sample = np.sort(rng.choice(len(queries), RECALL_SAMPLE, replace=False))
        torch.manual_seed(0)
        untrained = EncoderHier(64, enc.D).eval()   # a barely trained encoder: seeded initial weights
        weak = build_bank(untrained, data.train, 'cpu')
        np.save(folder / 'weak_bank.npy', as_rows(weak.emb32))
        np.save(folder / 'weak_queries.npy', as_rows(embed_images(untrained, data.test, weak.mean, 'cpu')[1]))

        rows = []
        cases = [(f'{n} images', folder / 'bank.npy', n * 57 * 57, folder / 'queries.npy') for n in sizes]
        cases.append((f'{n_train} images, barely trained encoder', folder / 'weak_bank.npy',
                      n_train * 57 * 57, folder / 'weak_queries.npy'))
        for label, bank_file, n_rows, query_file in cases:
            qs = np.load(query_file)[sample]
            truth = nearest_distances(qs, np.load(bank_file, mmap_mode='r')[:n_rows], 'brute')
            for method in methods:
                if method == 'ngt' and n_rows > args.ngt_max_images * 57 * 57:
                    rows.append([label, f'{n_rows:,}', method, 'not run', '', '', '', '', ''])
                    continue
                print(f'{label}: {method}...', flush=True)
                r = run_child(bank_file, n_rows, method, query_file, folder)
                rows.append([label, f'{n_rows:,}', method, f'{r["build"]:.1f}', f'{r["query"]:.1f}',
                             f'{r["build"] + r["query"]:.1f}', f'{r["peak_gib"]:.2f}',
                             f'{recall(r["distances"][sample], truth):.4f}',
                             f'{max_ratio(r["distances"][sample], truth):.5f}'])
                print('  ' + ' | '.join(rows[-1][3:]), flush=True)
    print(f'\n## K=32 search by bank size ({len(queries):,} queries: every test patch of {args.obj}; '
          f'recall on {RECALL_SAMPLE} of them against float64 brute force)\n')
    columns = ['bank', 'rows', 'search', 'build s', 'query s', 'total s', 'peak GiB', 'recall@1', 'max d / nearest']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')
    print(f'\nNGT is not run on banks of more than {args.ngt_max_images} images (--ngt_max_images): its build '
          'grows faster than linearly (32 minutes for 1,000 images here).')


def class_table(args, data, enc) -> None:
    bank = build_bank(enc, data.train, 'cpu')
    te64, te32 = embed_images(enc, data.test, bank.mean, 'cpu')
    train32, queries = as_rows(bank.emb32), as_rows(te32)
    results = {}
    for method in args.methods.split(','):
        ids, built, queried = timed_search(method, queries, train32)
        results[method] = (distances_to(queries, train32, ids), built, queried)
        print(f'{method}: build {built:.1f}s, queries {queried:.1f}s', flush=True)
    reference = results.get('brute', results.get('exact'))[0]
    s64 = nearest_distances(te64, bank.emb64, 'exact')
    print(f'\n## K=32 search, {args.obj}: {len(train32):,} training patches, {len(queries):,} queries, D=64\n')
    names = {'exact': 'exact (pruned cells, default)', 'approx': f'approx (`--nn approx`, eps {EPS[0]})', 'ngt': 'NGT batch (`--nn ngt`)',
             'ngt_single': 'NGT one query at a time (the original)', 'brute': 'brute force, float64'}
    columns = ['search', 'build s', 'query s', 'total s', 'speed-up (exact query s / query s)', 'recall@1', 'max d / nearest',
               'det_mult', 'seg_mult', 'largest AUROC diff']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    base = inspection.aurocs(inspection.score_maps(s64, reference.reshape(te32.shape[:-1])), data.files.labels,
                             data.masks)
    for method, (dist, built, queried) in results.items():
        a = inspection.aurocs(inspection.score_maps(s64, dist.reshape(te32.shape[:-1])), data.files.labels,
                              data.masks)
        print('| ' + ' | '.join([names.get(method, method), f'{built:.1f}', f'{queried:.1f}', f'{built + queried:.1f}',
                                 (f'{results["exact"][2] / queried:.2f}x' if 'exact' in results else ''),
                                 f'{recall(dist, reference):.4f}', f'{max_ratio(dist, reference):.5f}',
                                 f'{a["det_mult"]:.4f}', f'{a["seg_mult"]:.4f}',
                                 f'{max(abs(a[k] - base[k]) for k in a):.4f}']) + ' |')
    print('\nrecall and AUROC differences are against ' + ('brute force' if 'brute' in results else 'exact'))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == '--child':
        EPS[0] = float(sys.argv[7])
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
        return
    parser = class_parser(__doc__)
    parser.add_argument('--methods', default=None,
                        help='searches to run: exact, approx, ngt, ngt_single, brute (default exact,ngt)')
    parser.add_argument('--sizes', default=None, help='comma list of bank sizes in training images')
    parser.add_argument('--ngt_max_images', type=int, default=400, help='with --sizes: largest bank NGT builds')
    parser.add_argument('--nn_eps', type=float, default=EPS[0], help=f'approx: certified ratio 1 + eps (default {EPS[0]})')
    args = parser.parse_args()
    EPS[0] = args.nn_eps
    args.methods = args.methods or 'exact,ngt'
    data = mvtecad.load_class(mvtecad.find_class(Path(args.data_root), args.obj), args.resize)
    enc = load_encoder(checkpoint_path(args), 64)
    if args.sizes:
        sizes_table(args, data, enc)
    else:
        class_table(args, data, enc)


if __name__ == '__main__':
    main()
