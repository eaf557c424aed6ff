"""The Patch SVDD objective: position-classification cross-entropy at K=64 and K=32, plus lambda times
the SVDD loss (mean L2 distance between the codes of nearby patches) at both sizes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .networks import EncoderHier, PositionClassifier


def position_loss(cls: PositionClassifier, h1: torch.Tensor, h2: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(cls(h1, h2), pos)


def svdd_loss(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    return (h1 - h2).norm(dim=1).mean()


def patch_svdd_losses(enc: EncoderHier, cls_64: PositionClassifier, cls_32: PositionClassifier,
                      batch: dict[str, tuple], lambda_value: float) -> dict[str, torch.Tensor]:
    """Losses of one batch from training_datasets(); 'total' is what is minimised.

    Each patch tensor goes through the encoder on its own: measured on a 2-core CPU, one call over
    the concatenated tensors (1,024 quadrant patches at K=64) is slower, as it falls out of cache.
    """
    losses = {}
    for K, encoder, cls in ((64, enc, cls_64), (32, enc.enc, cls_32)):
        a, b, pos = batch[f'pos_{K}']
        losses[f'pos_{K}'] = position_loss(cls, encoder(a), encoder(b), pos)
        if f'svdd_{K}' in batch:
            s1, s2 = batch[f'svdd_{K}']
            losses[f'svdd_{K}'] = svdd_loss(encoder(s1), encoder(s2))
    total = losses['pos_64'] + losses['pos_32']
    if 'svdd_64' in losses:
        total = total + lambda_value * (losses['svdd_64'] + losses['svdd_32'])
    losses['total'] = total
    return {k: losses[k] for k in ('pos_64', 'pos_32', 'svdd_64', 'svdd_32', 'total') if k in losses}
