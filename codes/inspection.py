"""Evaluation: embed train and test patches, score test patches by nearest-neighbour distance, turn
the patch scores into 256x256 maps (K64, K32, sum, mult) and measure detection and segmentation AUROC."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics, reports
from .embeddings import STRIDE_32, STRIDE_64, embed_images
from .memory_bank import MemoryBank
from .mvtecad import IMAGE_SIZE, LoadedClass
from .errors import UserError
from .nearest_neighbor import DEFAULT_EPS, METHODS
from .networks import EncoderHier

MAP_NAMES = ('64', '32', 'sum', 'mult')


@dataclass
class Evaluation:
    patch_scores: dict[str, np.ndarray]      # '64': (N,13,13), '32': (N,57,57)
    maps: dict[str, np.ndarray]              # MAP_NAMES -> (N,256,256) float64
    times: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)   # MAP_NAMES -> map_metrics()

    @property
    def aurocs(self) -> dict[str, float | None]:
        """det_64, seg_64, ... det_mult, seg_mult, as the original reports them (seg None without masks)."""
        return {f'{kind}_{name}': self.metrics[name][kind] for name in MAP_NAMES for kind in ('det', 'seg')}


def coverage(side: int, K: int, S: int, n: int) -> np.ndarray:
    """(side, n) indicator: pixel row y lies in patch row i (i*S <= y < i*S + K)."""
    y = np.arange(side)[:, None]
    start = np.arange(n)[None, :] * S
    return ((y >= start) & (y < start + K)).astype(np.float64)


def distribute_scores(scores: np.ndarray, K: int, S: int, side: int = IMAGE_SIZE) -> np.ndarray:
    """Each pixel gets the mean score of the KxK patches covering it: a box-filter sum over a box-filter count."""
    rows, cols = coverage(side, K, S, scores.shape[1]), coverage(side, K, S, scores.shape[2])
    total = rows @ scores.astype(np.float64) @ cols.T
    count = np.outer(rows.sum(1), cols.sum(1))
    return total / np.maximum(count, 1)


def score_maps(scores64: np.ndarray, scores32: np.ndarray) -> dict[str, np.ndarray]:
    m64 = distribute_scores(scores64, 64, STRIDE_64)
    m32 = distribute_scores(scores32, 32, STRIDE_32)
    return {'64': m64, '32': m32, 'sum': m64 + m32, 'mult': m64 * m32}


def aurocs(maps: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray | None) -> dict[str, float | None]:
    """The original's eight figures only (det_64, seg_64, ... det_mult, seg_mult)."""
    out: dict[str, float | None] = {}
    for name in MAP_NAMES:
        out[f'det_{name}'] = metrics.detection_auroc(labels, maps[name])
        out[f'seg_{name}'] = metrics.segmentation_auroc(masks, maps[name]) if masks is not None else None
    return out


def assess(maps: dict[str, np.ndarray], labels: np.ndarray, masks: np.ndarray | None
           ) -> dict[str, dict[str, float | None]]:
    """Every metric of every map, the maps in parallel (NumPy's sorts and sums release the GIL)."""
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        found = pool.map(lambda name: metrics.map_metrics(labels, masks, maps[name]), MAP_NAMES)
        return dict(zip(MAP_NAMES, found))


def search_methods(nn: str) -> tuple[str, str]:
    """(K=64 method, K=32 method) for --nn; an unknown method is refused. `ngt` is the original's pairing:
    exact at K=64, NGT at K=32."""
    if nn not in METHODS:
        raise UserError(f'--nn must be one of {", ".join(METHODS)}, not {nn!r}')
    return ('exact', 'ngt') if nn == 'ngt' else (nn, nn)


def anomaly_maps(enc: EncoderHier, bank: MemoryBank, test_images: np.ndarray, nn: str = 'exact',
                 device: torch.device | str = 'cpu', batch_size: int = 8, eps: float = DEFAULT_EPS) -> Evaluation:
    """Patch scores of the test images against the memory bank, and the four maps (metrics left empty).

    The K=32 search (its cell index read from the bank's cache entry, or built) is made ready on a
    background thread while the test set is embedded: nothing waits on either until the K=32 queries.
    Only the exact search on the CPU goes there: its readying is NumPy and faiss work that never changes
    torch's thread count (the embedding's K=64 codes depend on it bit for bit); NGT's build holds the
    interpreter and CUDA needs no index."""
    times: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = now - clock
        clock = now

    def ready(K: str, method: str):
        started = time.perf_counter()
        search = bank.search(K, method, device, background=True, eps=eps)
        times[f'nn{K}_index'] = time.perf_counter() - started
        return search

    device = torch.device(device)
    method64, method32 = search_methods(nn)
    overlap = method32 in ('exact', 'approx') and device.type != 'cuda'
    with ThreadPoolExecutor(max_workers=1) as background:
        pending32 = background.submit(ready, '32', method32) if overlap else None
        te64, te32 = embed_images(enc, test_images, bank.mean, device, batch_size, desc='embed test')
        lap('embed_test')
        s64 = bank.distances('64', te64, method64, device, eps)
        lap('nn64')
        if pending32 is not None:
            pending32.result()
        s32 = bank.distances('32', te32, method32, device, eps)
        lap('nn32')   # with the overlap: what was left of readying the index, and the queries
    maps = score_maps(s64, s32)
    lap('maps')
    return Evaluation({'64': s64, '32': s32}, maps, times)


def evaluate(enc: EncoderHier, bank: MemoryBank, data: LoadedClass, nn: str = 'exact',
             device: torch.device | str = 'cpu', batch_size: int = 8, eps: float = DEFAULT_EPS) -> Evaluation:
    """The original's `eval_encoder_NN_multiK`: the maps and all their metrics."""
    result = anomaly_maps(enc, bank, data.test, nn, device, batch_size, eps)
    started = time.perf_counter()
    result.metrics = assess(result.maps, data.files.labels, data.masks)
    result.times['metrics'] = time.perf_counter() - started
    return result


def result_line(aurocs: dict[str, float | None], obj: str) -> str:
    """The original's output line: `|K64| Det: 98.3 Seg: 96.0 |K32| ... (bottle)`."""
    return reports.result_line({('K' + n if n in ('64', '32') else n): (aurocs[f'det_{n}'], aurocs[f'seg_{n}'])
                                for n in MAP_NAMES}, obj)
