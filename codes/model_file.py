"""The portable model file: everything prediction needs, in one safetensors file, loaded without pickle.

Format version 2 holds any of the four methods. Tensors: the network's weights (`weights.<state_dict
key>`: Patch SVDD's encoder, or the layers a backbone method uses, without layer4 and the classifier),
the method's fitted state (`state.<name>`: Patch SVDD's mean image and memory bank, PSDL's dictionaries
and statistics, PaDiM's Gaussians, PatchCore's coreset) and the exact search's cell indexes
(`index.<name>`). The safetensors header's metadata holds one JSON document under `patchsvdd`: the
format name and version, the method, its settings, the preprocessing, the thresholds and normalisation,
the weights' SHA-256, provenance, and a CRC-32 per tensor, so that damaged bytes (which safetensors
itself does not check) are caught on load.

Version 1 files (Patch SVDD only: `encoder.*`, `mean`, `emb64`, `emb32`, `index.*`, D / resize / nn at
the top of the metadata) still load. A reader of version 1 refuses a version 2 file with one line
saying to update.
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

from .backbones import weights_sha256
from .errors import UserError
from .files import atomic_open, check_writable, make_dir
from .methods import NAMES
from .mvtecad import RESIZE_FILTERS
from .networks import EncoderHier
from .thresholds import Thresholds

FORMAT = 'patchsvdd-model'
FORMAT_VERSION = 2
METADATA_KEY = 'patchsvdd'
WEIGHTS_PREFIX, STATE_PREFIX, INDEX_PREFIX = 'weights.', 'state.', 'index.'
V1_ENCODER_PREFIX = 'encoder.'
BANK_ARRAYS = ('mean', 'emb64', 'emb32')


@dataclass
class Model:
    """A class's predictor: the method, its settings, network weights and fitted state, thresholds, provenance.

    `preprocessing`: {'resize': PIL filter, 'size': 256, 'crop': 224 or None}: Patch SVDD squashes to
    256x256; the backbone methods resize the short side to 256 and crop the centre 224x224."""
    method: str
    settings: dict                            # patchsvdd: D, nn; others: backbone and the method's settings
    preprocessing: dict
    weights: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    thresholds: Thresholds
    info: dict = field(default_factory=dict)  # obj, checkpoint or backbone file, SHA-256s, counts, export settings
    index: dict[str, np.ndarray] = field(default_factory=dict)   # the exact search's cell indexes
    ngt32: Path | None = None                 # a K=32 NGT index already on disk for this bank (not stored)

    @classmethod
    def patchsvdd(cls, D: int, resize: str, nn: str, encoder: dict[str, np.ndarray], mean: np.ndarray,
                  emb64: np.ndarray, emb32: np.ndarray, thresholds: Thresholds, info: dict | None = None,
                  index: dict[str, np.ndarray] | None = None, ngt32: Path | None = None) -> Model:
        return cls('patchsvdd', {'D': D, 'nn': nn}, {'resize': resize, 'size': 256, 'crop': None}, encoder,
                   {'mean': mean, 'emb64': emb64, 'emb32': emb32}, thresholds, info or {}, index or {}, ngt32)

    # Patch SVDD's fields by their names
    D = property(lambda self: int(self.settings['D']))
    nn = property(lambda self: self.settings.get('nn', 'exact'))
    resize = property(lambda self: self.preprocessing['resize'])
    encoder = property(lambda self: self.weights)
    mean = property(lambda self: self.state['mean'])
    emb64 = property(lambda self: self.state['emb64'])
    emb32 = property(lambda self: self.state['emb32'])

    def encoder_module(self, device: torch.device | str = 'cpu') -> EncoderHier:
        enc = EncoderHier(64, self.D)
        enc.load_state_dict({k: torch.from_numpy(v) for k, v in self.weights.items()})
        return enc.to(device).eval()

    @property
    def bank_id(self) -> str:
        """Identifies the memory bank's contents (from its CRCs), e.g. to name a search index cached beside."""
        return self.info.get('bank_id', '')


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast('B'))


def tensors_of(model: Model) -> dict[str, np.ndarray]:
    tensors = {f'{WEIGHTS_PREFIX}{k}': np.ascontiguousarray(v) for k, v in model.weights.items()}
    tensors.update({f'{STATE_PREFIX}{k}': np.ascontiguousarray(v) for k, v in model.state.items()})
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
    info = dict(model.info)
    if model.method == 'patchsvdd':
        info['bank_id'] = ''.join(f'{crcs[STATE_PREFIX + name]:08x}' for name in BANK_ARRAYS)
    meta = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'method': model.method, 'settings': model.settings,
            'preprocessing': model.preprocessing, 'thresholds': model.thresholds.to_dict(),
            'weights_sha256': weights_sha256(model.weights), 'info': info, 'crc32': crcs}
    blob = safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(meta)})
    umask = os.umask(0)
    os.umask(umask)
    with atomic_open(path, 'wb') as f:
        f.write(blob)
        os.fchmod(f.fileno(), 0o666 & ~umask)    # a file to share: the umask's mode, not the temp file's 0600
    model.info.update(info)


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
        model = _from_v1(meta, tensors) if meta['format_version'] == 1 else _from_v2(meta, tensors)
        if model.method not in NAMES:
            raise ValueError(f'unknown method {model.method!r}')
        if meta['format_version'] >= 2 and weights_sha256(model.weights) != meta['weights_sha256']:
            raise UserError(f'model file {path}: its network weights\' SHA-256 {weights_sha256(model.weights)[:12]}... '
                            f'does not match the recorded {str(meta["weights_sha256"])[:12]}...; the weights were '
                            f'changed after export: {redo}')
        if model.method == 'patchsvdd':
            _check_shapes(model)
            model.encoder_module()     # the weights must fit the network
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise UserError(f'model file {path} is damaged or inconsistent ({str(e).splitlines()[0][:160]}); {redo}') from None
    if D is not None and model.method == 'patchsvdd' and D != model.D:
        raise UserError(f'model file {path} has D={model.D} but --D {D} was given: drop --D or use a model of D={D}')
    return model


def _strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _from_v1(meta: dict, tensors: dict[str, np.ndarray]) -> Model:
    return Model.patchsvdd(int(meta['D']), str(meta['resize']), str(meta['nn']), _strip(tensors, V1_ENCODER_PREFIX),
                           tensors['mean'], tensors['emb64'], tensors['emb32'], Thresholds.from_dict(meta['thresholds']),
                           dict(meta.get('info', {})), _strip(tensors, INDEX_PREFIX))


def _from_v2(meta: dict, tensors: dict[str, np.ndarray]) -> Model:
    if not isinstance(meta['settings'], dict) or not isinstance(meta['preprocessing'], dict):
        raise ValueError('settings and preprocessing must be JSON objects')
    return Model(str(meta['method']), meta['settings'], meta['preprocessing'], _strip(tensors, WEIGHTS_PREFIX),
                 _strip(tensors, STATE_PREFIX), Thresholds.from_dict(meta['thresholds']), dict(meta.get('info', {})),
                 _strip(tensors, INDEX_PREFIX))


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
    if not set(BANK_ARRAYS) <= set(model.state):
        raise ValueError(f'the memory bank arrays {", ".join(BANK_ARRAYS)} are missing')
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
