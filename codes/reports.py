"""Result files and printed summaries: one JSON per evaluation, a row per evaluation in
results/summary.csv, optional saved maps, and a Markdown table for many classes beside the paper's."""
from __future__ import annotations

import csv
import datetime as dt
import sys
from pathlib import Path

import numpy as np

from .files import append_csv_row, atomic_open, make_dir, write_json
from .metrics import undefined_metrics

# The paper's MVTec AD results (AUROC %, detection / segmentation, mult map), SPEC.md.
PAPER = {'bottle': (98.6, 98.1), 'cable': (90.3, 96.8), 'capsule': (76.7, 95.8), 'carpet': (92.9, 92.6),
         'grid': (94.6, 96.2), 'hazelnut': (92.0, 97.5), 'leather': (90.9, 97.4), 'metal_nut': (94.0, 98.0),
         'pill': (86.1, 95.1), 'screw': (81.3, 95.7), 'tile': (97.8, 91.4), 'toothbrush': (100.0, 98.1),
         'transistor': (91.5, 97.0), 'wood': (96.5, 90.8), 'zipper': (97.9, 95.1)}
MAP_LABELS = {'64': 'K64', '32': 'K32', 'sum': 'sum', 'mult': 'mult',
              'psdl': 'psdl', 'padim': 'padim', 'patchcore': 'patchcore'}
SVDD = 'patchsvdd'


def run_name(ckpt: Path, resize: str, nn: str) -> str:
    stamp = dt.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f'{stamp}_{ckpt.stem}_{resize}_{nn}'


def result_line(parts: dict[str, tuple[float | None, float | None]], obj: str) -> str:
    """The original's output line, one `|name| Det: .. Seg: ..` per map or method, then the class:
    `|K64| Det: 98.3 Seg: 96.0 |K32| ... (bottle)`, or `|padim| Det: 99.8 Seg: 97.8 (bottle)`."""
    def pct(v: float | None) -> str:
        return f'{v * 100:4.1f}' if v is not None else ' n/a'
    return ' '.join(f'|{name}| Det: {pct(det)} Seg: {pct(seg)}' for name, (det, seg) in parts.items()) + f' ({obj})'


def search_note(nn: str, eps: float) -> str:
    """What the result line adds when the search is not the default exact one, e.g. ` [search: approx, eps 0.01]`."""
    if nn == 'exact':
        return ''
    return f' [search: {nn}' + (f', eps {eps:g}]' if nn == 'approx' else ']')


def method_run_name(method: str, backbone: str, detail: str = '') -> str:
    """e.g. `20261125-040000_psdl_efficientnet_lite0_single-layer3`."""
    stamp = dt.datetime.now().strftime('%Y%m%d-%H%M%S')
    return f'{stamp}_{method}_{backbone}' + (f'_{detail}' if detail else '')


def main_metrics(record: dict) -> dict[str, float | None]:
    """The metrics of a record's result map: Patch SVDD's `mult`, another method's only map."""
    return record['metrics'][record.get('method', SVDD) if record.get('method', SVDD) != SVDD else 'mult']


def pct(value: float | None, width: int = 5) -> str:
    return f'{value * 100:{width}.1f}' if value is not None else f'{"n/a":>{width}}'


def metrics_block(metrics: dict[str, dict[str, float | None]], note: str | None = None) -> str:
    """The second printed block: AUPRO (FPR <= 0.3), pixel AP and image F1-max for each map; `note` says why
    some are n/a (metrics.undefined_metrics)."""
    lines = ['       AUPRO  pixAP  F1max  (F1 threshold)']
    for name, m in metrics.items():
        threshold = 'n/a' if m['f1_threshold'] is None else f'{m["f1_threshold"]:.4g}'
        lines.append(f'{MAP_LABELS[name]:>5}  {pct(m["aupro"])}  {pct(m["pixel_ap"])}  {pct(m["f1_max"])}  '
                     f'({threshold})')
    if note:
        lines.append(f'({note})')
    elif next(iter(metrics.values()))['seg'] is None:
        lines.append('(no ground-truth masks: segmentation metrics are not available)')
    return '\n'.join(lines)


def note_undefined_metrics(labels: np.ndarray, masks: tuple | None) -> str | None:
    """Says on stderr, before the work, which metrics the test set cannot give (one line); returns that line."""
    note = undefined_metrics(labels, masks)
    if note:
        print(f'note: {note}', file=sys.stderr)
    return note


def write_result(results_dir: Path, obj: str, name: str, record: dict) -> Path:
    """Writes results/<obj>/<name>.json and appends its row to results/summary.csv, both atomically."""
    folder = results_dir / obj
    make_dir(folder, 'results')
    path = folder / f'{name}.json'
    write_json(path, record)
    if record.get('method', SVDD) == SVDD:
        mult = record['metrics']['mult']
        row = {'run': name, 'obj': obj, 'checkpoint_sha256': record['settings']['checkpoint_sha256'],
               'resize': record['settings']['resize'], 'nn': record['settings']['nn'],
               **{k: '' if v is None else round(v, 6) for k, v in record['aurocs'].items()},
               **{f'{k}_mult': '' if mult[k] is None else round(mult[k], 6) for k in ('aupro', 'pixel_ap', 'f1_max')},
               'json': path.relative_to(results_dir).as_posix()}
    else:
        m = main_metrics(record)
        row = {'run': name, 'obj': obj, 'method': record['method'],
               'backbone_sha256': record['settings']['backbone_sha256'], 'resize': record['settings']['resize'],
               'nn': record['settings'].get('nn', ''),
               **{k: '' if m[k] is None else round(m[k], 6) for k in ('det', 'seg', 'aupro', 'pixel_ap', 'f1_max')},
               'json': path.relative_to(results_dir).as_posix()}
    append_summary_row(results_dir / 'summary.csv', row)
    return path


def append_summary_row(path: Path, row: dict) -> None:
    """Appends a row; when its columns differ from the file's (Patch SVDD's rows beside another method's),
    the whole file is rewritten, atomically, with the union of the columns, rows without a `method`
    column getting `patchsvdd`. A file of Patch SVDD rows alone stays exactly as before."""
    header = next(csv.reader(path.open(newline='')), None) if path.exists() else None
    if header is None or header == list(row):
        append_csv_row(path, row)
        return
    rows = list(csv.DictReader(path.open(newline=''))) + [row]
    columns = list(dict.fromkeys(header + list(row) + ['method']))
    for r in rows:
        if not r.get('method'):
            r['method'] = SVDD
    with atomic_open(path, 'w') as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval='')
        writer.writeheader()
        writer.writerows(rows)


def save_maps(path: Path, maps: dict[str, np.ndarray], image_scores: np.ndarray, labels: np.ndarray,
              test_paths: tuple[Path, ...], mask_paths: tuple[Path | None, ...] | None) -> None:
    """The maps (float32: Patch SVDD's four 256x256, or a method's 224x224), the method's image scores (float64:
    the mult map's maximum, PatchCore's re-weighted score), labels and the test images' and masks' paths, in
    one .npz."""
    make_dir(path.parent, 'results')
    arrays = {f'maps_{name}': m.astype(np.float32) for name, m in maps.items()}
    arrays.update(image_scores=np.asarray(image_scores, np.float64), labels=labels, test_paths=np.array([str(p) for p in test_paths]),
                  mask_paths=np.array(['' if p is None else str(p) for p in (mask_paths or [None] * len(test_paths))]))
    with atomic_open(path, 'wb') as f:
        np.savez(f, **arrays)


def markdown_table(records: list[dict]) -> str:
    """Per class and mean: ours (mult map) beside the paper's Det / Seg, plus AUPRO, pixel AP, F1-max.
    Records of other methods (PSDL, PaDiM, PatchCore) get a table with a method column instead."""
    if any(r.get('method', SVDD) != SVDD for r in records):
        return method_table(records)
    head = ('| class | Det (ours) | Det (paper) | Seg (ours) | Seg (paper) | AUPRO | pixel AP | F1-max |\n'
            '|---|---|---|---|---|---|---|---|')
    rows, columns = [], []
    for r in records:
        m = r['metrics']['mult']
        paper = PAPER.get(r['obj'], (None, None))
        values = [m['det'], paper[0] / 100 if paper[0] else None, m['seg'], paper[1] / 100 if paper[1] else None,
                  m['aupro'], m['pixel_ap'], m['f1_max']]
        columns.append(values)
        rows.append(f'| {r["obj"]} | ' + ' | '.join(pct(v, 0) for v in values) + ' |')
    means = [np.mean([c[i] for c in columns]) if all(c[i] is not None for c in columns) else None
             for i in range(7)]
    rows.append(f'| **mean** ({len(records)}) | ' + ' | '.join(pct(v, 0) for v in means) + ' |')
    return '\n'.join([head] + rows)


def method_table(records: list[dict], times: bool = False) -> str:
    """Per class and method, and the mean per method: Det, Seg, AUPRO, pixel AP, F1-max (%), with `times`
    also each run's seconds (a mean row: the total)."""
    head = ('| class | method | Det | Seg | AUPRO | pixel AP | F1-max |' + (' time (s) |' if times else '') + '\n'
            '|---|---|---|---|---|---|---|' + ('---|' if times else ''))
    keys = ('det', 'seg', 'aupro', 'pixel_ap', 'f1_max')
    rows, by_method, seconds = [], {}, {}
    for r in records:
        method = r.get('method', SVDD)
        m = main_metrics(r)
        by_method.setdefault(method, []).append([m[k] for k in keys])
        total = r.get('times_s', {}).get('total', 0.0)
        seconds[method] = seconds.get(method, 0.0) + total
        rows.append(f'| {r["obj"]} | {method} | ' + ' | '.join(pct(m[k], 0) for k in keys) + ' |'
                    + (f' {total:.1f} |' if times else ''))
    for method, columns in by_method.items():
        means = [np.mean([c[i] for c in columns]) if all(c[i] is not None for c in columns) else None
                 for i in range(len(keys))]
        rows.append(f'| **mean** ({len(columns)}) | {method} | ' + ' | '.join(pct(v, 0) for v in means) + ' |'
                    + (f' {seconds[method]:.1f} |' if times else ''))
    return '\n'.join([head] + rows)
