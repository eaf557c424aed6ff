"""What main_predict.py writes: predictions.csv and .json, pictures, raw maps, masks and index.html.

Layout of the output folder:
    predictions.csv, predictions.json   one row per input: path, raw and normalised score, decision,
                                        anomalous-area fraction, error (empty / null when it worked)
    pictures/<name>.png                 the image beside its heat map (normalised: 0.5 = threshold)
                                        with the anomalous region outlined
    maps/<name>.npy | .tiff | .png      the raw map (float32; Patch SVDD: 256x256 mult map; others: 224x224), or the normalised map as a
                                        16-bit PNG (0..65535 for 0..1; the threshold is 32768)
    masks/<name>.png                    the anomalous pixels (map >= pixel threshold) as 0 / 255
    index.html                          every image sorted by score, with its decision
Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import csv
import html
import io
import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from .files import atomic_open, atomic_save, make_dir, write_json
from .prediction import ImageResult
from .thresholds import Thresholds
from .visualization import overlay_picture

MAP_FORMATS = ('npy', 'tiff', 'png16')
COLUMNS = ('path', 'score', 'normalized_score', 'decision', 'anomalous_area', 'error')


def output_names(paths: list[Path]) -> dict[Path, str]:
    """A unique file-name stem per input: its path below the inputs' common folder, `/` turned into `__`."""
    parents = [os.path.abspath(p.parent) for p in paths]
    root = os.path.commonpath(parents) if parents else ''
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for p in paths:
        rel = Path(os.path.relpath(os.path.abspath(p), root))
        stem = '__'.join(rel.with_suffix('').parts) or 'image'
        name, k = stem, 2
        while name in taken:          # a.png and a.jpg in one folder
            name, k = f'{stem}_{k}', k + 1
        taken.add(name)
        names[p] = name
    return names


def decision_text(anomalous: bool | None) -> str:
    return '' if anomalous is None else 'anomalous' if anomalous else 'normal'


class PredictionWriter:
    """Writes each result's files as it comes, and the tables and index page at the end."""

    def __init__(self, out_dir: Path, thresholds: Thresholds, names: dict[Path, str], pictures: bool = True,
                 save_maps: str | None = None, save_masks: bool = False):
        self.out_dir, self.t, self.names = Path(out_dir), thresholds, names
        self.pictures, self.save_maps, self.save_masks = pictures, save_maps, save_masks
        self.rows: list[dict] = []
        make_dir(self.out_dir, 'output')
        for wanted, sub in ((pictures, 'pictures'), (save_maps, 'maps'), (save_masks, 'masks')):
            if wanted:
                make_dir(self.out_dir / sub, 'output')

    def add(self, r: ImageResult) -> None:
        row = {'path': str(r.path), 'score': r.score, 'normalized_score': r.normalized,
               'decision': decision_text(r.anomalous), 'anomalous_area': r.area, 'error': r.error}
        if r.map is not None:
            name = self.names[r.path]
            mask = r.map >= self.t.pixel
            if self.pictures:
                row['picture'] = f'pictures/{name}.png'
                picture = overlay_picture(r.image, self.t.normalize_maps(r.map), mask)
                save_png(self.out_dir / row['picture'], picture)
            if self.save_maps:
                row['map'] = f'maps/{name}.{"png" if self.save_maps == "png16" else self.save_maps}'
                save_map(self.out_dir / row['map'], r.map, self.save_maps, self.t)
            if self.save_masks:
                row['mask'] = f'masks/{name}.png'
                save_png(self.out_dir / row['mask'], mask.astype(np.uint8) * 255)
        self.rows.append(row)

    def finish(self, summary: dict) -> dict[str, Path]:
        """predictions.csv, predictions.json and index.html; returns their paths."""
        paths = {'csv': self.out_dir / 'predictions.csv', 'json': self.out_dir / 'predictions.json',
                 'html': self.out_dir / 'index.html'}
        with atomic_open(paths['csv'], 'w') as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction='ignore', lineterminator='\n')
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: '' if row[k] is None else row[k] for k in COLUMNS})
        write_json(paths['json'], {**summary, 'images': self.rows})
        with atomic_open(paths['html'], 'w') as f:
            f.write(index_page(self.rows, summary))
        return paths


def save_png(path: Path, array: np.ndarray) -> None:
    image = Image.fromarray(array)
    atomic_save(path, lambda f: image.save(f, format='PNG', compress_level=1))   # speed over size


def save_map(path: Path, score_map: np.ndarray, fmt: str, t: Thresholds) -> None:
    if fmt == 'npy':
        atomic_save(path, lambda f: np.save(f, score_map.astype(np.float32), allow_pickle=False))
    elif fmt == 'tiff':
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, score_map.astype(np.float32))
        atomic_save(path, lambda f: f.write(buffer.getvalue()))
    else:
        level = np.round(t.normalize_maps(score_map) * 65535).astype(np.uint16)
        image = Image.fromarray(level)
        atomic_save(path, lambda f: image.save(f, format='PNG'))


def index_page(rows: list[dict], summary: dict) -> str:
    """All images by raw score, highest first; failed inputs listed last with their errors."""
    done = sorted((r for r in rows if r['error'] is None), key=lambda r: -r['score'])
    failed = [r for r in rows if r['error'] is not None]
    t = summary['thresholds']
    cards = []
    for r in done:
        picture = (f'<a href="{html.escape(r["picture"])}"><img src="{html.escape(r["picture"])}" loading="lazy" '
                   f'alt=""></a>') if 'picture' in r else ''
        cards.append(f'<figure class="{r["decision"]}">{picture}<figcaption><b>{r["decision"].upper()}</b> '
                     f'&middot; score {r["score"]:.4g} (normalised {r["normalized_score"]:.3f}) &middot; '
                     f'area {100 * r["anomalous_area"]:.2f}%<br><span class="path">{html.escape(r["path"])}</span>'
                     f'</figcaption></figure>')
    errors = ''.join(f'<tr><td>{html.escape(r["path"])}</td><td>{html.escape(r["error"])}</td></tr>' for r in failed)
    n_anomalous = sum(r['decision'] == 'anomalous' for r in done)
    model = summary.get('model', {})
    return f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Patch SVDD predictions: {html.escape(str(model.get("obj", "")))}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: 400px; border: 4px solid #ccc; }}
figure.anomalous {{ border-color: #d33; }} figure.normal {{ border-color: #3a3; }}
img {{ width: 100%; display: block; }} figcaption {{ font-size: 13px; padding: 3px 5px; }}
.path {{ color: #555; font-size: 11px; word-break: break-all; }}
table {{ border-collapse: collapse; }} td {{ border: 1px solid #ccc; padding: 2px 6px; font-size: 13px; }}
</style></head><body>
<h1>{len(done)} images by anomaly score: {n_anomalous} anomalous, {len(done) - n_anomalous} normal{f", {len(failed)} failed" if failed else ""}</h1>
<p>Model: {html.escape(str(model.get("obj", "")))}, checkpoint {html.escape(str(model.get("checkpoint", "")))}.
Anomalous when score &ge; {t["image"]:.4g} (from {t["image_source"]}); pixels outlined where the map &ge; {t["pixel"]:.4g}
(from {t["pixel_source"]}). Red border: anomalous; green: normal. Heat map: normalised score, 0.5 = threshold.</p>
<div class="grid">
{chr(10).join(cards)}
</div>
{f"<h2>Failed</h2><table>{errors}</table>" if failed else ""}
</body></html>
'''
