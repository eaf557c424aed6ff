"""Pictures of anomaly maps: a panel per test image, ROC and PRO curve figures, and an index page.

Maps share one colour scale over the whole test set by default (the authors' advice: per-image
normalisation makes every image look anomalous); `per_image` scales each map to its own range.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve
from tqdm import tqdm

from . import metrics
from .files import atomic_open, atomic_save, make_dir
from .mvtecad import LoadedClass

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402

NORMALIZATIONS = ('test_set', 'per_image')
CMAP = 'jet'


def panel_name(image_path: Path) -> str:
    """`<defect>_<stem>.png`, e.g. broken_large_000.png."""
    return f'{image_path.parent.name}_{image_path.stem}.png'


def heat_overlay(score_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """RGBA heat map whose opacity grows with the score, so low-score regions show the image beneath."""
    level = np.clip((score_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgba = matplotlib.colormaps[CMAP](level)
    rgba[..., 3] = 0.85 * np.sqrt(level)
    return rgba


def save_panels(data: LoadedClass, maps: np.ndarray, out_dir: Path, normalize: str = 'test_set',
                scores: np.ndarray | None = None) -> list[Path]:
    """Per test image: the image with its ground-truth outline, and the map as a heat overlay with a colour bar
    and the image score (default: the map's maximum)."""
    make_dir(out_dir, 'output')
    scores = metrics.image_scores(maps) if scores is None else scores
    low, high = float(maps.min()), float(maps.max())
    paths = []
    for n, image_path in enumerate(tqdm(data.files.test, desc='panels', unit='img', leave=False, disable=None)):
        vmin, vmax = (float(maps[n].min()), float(maps[n].max())) if normalize == 'per_image' else (low, high)
        fig, axes = plt.subplots(ncols=2, figsize=(7, 3.4))
        for ax in axes:
            ax.imshow(data.test[n])
            if data.masks is not None and data.masks[n].any():
                ax.contour(data.masks[n], levels=[0.5], colors='lime', linewidths=1)
            ax.set_axis_off()
        axes[1].imshow(heat_overlay(maps[n], vmin, vmax))
        fig.colorbar(ScalarMappable(Normalize(vmin, vmax), CMAP), ax=axes[1], fraction=0.046, pad=0.04)
        label = 'normal' if data.files.labels[n] == 0 else 'defective'
        axes[0].set_title(f'{image_path.parent.name}/{image_path.name} ({label})', fontsize=8)
        axes[1].set_title(f'score {scores[n]:.4g}  (scale: {normalize.replace("_", " ")})', fontsize=8)
        fig.tight_layout()
        path = out_dir / panel_name(image_path)
        atomic_save(path, lambda f: fig.savefig(f, format='png', dpi=90))
        plt.close(fig)
        paths.append(path)
    return paths


def save_roc_figure(data: LoadedClass, maps: np.ndarray, path: Path, map_name: str = 'mult map',
                    scores: np.ndarray | None = None) -> None:
    """Image-level ROC curve of the image scores (default: each map's maximum) and, with masks, pixel-level."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    scores = metrics.image_scores(maps) if scores is None else scores
    if metrics.has_both_kinds(data.files.labels):
        fpr, tpr, _ = roc_curve(data.files.labels, scores)
        ax.plot(fpr, tpr, label=f'image (AUROC {roc_auc_score(data.files.labels, scores):.3f})')
    if metrics.has_both_kinds(data.masks):
        fpr, tpr, _ = roc_curve(data.masks.ravel(), maps.ravel())
        ax.plot(fpr, tpr, label=f'pixel (AUROC {metrics.segmentation_auroc(data.masks, maps):.3f})')
    ax.plot([0, 1], [0, 1], color='grey', linewidth=0.5, linestyle='--')
    ax.set(xlabel='false positive rate', ylabel='true positive rate', title=f'{data.files.obj}: ROC ({map_name})')
    ax.legend(loc='lower right')
    fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def save_pro_figure(data: LoadedClass, maps: np.ndarray, path: Path, map_name: str = 'mult map') -> None:
    """The PRO curve, with the FPR <= 0.3 range that AUPRO integrates shaded."""
    fpr, pro = metrics.pro_curve(data.masks, maps)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, pro)
    ax.axvspan(0, metrics.PRO_FPR_LIMIT, color='tab:blue', alpha=0.08)
    score = metrics.area_up_to(fpr, pro, metrics.PRO_FPR_LIMIT) / metrics.PRO_FPR_LIMIT
    ax.set(xlabel='false positive rate (anomaly-free pixels)', ylabel='per-region overlap',
           title=f'{data.files.obj}: PRO ({map_name}), AUPRO@0.3 = {score:.3f}', xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    atomic_save(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def write_index(data: LoadedClass, maps: np.ndarray, panels: list[Path], figures: list[Path], path: Path,
                map_name: str = 'mult map', scores: np.ndarray | None = None, title: str = 'Patch SVDD') -> None:
    """index.html: all panels sorted by image score (default: each map's maximum; highest first), each with
    its label and score."""
    scores = metrics.image_scores(maps) if scores is None else scores
    order = np.argsort(-scores, kind='stable')
    cards = []
    for n in order:
        label = 'normal' if data.files.labels[n] == 0 else f'defective ({data.files.test[n].parent.name})'
        name = html.escape(panels[n].name)
        cards.append(f'<figure class="{"normal" if data.files.labels[n] == 0 else "defective"}">'
                     f'<a href="{name}"><img src="{name}" loading="lazy" alt="{name}"></a>'
                     f'<figcaption>{html.escape(data.files.test[n].name)} &middot; {html.escape(label)} '
                     f'&middot; score {scores[n]:.4g}</figcaption></figure>')
    links = ' '.join(f'<a href="{html.escape(f.name)}">{html.escape(f.stem)}</a>' for f in figures)
    page = f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}: {html.escape(data.files.obj)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure {{ margin: 0; width: 360px; border: 3px solid #ccc; }}
figure.defective {{ border-color: #d33; }} figure.normal {{ border-color: #3a3; }}
img {{ width: 100%; }} figcaption {{ font-size: 13px; padding: 2px 4px; }}
</style></head><body>
<h1>{html.escape(data.files.obj)}: {len(order)} test images by anomaly score ({html.escape(map_name)})</h1>
<p>Red border: defective; green: normal. Curves: {links}</p>
<div class="grid">
{chr(10).join(cards)}
</div></body></html>
'''
    with atomic_open(path, 'w') as f:
        f.write(page)


def save_all(data: LoadedClass, maps: np.ndarray, out_dir: Path, normalize: str = 'test_set',
             map_name: str = 'mult map', scores: np.ndarray | None = None,
             title: str = 'Patch SVDD') -> dict[str, object]:
    """Panels, curve figures and index.html for one class; returns what was written. `map_name` labels the
    figures (Patch SVDD's mult map, or the method's name); `scores` are the method's image scores (PatchCore's
    re-weighted score; default each map's maximum), which rank the page and make the image ROC."""
    panels = save_panels(data, maps, out_dir, normalize, scores)
    figures = []
    # each curve needs both kinds: normal and defective images (ROC), normal and anomalous pixels (ROC, PRO)
    if metrics.has_both_kinds(data.files.labels) or metrics.has_both_kinds(data.masks):
        figures.append(out_dir / 'roc_curve.png')
        save_roc_figure(data, maps, figures[-1], map_name, scores)
    if metrics.has_both_kinds(data.masks):
        figures.append(out_dir / 'pro_curve.png')
        save_pro_figure(data, maps, figures[-1], map_name)
    write_index(data, maps, panels, figures, out_dir / 'index.html', map_name, scores, title)
    return {'panels': panels, 'figures': figures, 'index': out_dir / 'index.html'}


@dataclass
class MethodMaps:
    """One method's result on a class, for a comparison: its view of the test set, maps and image scores."""
    method: str
    data: LoadedClass          # the images and masks as the method reads them (256 squash, or 224 crops)
    maps: np.ndarray
    scores: np.ndarray


def save_comparison(results: list[MethodMaps], out_dir: Path, normalize: str = 'test_set') -> dict[str, object]:
    """Per test image one panel: the image, its ground truth, and each method's map over the image as that
    method reads it, each method on its own colour scale (over the test set, or per image); and index.html:
    a table of every method's score per image, ranked by the first method's score."""
    make_dir(out_dir, 'output')
    first = results[0].data
    scales = [(float(r.maps.min()), float(r.maps.max())) for r in results]
    panels = []
    for n, image_path in enumerate(tqdm(first.files.test, desc='panels', unit='img', leave=False, disable=None)):
        fig, axes = plt.subplots(ncols=2 + len(results), figsize=(3.2 * (2 + len(results)), 3.4))
        axes[0].imshow(first.test[n])
        label = 'normal' if first.files.labels[n] == 0 else 'defective'
        axes[0].set_title(f'{image_path.parent.name}/{image_path.name} ({label})', fontsize=8)
        mask = first.masks[n] if first.masks is not None else np.zeros(first.test[n].shape[:2], bool)
        axes[1].imshow(mask, cmap='gray', vmin=0, vmax=1)
        axes[1].set_title('ground truth', fontsize=8)
        for ax, r, (low, high) in zip(axes[2:], results, scales):
            vmin, vmax = (float(r.maps[n].min()), float(r.maps[n].max())) if normalize == 'per_image' else (low, high)
            ax.imshow(r.data.test[n])
            ax.imshow(heat_overlay(r.maps[n], vmin, vmax))
            ax.set_title(f'{r.method}: score {r.scores[n]:.4g}', fontsize=8)
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        path = out_dir / panel_name(image_path)
        atomic_save(path, lambda f: fig.savefig(f, format='png', dpi=80))
        plt.close(fig)
        panels.append(path)
    order = np.argsort(-results[0].scores, kind='stable')
    head = ''.join(f'<th>{html.escape(r.method)}</th>' for r in results)
    rows = []
    for n in order:
        label = 'normal' if first.files.labels[n] == 0 else f'defective ({first.files.test[n].parent.name})'
        cells = ''.join(f'<td>{r.scores[n]:.4g}</td>' for r in results)
        name = html.escape(panels[n].name)
        rows.append(f'<tr class="{"normal" if first.files.labels[n] == 0 else "defective"}"><td><a href="{name}">'
                    f'{html.escape(first.files.test[n].parent.name)}/{html.escape(first.files.test[n].name)}</a></td>'
                    f'<td>{html.escape(label)}</td>{cells}</tr>')
    obj = html.escape(first.files.obj)
    page = f'''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{obj}: {len(results)} methods compared</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }} td, th {{ padding: 2px 8px; text-align: left; }}
tr.defective td:first-child {{ border-left: 4px solid #d33; }} tr.normal td:first-child {{ border-left: 4px solid #3a3; }}
</style></head><body>
<h1>{obj}: {len(order)} test images, by {html.escape(results[0].method)}'s image score</h1>
<p>Each method's own image score; each link opens the image's panel (image, ground truth, every method's map).</p>
<table><tr><th>image</th><th>label</th>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
'''
    with atomic_open(out_dir / 'index.html', 'w') as f:
        f.write(page)
    return {'panels': panels, 'figures': [], 'index': out_dir / 'index.html'}


def overlay_picture(image: np.ndarray, level: np.ndarray, mask: np.ndarray | None = None,
                    floor: float = 0.4) -> np.ndarray:
    """The image beside itself under its heat map (`level` in [0, 1], 0.5 = the threshold), the anomalous
    region (`mask`) outlined in white: (H, 2W, 3) uint8, drawn with NumPy alone (no figure: fast).
    Levels up to `floor` are transparent: normal pixels sit just under 0.5 and would tint the whole image."""
    from skimage.segmentation import find_boundaries   # only prediction pictures need it

    rgba = heat_overlay(level, floor, 1.0)
    alpha = rgba[..., 3:]
    base = image.astype(np.float64) / 255
    blended = base * (1 - alpha) + rgba[..., :3] * alpha
    if mask is not None and mask.any():
        blended[find_boundaries(mask, mode='inner')] = 1.0
    return np.round(np.concatenate([base, blended], axis=1) * 255).astype(np.uint8)
