"""Pictures of anomaly maps: per test image, the image with its ground-truth outline beside the map."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from tqdm import tqdm

from .files import atomic_save, make_dir
from .mvtecad import LoadedClass

matplotlib.use('Agg')  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def panel_name(image_path: Path) -> str:
    """`<defect>_<stem>.png`, e.g. broken_large_000.png."""
    return f'{image_path.parent.name}_{image_path.stem}.png'


def save_panels(data: LoadedClass, maps: np.ndarray, out_dir: Path) -> list[Path]:
    """One PNG per test image, each map on its own colour scale (as the original)."""
    make_dir(out_dir, 'output')
    paths = []
    for n, image_path in enumerate(tqdm(data.files.test, desc='pictures', unit='img', leave=False, disable=None)):
        fig, axes = plt.subplots(ncols=2, figsize=(6, 3))
        axes[0].imshow(data.test[n])
        if data.masks is not None and data.masks[n].any():
            axes[0].contour(data.masks[n], levels=[0.5], colors='lime', linewidths=1)
        axes[0].set_title(f'{image_path.parent.name}/{image_path.name}', fontsize=8)
        axes[1].imshow(maps[n], vmin=0, vmax=maps[n].max(), cmap='Reds')
        axes[1].set_title(f'mult map, max {maps[n].max():.3g}', fontsize=8)
        for ax in axes:
            ax.set_axis_off()
        fig.tight_layout()
        path = out_dir / panel_name(image_path)
        atomic_save(path, lambda f: fig.savefig(f, format='png', dpi=100))
        plt.close(fig)
        paths.append(path)
    return paths
