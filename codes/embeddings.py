"""Dense patch embeddings: one encoder pass per image instead of one per patch (SPEC.md, "Fast equivalents").

`EncoderDeep` has no padding and one stride-2 layer, so on a whole 256x256 image its output (i, j)
is the code of the 32x32 patch whose top-left corner is (2i, 2j). The original's stride-4 grid of
32x32 patches is every second output; a 64x64 patch's four quadrant codes are outputs 16 apart,
so `EncoderHier` over the stride-16 grid is conv1 with dilation 16 and stride 8 on that map.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .mvtecad import standardize
from .networks import NEG_SLOPE, EncoderHier

STRIDE_64 = 16   # the original's evaluation grid strides
STRIDE_32 = 4
# Images per encoder pass on the CPU: a pass over 2 images keeps the convolutions' working set in cache,
# measured 1.6x faster per image than 8 (the same codes, bit for bit); GPUs take the whole batch.
CPU_PASS = 2


def grid_size(K: int, S: int, side: int = 256) -> int:
    return (side - K) // S + 1


@torch.no_grad()
def embed_batch(enc: EncoderHier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of all 64x64 patches at stride 16 and all 32x32 patches at stride 4, NHWD float32."""
    dense = enc.enc(x)                           # (N, D, 113, 113) on 256x256 input
    step = STRIDE_32 // 2                        # the dense map has stride 2 in pixels
    emb32 = dense[:, :, ::step, ::step]
    h = F.conv2d(dense, enc.conv1.weight, enc.conv1.bias, stride=STRIDE_64 // 2, dilation=(enc.K // 2) // 2)
    emb64 = torch.tanh(enc.conv2(F.leaky_relu(h, NEG_SLOPE)))
    return emb64.permute(0, 2, 3, 1), emb32.permute(0, 2, 3, 1)


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def embed_images(enc: EncoderHier, images: np.ndarray, mean: np.ndarray, device: torch.device,
                 batch_size: int = 8, desc: str = 'embed') -> tuple[np.ndarray, np.ndarray]:
    """Standardises and embeds uint8 NHWC images a batch at a time; returns (N,13,13,D) and (N,57,57,D)."""
    enc = enc.eval()
    device = torch.device(device)
    if device.type == 'cpu':
        batch_size = min(batch_size, CPU_PASS)
    side = images.shape[1]
    n, D = len(images), enc.D
    emb64 = np.empty((n, grid_size(64, STRIDE_64, side), grid_size(64, STRIDE_64, side), D), np.float32)
    emb32 = np.empty((n, grid_size(32, STRIDE_32, side), grid_size(32, STRIDE_32, side), D), np.float32)
    with tqdm(total=n, desc=desc, unit='img', leave=False, disable=None) as bar:
        for sl in iter_batches(n, batch_size):
            x = torch.from_numpy(standardize(images[sl], mean)).to(device)
            e64, e32 = embed_batch(enc, x)
            emb64[sl] = e64.cpu().numpy()
            emb32[sl] = e32.cpu().numpy()
            bar.update(sl.stop - sl.start)
    return emb64, emb32
