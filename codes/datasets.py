"""Training pairs of patches (SPEC.md, "Training"): position pairs for the self-supervised
classifier and SVDD pairs of nearby patches, zipped index by index into one batch.

Randomness: each item draws from its own generator seeded by (seed, epoch, index), so a run is
repeatable whatever the number of loader workers, and a resumed run draws what an uninterrupted
one would have.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

# The 8 neighbours as (row, col) directions, in the original's order: the position class is the index.
POS_TO_DIFF = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
NOISE_STD = 0.02


def generate_coords(H: int, W: int, K: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniform top-left corner of a KxK patch inside HxW."""
    return int(rng.integers(0, H - K + 1)), int(rng.integers(0, W - K + 1))


def generate_coords_position(H: int, W: int, K: int, rng: np.random.Generator
                             ) -> tuple[tuple[int, int], tuple[int, int], int]:
    """p1 uniform; p2 its neighbour in direction `pos`, 3K/4 + [0, K/4) away per moving axis, clipped."""
    h1, w1 = generate_coords(H, W, K, rng)
    pos = int(rng.integers(8))
    J = K // 4
    h_dir, w_dir = POS_TO_DIFF[pos]
    h_del, w_del = rng.integers(J, size=2)
    # The clip can move p2 off its direction near the border; the original keeps such pairs.
    h2 = int(np.clip(h1 + h_dir * (h_del + 3 * K // 4), 0, H - K))
    w2 = int(np.clip(w1 + w_dir * (w_del + 3 * K // 4), 0, W - K))
    return (h1, w1), (h2, w2), pos


def generate_coords_svdd(H: int, W: int, K: int, rng: np.random.Generator
                         ) -> tuple[tuple[int, int], tuple[int, int]]:
    """p1 uniform; p2 = p1 + a jitter in [-K/32, K/32]^2 other than (0, 0), clipped."""
    h1, w1 = generate_coords(H, W, K, rng)
    J = K // 32
    h_jit = w_jit = 0
    while h_jit == 0 and w_jit == 0:
        h_jit, w_jit = (int(v) for v in rng.integers(-J, J + 1, size=2))
    return (h1, w1), (int(np.clip(h1 + h_jit, 0, H - K)), int(np.clip(w1 + w_jit, 0, W - K)))


def crop_CHW(image: np.ndarray, p: tuple[int, int], K: int) -> np.ndarray:
    h, w = p
    return image[:, h:h + K, w:w + K]


class _PatchPairs(Dataset):
    """N standardised CHW images, each visited `repeat` times per epoch."""

    def __init__(self, x: np.ndarray, K: int = 64, repeat: int = 1, seed: int = 0):
        self.x = np.asarray(x, dtype=np.float32)
        self.K = K
        self.repeat = repeat
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.x) * self.repeat

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, idx: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, self.K, idx])


class PositionDataset(_PatchPairs):
    """(patch1, patch2, pos): patch2 is neighbour `pos` of patch1; both get a colour shift and pixel noise."""

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self.rng(idx)
        image = self.x[idx % len(self.x)]
        _, H, W = image.shape
        p1, p2, pos = generate_coords_position(H, W, self.K, rng)
        patches = []
        for p in (p1, p2):
            patch = crop_CHW(image, p, self.K).copy()
            patch += rng.normal(scale=NOISE_STD, size=(3, 1, 1)).astype(np.float32)          # per-channel shift
            patch += rng.normal(scale=NOISE_STD, size=(3, self.K, self.K)).astype(np.float32)  # per-pixel noise
            patches.append(patch)
        return patches[0], patches[1], np.array(pos)


class SVDD_Dataset(_PatchPairs):
    """(patch1, patch2): two patches a pixel or two apart, no noise."""

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        image = self.x[idx % len(self.x)]
        _, H, W = image.shape
        p1, p2 = generate_coords_svdd(H, W, self.K, self.rng(idx))
        return crop_CHW(image, p1, self.K).copy(), crop_CHW(image, p2, self.K).copy()


class DictionaryConcatDataset(Dataset):
    """Zips equally long datasets index by index: item i is {name: dataset[i]}."""

    def __init__(self, datasets: dict[str, _PatchPairs]):
        lengths = {len(d) for d in datasets.values()}
        if len(lengths) != 1:
            raise ValueError(f'datasets must have one length, got {sorted(lengths)}')
        self.datasets = datasets

    def __len__(self) -> int:
        return len(next(iter(self.datasets.values())))

    def __getitem__(self, idx: int) -> dict[str, tuple]:
        return {name: d[idx] for name, d in self.datasets.items()}

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets.values():
            d.set_epoch(epoch)


def training_datasets(x: np.ndarray, repeat: int, seed: int, with_svdd: bool = True) -> DictionaryConcatDataset:
    """pos_64, pos_32 and (when lambda > 0, as the original) svdd_64, svdd_32 over standardised images x."""
    kinds = [('pos', PositionDataset)] + ([('svdd', SVDD_Dataset)] if with_svdd else [])
    return DictionaryConcatDataset({f'{name}_{K}': cls(x, K=K, repeat=repeat, seed=seed)
                                    for name, cls in kinds for K in (64, 32)})


def to_device(batch: dict[str, tuple], device: torch.device) -> dict[str, tuple]:
    """Moves a batch to `device`, patches in channels-last layout (the encoder's training layout)."""
    return {k: tuple(t.to(device, non_blocking=True, memory_format=torch.channels_last) if t.dim() == 4
                     else t.to(device, non_blocking=True) for t in v) for k, v in batch.items()}
