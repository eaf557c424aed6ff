"""Checkpoint names, loading (the authors' CUDA-saved legacy pickles included) and atomic saving."""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import UserError
from .files import atomic_save, make_dir
from .networks import EncoderHier

AUTHORS_NAME = 'enchier.pkl'


def fork_name(epochs: int, lambda_value: float, D: int) -> str:
    """The fork's checkpoint name, e.g. `300_0.001_64_enchier.pkl`."""
    return f'{epochs}_{lambda_value}_{D}_{AUTHORS_NAME}'


def classifier_name(encoder_name: str, K: int) -> str:
    """The position classifier saved beside an encoder, e.g. `300_0.001_64_position_classifier_K64.pkl`."""
    return encoder_name.replace(AUTHORS_NAME, f'position_classifier_K{K}.pkl')


def resolve_encoder_path(obj: str, ckpt: str | None, ckpt_dir: str, epochs: int | None,
                         lambda_value: float, D: int) -> Path:
    """--ckpt if given; else ckpts/<obj>/<epochs>_<lambda>_<D>_enchier.pkl with --epochs, else ckpts/<obj>/enchier.pkl."""
    if ckpt:
        path = Path(ckpt).expanduser()
    elif epochs is not None:
        path = Path(ckpt_dir) / obj / fork_name(epochs, lambda_value, D)
    else:
        path = Path(ckpt_dir) / obj / AUTHORS_NAME
    if not path.is_file():
        raise UserError(f'checkpoint {path} not found: train one with main_train.py, pass --ckpt, '
                        f'or put the authors\' enchier.pkl there (see ckpts/README.md)')
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads a state_dict on the CPU; weights_only refuses pickles that would run code."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    # random bytes can also fail deep in the unpickler with IndexError / KeyError (about 1 file in 15)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, IndexError, KeyError,
            TypeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f'{path} is not a loadable PyTorch state_dict ({first_line[:200]})') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path} is not a state_dict (a dict of tensors)')
    return state


def mismatch(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, 'key (file shape) vs (model shape)') of `state` against `module`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def load_into(module: nn.Module, path: Path) -> nn.Module:
    """Loads `path` into `module`, naming any missing, unexpected or mis-shaped keys."""
    state = load_state_dict(path)
    missing, unexpected, shapes = mismatch(module, state)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f'missing keys {", ".join(missing[:4])}{"..." if len(missing) > 4 else ""}')
        if unexpected:
            parts.append(f'unexpected keys {", ".join(unexpected[:4])}{"..." if len(unexpected) > 4 else ""}')
        if shapes:
            parts.append(f'shapes differ (file vs model): {"; ".join(shapes[:3])}')
        raise UserError(f'{path} does not fit {type(module).__name__}: {"; ".join(parts)} '
                        '(check --D and that this is an enchier.pkl)')
    module.load_state_dict(state)
    return module


def load_encoder(path: Path, D: int, device: torch.device | str = 'cpu') -> EncoderHier:
    return load_into(EncoderHier(64, D), path).to(device).eval()


def save_module(module: nn.Module, path: Path) -> None:
    """torch.save(state_dict) through a temporary file, so a crash never leaves half a checkpoint."""
    make_dir(path.parent, 'checkpoint')
    torch_save(path, {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})


def torch_save(path: Path, obj: object) -> None:
    """torch.save through a temporary file. Serialised in memory first: torch turns a failed write to a file
    (a full disk) into an unreadable RuntimeError, and the disk's own error is what the user can act on."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_save(path, lambda f: f.write(buffer.getbuffer()))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()
