"""Command-line pieces shared by the entry scripts: common flags, checked values, devices, error handling."""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocator import keep_freed_memory
from .backbones import BACKBONES, DEFAULT_BACKBONE, LAYERS
from .checkpoints import load_encoder, resolve_encoder_path
from .errors import UserError
from .files import WRITE_ERRNOS, check_writable, write_error
from .memory_bank import MemoryBank, load_or_build
from .methods import METHODS as METHOD_NAMES
from .mvtecad import RESIZE_FILTERS, ClassFiles, LoadedClass, find_class, load_class, resolve_data_root
from .nearest_neighbor import METHODS
from .networks import EncoderHier
from .reports import note_undefined_metrics
from .state_cache import cache_dir_for, default_cache_dir


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line: `error: argument --epochs: must be at least 1, not 0`."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def _number(text: str, kind: type, minimum: float, strict: bool) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a {"whole number" if kind is int else "number"}') from None
    if value != value or abs(value) == float('inf') or value < minimum or (strict and value == minimum):
        raise argparse.ArgumentTypeError(f'must be {"above" if strict else "at least"} {minimum}, not {text}')
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, strict=False)


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, strict=False)


def positive_float(text: str) -> float:
    return _number(text, float, 0, strict=True)


def non_negative_float(text: str) -> float:
    return _number(text, float, 0, strict=False)


def fraction(text: str) -> float:
    """A number from 0 to 1."""
    value = _number(text, float, 0, strict=False)
    if value > 1:
        raise argparse.ArgumentTypeError(f'must be at most 1, not {text}')
    return value


def add_data_args(parser: argparse.ArgumentParser, obj_help: str = 'class name, e.g. bottle') -> None:
    parser.add_argument('--obj', default='bottle', help=obj_help)
    parser.add_argument('--data_root', default=None,
                        help='folder holding the class folders (MVTec AD layout); default: $MVTEC_ROOT')
    parser.add_argument('--resize', choices=tuple(RESIZE_FILTERS), default='nearest',
                        help="PIL filter for resizing to 256x256: nearest (the authors' Pillow < 7, the paper's "
                             'numbers; default) or bicubic (Pillow >= 7)')


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--D', type=positive_int, default=64, help='embedding dimension (default 64)')
    parser.add_argument('--lambda_value', type=non_negative_float, default=1e-3,
                        help='weight of the SVDD loss (default 1e-3, the authors\' advice)')


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument('--ckpt', default=None, help='encoder checkpoint (enchier.pkl) to load; overrides the rest')
    parser.add_argument('--ckpt_dir', default='ckpts', help='checkpoint folder (default ckpts)')
    parser.add_argument('--epochs', type=positive_int, default=None,
                        help='load <ckpt_dir>/<obj>/<epochs>_<lambda_value>_<D>_enchier.pkl (main_train.py\'s name); '
                             'without it: <ckpt_dir>/<obj>/enchier.pkl (the authors\' name)')


def add_search_args(parser: argparse.ArgumentParser, batch_size: int = 8,
                    batch_help: str = 'images per encoder pass') -> None:
    from .nearest_neighbor import DEFAULT_EPS
    parser.add_argument('--nn', choices=METHODS, default='exact',
                        help='nearest-neighbour search: exact = exact and deterministic at both K (default; pruned '
                             'k-means cells on the CPU, brute force on a GPU); ngt = exact at K=64 and NGT at K=32, '
                             "as the original (the paper's figures); approx = the exact search's cells, stopping "
                             'once no unscanned row can be nearer than 1/(1 + --nn_eps) of the found distance '
                             '(certified; several times faster where the cells barely prune); brute = blockwise '
                             'float64 brute force (slow)')
    parser.add_argument('--nn_eps', type=non_negative_float, default=DEFAULT_EPS,
                        help=f'--nn approx: every distance is at most (1 + eps) times the nearest (default {DEFAULT_EPS})')
    parser.add_argument('--batch_size', type=positive_int, default=batch_size, help=f'{batch_help} (default {batch_size})')
    parser.add_argument('--cache_dir', default=None,
                        help=f'memory bank cache (default {default_cache_dir()}, or $XDG_CACHE_HOME/patchsvdd)')
    parser.add_argument('--no_cache', action='store_true', help='compute the memory bank afresh and keep nothing')


def add_threshold_args(parser: argparse.ArgumentParser) -> None:
    """How a model's decision thresholds are chosen (main_export.py, and main_predict.py without --model)."""
    parser.add_argument('--threshold_from', choices=('normal', 'f1'), default=None,
                        help='normal: a quantile of the training images\' leave-one-out scores; f1: the F1-max '
                             'threshold on the labelled test images (and masks, for pixels). Default: f1 when the '
                             'class has defective test images, else normal')
    parser.add_argument('--normal_quantile', type=fraction, default=1.0,
                        help='quantile of the training images\' leave-one-out scores for the normal threshold '
                             '(default 1.0: their maximum)')
    parser.add_argument('--normal_images', type=positive_int, default=None,
                        help='score only this many training images (evenly spaced) leave-one-out, to bound the '
                             'cost on large classes (default: all)')


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """--method and the flags of the methods on a pre-trained backbone (PSDL, PaDiM, PatchCore)."""
    parser.add_argument('--method', choices=METHOD_NAMES, default='patchsvdd',
                        help='patchsvdd (default; the flags above) or a method on a pre-trained ImageNet backbone')
    parser.add_argument('--backbone', choices=tuple(BACKBONES), default=DEFAULT_BACKBONE,
                        help=f'pre-trained network for psdl / padim / patchcore (default {DEFAULT_BACKBONE}, '
                             'whose weights install with pip)')
    parser.add_argument('--backbone_weights', default=None,
                        help="the backbone's ImageNet weights (torchvision's resnet18-f37072fd.pth or "
                             'wide_resnet50_2-95faca4d.pth); default for efficientnet_lite0: the pip package\'s file')
    parser.add_argument('--psdl_type', choices=('single', 'multiple'), default='single',
                        help='psdl: one layer (single, default) or layers 1-3 pooled onto layer3\'s grid (multiple)')
    parser.add_argument('--layer', choices=LAYERS, default='layer3', help='psdl single: which layer (default layer3)')
    parser.add_argument('--pool_classes', action='store_true',
                        help='psdl: fit one model on every class under the data root (as the PSDL repository does)')
    parser.add_argument('--padim_d', type=positive_int, default=None,
                        help='padim: channels kept (default 100 for resnet18 and efficientnet_lite0, 550 for '
                             'wide_resnet50_2)')
    parser.add_argument('--coreset_ratio', type=positive_float, default=0.01,
                        help='patchcore: fraction of training patches kept in the coreset (default 0.01)')


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda when available, else cpu)')
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')


def encoder_path(args: argparse.Namespace, obj: str | None = None) -> Path:
    return resolve_encoder_path(obj or args.obj, args.ckpt, args.ckpt_dir, args.epochs, args.lambda_value, args.D)


def resolve_inputs(args: argparse.Namespace) -> tuple[torch.device, ClassFiles, Path]:
    """Device, the class's files and the encoder checkpoint, checked in that order before any work."""
    device = resolve_device(args.device)
    files = find_class(resolve_data_root(args.data_root), args.obj)
    return device, files, encoder_path(args)


@dataclass
class Prepared:
    """What an evaluation needs, loaded from the flags."""
    device: torch.device
    ckpt: Path
    enc: EncoderHier
    bank: MemoryBank
    bank_source: str      # 'cached', 'built' or 'rebuilt'
    data: LoadedClass     # test images and masks (training images are in the bank)
    times: dict[str, float]


def prepare(args: argparse.Namespace, outputs: tuple[tuple[Path, str], ...] = ()) -> Prepared:
    """Checks the inputs and that the (folder, what) outputs can be written, then loads the encoder, the
    memory bank (cached when allowed) and the test set. Folders are created only when written to."""
    device, files, ckpt = resolve_inputs(args)
    note_undefined_metrics(files.labels, files.masks)
    for folder, what in outputs:
        check_writable(folder, what)
    cache_dir = cache_dir_for(args.cache_dir, args.no_cache)
    enc = load_encoder(ckpt, args.D, device)
    times: dict[str, float] = {}

    def load_test() -> LoadedClass:
        started = time.perf_counter()
        data = load_class(files, args.resize, train=False)
        times['load_test'] = time.perf_counter() - started
        return data

    # The test set is read while a cached bank is read. A bank that has to be built waits for the test set
    # first: a bad test image stops the run before anything is written.
    with ThreadPoolExecutor(max_workers=1) as reader:
        test = reader.submit(load_test)
        started = time.perf_counter()
        bank, source = load_or_build(enc, ckpt, files, args.resize, device, cache_dir, args.batch_size,
                                     before_build=test.result)
        times['bank'] = time.perf_counter() - started
        data = test.result()
    return Prepared(device, ckpt, enc, bank, source, data, times)


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


def run(main: Callable[[], None], debug: bool = False) -> None:
    """Runs an entry point, turning a UserError into one line on stderr and exit status 2."""
    keep_freed_memory()
    try:
        main()
    except UserError as e:
        if debug:
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(e.exit_code)
    except OSError as e:
        # writes go through files.atomic_open, which names the file; this catches a write elsewhere (a library's)
        if debug or e.errno not in WRITE_ERRNOS:
            raise
        print(f'error: {write_error(None, e)}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)
