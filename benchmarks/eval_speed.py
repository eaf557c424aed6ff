"""Evaluation speed per stage, cold and with the memory bank cached, beside the original's, and against the
original-style path.

    python benchmarks/eval_speed.py [--obj bottle] [--data_root ../shared/data/mvtec]
                                    [--ckpt ../shared/ckpts/bottle/enchier.pkl] [--subset 2]

1. A full evaluation as `main_evaluate.py` runs it (default: exact search), cold (empty cache) and again
   with the memory bank and its search indexes cached: seconds per stage beside the original's
   (../shared/reference), the ratio, and the peak memory of the process.
2. On `--subset` test images: the original-style path (patch-by-patch embedding in batches of 64,
   one NGT query per patch, loop-based maps) against ours, per stage, with the largest difference
   between the maps they give.
"""
from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import SHARED, checkpoint_path, class_parser  # noqa: E402  (puts the repository on the path)
import main_evaluate  # noqa: E402
from codes import inspection, mvtecad  # noqa: E402
from codes.allocator import keep_freed_memory  # noqa: E402
from codes.checkpoints import load_encoder  # noqa: E402
from codes.embeddings import embed_images, grid_size  # noqa: E402
from codes.memory_bank import build_bank  # noqa: E402
from codes.nearest_neighbor import NGTSearch, as_rows, nearest_distances  # noqa: E402


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # ru_maxrss is KiB on Linux


# ---- the original-style path (the authors' algorithm, reimplemented here only as a baseline) ----

@torch.no_grad()
def embed_patch_by_patch(encoder, x: np.ndarray, K: int, S: int) -> np.ndarray:
    """Every KxK patch at stride S cut out and encoded, 64 patches per batch, as the original's infer()."""
    n, side = len(x), x.shape[-1]
    g = grid_size(K, S, side)
    coords = [(i, a, b) for i in range(n) for a in range(g) for b in range(g)]
    out = np.empty((n, g, g, encoder.D), np.float32)
    for start in range(0, len(coords), 64):
        chunk = coords[start:start + 64]
        patches = torch.from_numpy(np.stack([x[i, :, a * S:a * S + K, b * S:b * S + K] for i, a, b in chunk]))
        codes = encoder(patches)[:, :, 0, 0].numpy()
        for (i, a, b), code in zip(chunk, codes):
            out[i, a, b] = code
    return out


def ngt_one_query_at_a_time(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """The original: build the index, then one search() call and one get_object() per patch."""
    with tempfile.TemporaryDirectory() as folder:
        index = NGTSearch.build(as_rows(bank), Path(folder) / 'index')
        flat = as_rows(queries)
        out = np.empty(len(flat), np.float32)
        for k, q in enumerate(flat):
            nearest = index.search(q, 1)[0][0]
            out[k] = np.linalg.norm(q - np.asarray(index.get_object(nearest), np.float32))
    return out.reshape(queries.shape[:-1])


def distribute_loop(scores: np.ndarray, K: int, S: int, side: int = 256) -> np.ndarray:
    """The original's distribute_scores: a Python loop adding each patch's score to its pixels."""
    maps = []
    for score in scores:
        total, count = np.zeros((side, side), np.float32), np.zeros((side, side), np.int32)
        for i in range(score.shape[0]):
            for j in range(score.shape[1]):
                total[i * S:i * S + K, j * S:j * S + K] += score[i, j]
                count[i * S:i * S + K, j * S:j * S + K] += 1
        count[count == 0] = 1
        maps.append(total / count)
    return np.asarray(maps)


def timed(fn, *args):
    started = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - started


def main() -> None:
    parser = class_parser(__doc__)
    parser.add_argument('--subset', type=int, default=2, help='test images for the original-style comparison')
    args = parser.parse_args()
    keep_freed_memory()      # as the entry scripts do (codes/cli.py run)
    ckpt = checkpoint_path(args)

    # 1. full evaluation, cold then cached, exactly as main_evaluate.py runs it
    with tempfile.TemporaryDirectory() as tmp:
        flags = [f'--obj={args.obj}', f'--data_root={args.data_root}', f'--ckpt={ckpt}', f'--resize={args.resize}',
                  f'--cache_dir={tmp}/cache', f'--results_dir={tmp}/results', '--device=cpu']
        cold = main_evaluate.evaluate_one(main_evaluate.parse_args(flags))
        peak_cold = peak_gib()
        cached = main_evaluate.evaluate_one(main_evaluate.parse_args(flags))
    n_train, n_test = cold['settings']['n_train'], cold['settings']['n_test']
    reference = SHARED / 'reference' / f'bottle_original_{args.resize}.json'
    orig = json.loads(reference.read_text())['times_s'] if args.obj == 'bottle' and reference.is_file() else {}
    # the original's stages, mapped onto ours (it embedded train and test patch by patch, in one stage each K)
    orig_rows = {'bank': None, 'load_test': None, 'embed_test': None, 'nn64': orig.get('nn64'),
                 'nn32': orig.get('nn32'), 'maps': orig.get('distribute'), 'metrics': orig.get('auroc'),
                 'total': orig.get('total')}
    print(f'## {args.obj}: full evaluation ({n_train} train, {n_test} test images, resize {args.resize}, '
          f'search {cold["settings"]["nn"]}, {torch.get_num_threads()} threads)\n')
    print('| stage | original s | ours cold s | ratio | ours cached s | ratio |')
    print('|---|---|---|---|---|---|')
    if orig:
        c = sum(cold['times_s'][k] for k in ('bank', 'load_test', 'embed_test'))
        w = sum(cached['times_s'][k] for k in ('bank', 'load_test', 'embed_test'))
        o = orig['load'] + orig['emb64'] + orig['emb32']
        print(f'| read + embed train and test (ours: bank + load_test + embed_test) | {o:.1f} | {c:.2f} | '
              f'{o / c:.0f}x | {w:.2f} | {o / w:.0f}x |')
    for stage in ('bank', 'load_test', 'embed_test', 'nn64', 'nn32', 'maps', 'metrics', 'total'):
        c, w, o = cold['times_s'][stage], cached['times_s'][stage], orig_rows[stage]
        ratio = (lambda t: f'{o / t:.0f}x') if o else (lambda t: '')
        print(f'| {stage} | {o if o else ""} | {c:.2f} | {ratio(c)} | {w:.2f} | {ratio(w)} |')
    print('\n`bank` = read + embed the training images and build nothing else (cold) or read the cached bank '
          '(cached); the search indexes are built inside nn64 / nn32 (cold) or read there (cached).')
    print(f'peak memory (RSS) of the process after the cold evaluation: {peak_cold:.2f} GiB')
    print(f'AUROCs cold: det_mult {cold["aurocs"]["det_mult"]:.4f} seg_mult {cold["aurocs"]["seg_mult"]:.4f}; '
          f'cached: det_mult {cached["aurocs"]["det_mult"]:.4f} seg_mult {cached["aurocs"]["seg_mult"]:.4f}\n')

    # 2. original-style path against ours on a subset
    files = mvtecad.find_class(Path(args.data_root), args.obj)
    data = mvtecad.load_class(files, args.resize)
    enc = load_encoder(Path(ckpt), 64)
    bank = build_bank(enc, data.train, 'cpu')
    test = data.test[:args.subset]
    x = mvtecad.standardize(test, bank.mean)
    rows = []
    (o64, t_o64) = timed(embed_patch_by_patch, enc, x, 64, 16)
    (o32, t_o32) = timed(embed_patch_by_patch, enc.enc, x, 32, 4)
    ((d64, d32), t_d) = timed(embed_images, enc, test, bank.mean, torch.device('cpu'))
    rows.append(('embed test (K=64 + K=32)', t_o64 + t_o32, t_d))
    (s64, t_s64) = timed(nearest_distances, d64, bank.emb64, 'exact')
    (o_s32, t_o_s32) = timed(ngt_one_query_at_a_time, o32, bank.emb32)
    (s32, t_s32) = timed(nearest_distances, d32, bank.emb32, 'ngt')
    rows.append(('NGT K=32: build + one query per patch vs batch', t_o_s32, t_s32))
    (o_maps, t_o_maps) = timed(lambda: distribute_loop(s64, 64, 16) * distribute_loop(o_s32, 32, 4))
    (maps, t_maps) = timed(lambda: inspection.score_maps(s64, s32)['mult'])
    rows.append(('maps', t_o_maps, t_maps))
    print(f'## original-style path against ours, {args.subset} test images (same memory bank)\n')
    print('| stage | original-style s | ours s | ratio |')
    print('|---|---|---|---|')
    for name, a, b in rows:
        print(f'| {name} | {a:.2f} | {b:.2f} | {a / b:.1f}x |')
    print(f'\nlargest difference, embeddings K=64 {np.abs(o64 - d64).max():.2e}, K=32 {np.abs(o32 - d32).max():.2e}')
    print(f'largest difference between the mult maps: {np.abs(o_maps - maps).max():.2e} '
          f'(max map value {maps.max():.3f}; NGT is approximate, so both K=32 searches may differ)')
    loop_exact = distribute_loop(s64, 64, 16)
    print(f'largest difference between loop and box-filter K=64 maps on the same scores: '
          f'{np.abs(loop_exact - inspection.distribute_scores(s64, 64, 16)).max():.2e}')


if __name__ == '__main__':
    main()
