"""Score grids -> image-sized anomaly maps, as the PSDL repository draws them for PSDL, PaDiM and PatchCore."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

SIGMA = 4    # the repository's Gaussian (scipy: mode reflect, truncate 4, so radius 16)


def upsample(scores: np.ndarray | torch.Tensor, size: int, mode: str = 'bicubic') -> np.ndarray:
    """(N, h, w) -> (N, size, size) float64 with torch's interpolation (align_corners=False)."""
    x = torch.as_tensor(scores, dtype=torch.float64)[:, None]
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False)[:, 0].numpy()


def smooth(maps: np.ndarray, sigma: float = SIGMA) -> np.ndarray:
    """A Gaussian per image (not across images), as scipy's gaussian_filter on each 2-D map."""
    return gaussian_filter(maps, sigma=(0, sigma, sigma), mode='reflect', truncate=4.0)
