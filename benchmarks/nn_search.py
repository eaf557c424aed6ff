"""K=32 nearest-neighbour search on a class's memory bank: NGT one query at a time (the original),
NGT batch (ours), exact (blockwise float64) and faiss (if installed).

    python benchmarks/nn_search.py [--obj bottle] [--max_queries 0]

Prints build and query seconds, recall@1 against exact search, and, when every test patch is
queried, the AUROCs each search gives (K=64 exact for all) and their largest difference to exact.
Exact search over all of bottle takes about 7 minutes on 2 CPU cores.
"""
from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np

from common import checkpoint_path, class_parser  # noqa: E402  (puts the repository on the path)
from codes import inspection, mvtecad  # noqa: E402
from codes.checkpoints import load_encoder  # noqa: E402
from codes.embeddings import embed_images  # noqa: E402
from codes.memory_bank import build_bank  # noqa: E402
from codes.nearest_neighbor import NGTIndex, as_rows, distances_to, exact_ids, faiss_ids, nearest_distances  # noqa: E402


def ngt_single(queries: np.ndarray, bank: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    """The original's loop: per patch one search(), one get_object() and a NumPy norm."""
    t = time.perf_counter()
    index = NGTIndex.build(bank, folder / 'single').index
    built = time.perf_counter() - t
    ids = np.empty(len(queries), np.int64)
    for k, q in enumerate(queries):
        ids[k] = index.search(q, 1)[0][0]
        np.linalg.norm(q - np.asarray(index.get_object(int(ids[k])), np.float32))   # the original's distance
    return ids, built, time.perf_counter() - t - built


def ngt_batch(queries: np.ndarray, bank: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    t = time.perf_counter()
    index = NGTIndex.build(bank, folder / 'batch')
    built = time.perf_counter() - t
    ids = index.nearest_ids(queries)
    return ids, built, time.perf_counter() - t - built


def exact(queries: np.ndarray, bank: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    import torch
    t = time.perf_counter()
    return exact_ids(queries, bank, torch.device('cpu')), 0.0, time.perf_counter() - t


def faiss_flat(queries: np.ndarray, bank: np.ndarray, folder: Path) -> tuple[np.ndarray, float, float]:
    t = time.perf_counter()
    return faiss_ids(queries, bank), 0.0, time.perf_counter() - t


def main() -> None:
    parser = class_parser(__doc__)
    parser.add_argument('--max_queries', type=int, default=0, help='query only the first N test patches (0: all)')
    parser.add_argument('--methods', default='ngt_single,ngt_batch,exact,faiss',
                        help='which searches to run (recall and AUROC differences need exact)')
    args = parser.parse_args()
    ckpt = checkpoint_path(args)

    data = mvtecad.load_class(mvtecad.find_class(Path(args.data_root), args.obj), args.resize)
    enc = load_encoder(ckpt, 64)
    bank = build_bank(enc, data.train, 'cpu')
    te64, te32 = embed_images(enc, data.test, bank.mean, 'cpu')
    train32 = as_rows(bank.emb32)
    queries = as_rows(te32)
    full = not args.max_queries or args.max_queries >= len(queries)
    if not full:
        queries = queries[:args.max_queries]

    available = {'ngt_single': ('ngt, one query at a time (original)', ngt_single),
                 'ngt_batch': ('ngt, batch (ours)', ngt_batch), 'exact': ('exact', exact), 'faiss': ('faiss flat', faiss_flat)}
    chosen = args.methods.split(',')
    if 'faiss' in chosen and importlib.util.find_spec('faiss') is None:
        print('faiss is not installed: its row is left out (pip install faiss-cpu)')
        chosen.remove('faiss')
    methods = dict(available[m] for m in chosen)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in methods.items():
            ids, built, queried = fn(queries, train32, Path(tmp))
            results[name] = (distances_to(queries, train32, ids), built, queried)
            print(f'{name}: build {built:.1f}s, queries {queried:.1f}s', flush=True)

    d_exact = results['exact'][0] if 'exact' in results else None
    aurocs = {}
    if full and d_exact is not None:   # AUROCs with each search's K=32 scores, K=64 exact for all
        s64 = nearest_distances(te64, bank.emb64, 'exact')
        for name, (dist, _, _) in results.items():
            maps = inspection.score_maps(s64, dist.reshape(te32.shape[:-1]))
            aurocs[name] = inspection.aurocs(maps, data.files.labels, data.masks)

    print(f'\n## K=32 search, {args.obj}: {len(train32):,} training patches, {len(queries):,} queries, D=64\n')
    columns = ['search', 'build s', 'query s', 'total s', 'speed vs one-by-one', 'recall@1']
    if aurocs:
        columns += ['det_32', 'seg_32', 'det_mult', 'seg_mult', 'largest AUROC diff to exact']
    print('| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    single = results.get('ngt, one query at a time (original)')
    for name, (dist, built, queried) in results.items():
        # as near as the nearest (ties count)
        recall = f'{np.mean(dist <= d_exact * (1 + 1e-6) + 1e-7):.4f}' if d_exact is not None else 'n/a'
        speed = f'{sum(single[1:]) / (built + queried):.1f}x' if single else 'n/a'
        cells = [name, f'{built:.1f}', f'{queried:.1f}', f'{built + queried:.1f}', speed, recall]
        if aurocs:
            a = aurocs[name]
            cells += [f'{a[k]:.4f}' for k in ('det_32', 'seg_32', 'det_mult', 'seg_mult')]
            cells.append(f'{max(abs(a[k] - aurocs["exact"][k]) for k in a):.4f}')
        print('| ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
    main()
