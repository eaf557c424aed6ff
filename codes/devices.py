"""The torch device a run uses: --device as given, else CUDA when present, else the CPU."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device {name!r} is not a device: use cpu, cuda or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name}: CUDA is not available on this machine; use --device cpu')
    return device
