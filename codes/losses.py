"""The Patch SVDD objective: position-classification cross-entropy at K=64 and K=32, plus lambda times
the SVDD loss (mean L2 distance between the codes of nearby patches) at both sizes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .networks import EncoderHier, PositionClassifier


def encode_together(enc: nn.Module, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One encoder call over concatenated patch batches (the network has no batch statistics,
    so this is the same math as one call per batch, with less overhead)."""
    return enc(torch.cat(xs)).split([len(x) for x in xs])


def position_loss(cls: PositionClassifier, h1: torch.Tensor, h2: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(cls(h1, h2), pos)


def svdd_loss(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    return (h1 - h2).norm(dim=1).mean()


def patch_svdd_losses(enc: EncoderHier, cls_64: PositionClassifier, cls_32: PositionClassifier,
                      batch: dict[str, tuple], lambda_value: float) -> dict[str, torch.Tensor]:
    """Losses of one batch from training_datasets(); 'total' is what is minimised."""
    losses = {}
    for K, encoder, cls in ((64, enc, cls_64), (32, enc.enc, cls_32)):
        a, b, pos = batch[f'pos_{K}']
        svdd = batch.get(f'svdd_{K}')
        if svdd is None:
            h1, h2 = encode_together(encoder, a, b)
        else:
            h1, h2, s1, s2 = encode_together(encoder, a, b, *svdd)
            losses[f'svdd_{K}'] = svdd_loss(s1, s2)
        losses[f'pos_{K}'] = position_loss(cls, h1, h2, pos)
    total = losses['pos_64'] + losses['pos_32']
    if 'svdd_64' in losses:
        total = total + lambda_value * (losses['svdd_64'] + losses['svdd_32'])
    losses['total'] = total
    return losses
