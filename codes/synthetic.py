"""A small synthetic class in MVTec AD layout: striped textures, with drawn defects and their masks.

For the demo and the tests, where no real data can be downloaded.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_save

DEFECTS = ('scratch', 'spot')


def texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Diagonal stripes in a fixed colour pair with slight random phase and noise: an easy 'normal' pattern."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (x + y) / (size / 8) + phase)
    low, high = np.array([40, 70, 110]), np.array([200, 190, 150])
    img = low + stripes[..., None] * (high - low) + rng.normal(0, 6, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws a defect on a copy of `image`; returns it and its 0/255 mask."""
    size = image.shape[0]
    canvas, mask = Image.fromarray(image), Image.new('L', (size, size), 0)
    draw_c, draw_m = ImageDraw.Draw(canvas), ImageDraw.Draw(mask)
    cx, cy = rng.integers(size // 4, 3 * size // 4, size=2)
    r = int(rng.integers(size // 12, size // 7))
    if kind == 'spot':
        box = [int(cx - r), int(cy - r), int(cx + r), int(cy + r)]
        draw_c.ellipse(box, fill=(230, 30, 30))
        draw_m.ellipse(box, fill=255)
    else:
        line = [int(cx - 2 * r), int(cy - r), int(cx + 2 * r), int(cy + r)]
        width = max(2, size // 40)
        draw_c.line(line, fill=(15, 15, 15), width=width)
        draw_m.line(line, fill=255, width=width)
    return np.asarray(canvas), np.asarray(mask)


def save_png(image: np.ndarray, path: Path) -> None:
    atomic_save(path, lambda f: Image.fromarray(image).save(f, format='PNG'))


def make_synthetic_class(root: Path, obj: str = 'synthetic', n_train: int = 10, n_good: int = 4,
                         n_defect: int = 3, size: int = 128, seed: int = 0) -> Path:
    """Writes root/obj/{train/good, test/good, test/<defect>, ground_truth/<defect>} PNGs; returns the class folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / obj
    for sub in ['train/good', 'test/good'] + [f'{d}/{k}' for d in ('test', 'ground_truth') for k in DEFECTS]:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        save_png(texture(rng, size), folder / 'train' / 'good' / f'{i:03d}.png')
    for i in range(n_good):
        save_png(texture(rng, size), folder / 'test' / 'good' / f'{i:03d}.png')
    for kind in DEFECTS:
        for i in range(n_defect):
            image, mask = draw_defect(texture(rng, size), kind, rng)
            save_png(image, folder / 'test' / kind / f'{i:03d}.png')
            save_png(mask, folder / 'ground_truth' / kind / f'{i:03d}_mask.png')
    return folder
