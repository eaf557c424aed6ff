"""The patch encoders and the position classifier, with the original's module names and state_dict keys.

The authors' `enchier.pkl` files load into `EncoderHier(64, 64)` unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NEG_SLOPE = 0.1


class EncoderDeep(nn.Module):
    """Eight unpadded 3x3 convolutions (the first with stride 2): a 32x32 patch gives a 1x1xD code."""

    def __init__(self, K: int = 32, D: int = 64, bias: bool = True):
        super().__init__()
        channels = [3, 32, 64, 128, 128, 64, 32, 32, D]
        for i in range(8):
            setattr(self, f'conv{i + 1}', nn.Conv2d(channels[i], channels[i + 1], 3, 2 if i == 0 else 1, 0, bias=bias))
        self.K = K
        self.D = D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(1, 8):
            h = F.leaky_relu(getattr(self, f'conv{i}')(h), NEG_SLOPE)
        return torch.tanh(self.conv8(h))


class EncoderHier(nn.Module):
    """A 64x64 patch's four 32x32 quadrants are encoded by `enc`, arranged 2x2, and merged by conv1/conv2."""

    def __init__(self, K: int = 64, D: int = 64, bias: bool = True):
        super().__init__()
        if K != 64:
            raise ValueError(f'EncoderHier supports K=64 (two levels: 64 and 32), not K={K}')
        self.enc = EncoderDeep(K // 2, D, bias=bias)
        self.conv1 = nn.Conv2d(D, 128, 2, 1, 0, bias=bias)
        self.conv2 = nn.Conv2d(128, D, 1, 1, 0, bias=bias)
        self.K = K
        self.D = D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge(quadrant_codes(x, self.enc))

    def merge(self, h: torch.Tensor) -> torch.Tensor:
        """conv1 -> LeakyReLU -> conv2 -> tanh on a map of quadrant codes."""
        return torch.tanh(self.conv2(F.leaky_relu(self.conv1(h), NEG_SLOPE)))


def quadrant_codes(x: torch.Tensor, enc: nn.Module) -> torch.Tensor:
    """Encodes the four KxK/2 quadrants in one call and arranges their codes as a 2x2 map."""
    n, half = x.shape[0], x.shape[-1] // 2
    quads = torch.cat([x[..., :half, :half], x[..., :half, half:], x[..., half:, :half], x[..., half:, half:]])
    h1, h2, h3, h4 = enc(quads).split(n)
    return torch.cat([torch.cat([h1, h2], dim=3), torch.cat([h3, h4], dim=3)], dim=2)


class NormalizedLinear(nn.Module):
    """A linear layer whose weight is divided by its column norms inside no_grad, as the original.

    Because the normalisation runs under no_grad, the weight gets no gradient: only the bias learns.
    Kept that way on purpose, to reproduce the authors' training.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            w = self.weight / self.weight.norm(keepdim=True, dim=0)
        return F.linear(x, w, self.bias)


class PositionClassifier(nn.Module):
    """Predicts which of the 8 neighbours patch 2 is of patch 1, from the difference of their codes."""

    def __init__(self, K: int, D: int, class_num: int = 8):
        super().__init__()
        self.D = D
        self.K = K
        self.fc1 = nn.Linear(D, 128)
        self.act1 = nn.LeakyReLU(NEG_SLOPE)
        self.fc2 = nn.Linear(128, 128)
        self.act2 = nn.LeakyReLU(NEG_SLOPE)
        self.fc3 = NormalizedLinear(128, class_num)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        h = h1.reshape(-1, self.D) - h2.reshape(-1, self.D)
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(h)))))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
