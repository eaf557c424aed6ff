"""The portable model file: everything prediction needs, in one safetensors file, loaded without pickle.

Tensors: the encoder's weights (`encoder.<state_dict key>`), the training mean image (`mean`) and the
memory bank (`emb64` (N,13,13,D), `emb32` (N,57,57,D)). The safetensors header's metadata holds one
JSON document under `patchsvdd`: the format name and version, D, the resize filter, the search
method, the thresholds and normalisation, the source checkpoint's SHA-256, and a CRC-32 per tensor,
so that damaged bytes (which safetensors itself does not check) are caught on load.

Seam for the search index: tensors named `index.<name>` are read into Model.index and handed to the
search untouched; none are written yet (today's indices are rebuilt on load or cached beside).
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from .errors import UserError
from .files import atomic_open, check_writable, make_dir
from .mvtecad import RESIZE_FILTERS
from .networks import EncoderHier
from .thresholds import Thresholds

FORMAT = 'patchsvdd-model'
FORMAT_VERSION = 1
METADATA_KEY = 'patchsvdd'
ENCODER_PREFIX = 'encoder.'
INDEX_PREFIX = 'index.'
BANK_ARRAYS = ('mean', 'emb64', 'emb32')


@dataclass
class Model:
    """A class's predictor: encoder weights, memory bank, thresholds, and where it came from."""
    D: int
    resize: str
    nn: str                                   # the search the thresholds were computed with
    encoder: dict[str, np.ndarray]            # EncoderHier state_dict as float32 arrays
    mean: np.ndarray                          # (256,256,3) float32 training mean image
    emb64: np.ndarray                         # (N,13,13,D) float32
    emb32: np.ndarray                         # (N,57,57,D) float32
    thresholds: Thresholds
    info: dict = field(default_factory=dict)  # obj, checkpoint, checkpoint_sha256, counts, export settings
    index: dict[str, np.ndarray] = field(default_factory=dict)   # search index arrays (none yet)
    ngt32: Path | None = None                 # a K=32 NGT index already on disk for this bank (not stored)

    def encoder_module(self, device: torch.device | str = 'cpu') -> EncoderHier:
        enc = EncoderHier(64, self.D)
        enc.load_state_dict({k: torch.from_numpy(v) for k, v in self.encoder.items()})
        return enc.to(device).eval()

    @property
    def bank_id(self) -> str:
        """Identifies the memory bank's contents (from its CRCs), e.g. to name a search index cached beside."""
        return self.info.get('bank_id', '')


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B'))


def tensors_of(model: Model) -> dict[str, np.ndarray]:
    tensors = {f'{ENCODER_PREFIX}{k}': np.ascontiguousarray(v, np.float32) for k, v in model.encoder.items()}
    tensors.update({name: np.ascontiguousarray(getattr(model, name), np.float32) for name in BANK_ARRAYS})
    tensors.update({f'{INDEX_PREFIX}{k}': np.ascontiguousarray(v) for k, v in model.index.items()})
    return tensors


def save_model(model: Model, path: Path) -> None:
    """Writes the model through a temporary file renamed into place: a crash never leaves half a model."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f'--out {path} is a folder: give a file name, e.g. {path / "model.safetensors"}')
    make_dir(path.parent, 'model')
    tensors = tensors_of(model)
    crcs = {name: crc32(t) for name, t in tensors.items()}
    bank_crcs = ''.join(f'{crcs[name]:08x}' for name in BANK_ARRAYS)
    meta = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'D': model.D, 'resize': model.resize, 'nn': model.nn,
            'thresholds': model.thresholds.to_dict(), 'info': {**model.info, 'bank_id': bank_crcs}, 'crc32': crcs}
    blob = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    umask = os.umask(0)
    os.umask(umask)
    with atomic_open(path, 'wb') as f:
        f.write(blob)
        os.fchmod(f.fileno(), 0o666 & ~umask)    # a file to share: the umask's mode, not the temp file's 0600
    model.info['bank_id'] = bank_crcs


def check_model_path(path: Path) -> None:
    if not Path(path).is_file():
        raise UserError(f'model file {path} not found: write one with main_export.py --out {path}')


def load_model(path: Path, D: int | None = None) -> Model:
    """Reads and checks a model file; any problem is one UserError naming the file and what to do."""
    path = Path(path)
    check_model_path(path)
    redo = 'write it again with main_export.py'
    try:
        with safe_open(str(path), 'np') as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            meta = _metadata(path, raw)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise UserError(f'{path} is not a Patch SVDD model file, or it is truncated or damaged ({e}); {redo}') from None
    except OSError as e:
        raise UserError(f'cannot read model file {path}: {e.strerror or e}') from None
    expected_crcs = meta.get('crc32', {})
    if set(expected_crcs) != set(tensors):
        raise UserError(f'model file {path} is damaged (its tensors do not match its table); {redo}')
    bad = [name for name, t in tensors.items() if crc32(t) != expected_crcs[name]]
    if bad:
        raise UserError(f'model file {path} is damaged (checksum mismatch in {", ".join(bad[:3])}); {redo}')
    try:
        model = Model(D=int(meta['D']), resize=str(meta['resize']), nn=str(meta['nn']),
                      encoder={k[len(ENCODER_PREFIX):]: v for k, v in tensors.items() if k.startswith(ENCODER_PREFIX)},
                      mean=tensors['mean'], emb64=tensors['emb64'], emb32=tensors['emb32'],
                      thresholds=Thresholds.from_dict(meta['thresholds']), info=dict(meta.get('info', {})),
                      index={k[len(INDEX_PREFIX):]: v for k, v in tensors.items() if k.startswith(INDEX_PREFIX)})
        _check_shapes(model)
        model.encoder_module()     # the weights must fit the network
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f'model file {path} is damaged or inconsistent ({str(e).splitlines()[0][:160]}); {redo}') from None
    if D is not None and D != model.D:
        raise UserError(f'model file {path} has D={model.D} but --D {D} was given: drop --D or use a model of D={D}')
    return model


def _metadata(path: Path, raw: str | None) -> dict:
    if raw is None:
        raise UserError(f'{path} is a safetensors file but not a Patch SVDD model (no "{METADATA_KEY}" metadata); '
                        'write one with main_export.py')
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UserError(f'model file {path} is damaged (its metadata is not JSON); write it again with main_export.py') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT or not isinstance(meta.get('format_version'), int):
        raise UserError(f'{path} is not a Patch SVDD model file (format {meta.get("format") if isinstance(meta, dict) else None!r}); '
                        'write one with main_export.py')
    if meta['format_version'] > FORMAT_VERSION:
        raise UserError(f'model file {path} has format version {meta["format_version"]}, newer than this program '
                        f'reads ({FORMAT_VERSION}): update Patch SVDD, or export the model again with this version')
    return meta


def _check_shapes(model: Model) -> None:
    n, D = model.emb64.shape[0], model.D
    if model.resize not in RESIZE_FILTERS:
        raise ValueError(f'unknown resize filter {model.resize!r}')
    if model.mean.shape != (256, 256, 3):
        raise ValueError(f'mean image of shape {model.mean.shape}')
    if model.emb64.shape[1:] != (13, 13, D) or model.emb32.shape != (n, 57, 57, D):
        raise ValueError(f'memory bank shapes {model.emb64.shape} and {model.emb32.shape} do not fit D={D}')


def check_output(path: Path) -> None:
    """Fails now if the model file could not be written later; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f'--out {path} is a folder: give a file name, e.g. {path / "model.safetensors"}')
    check_writable(path.parent, 'model')
