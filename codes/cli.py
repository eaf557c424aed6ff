"""The entry scripts' flags: common flags and their checked values, and how a run reports a user error.
It holds no method code: what the flags select lives in codes/methods/."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .allocator import keep_freed_memory
from .backbones import BACKBONES, DEFAULT_BACKBONE, LAYERS
from .devices import resolve_device  # noqa: F401  (the entry scripts' cli.resolve_device)
from .errors import UserError
from .files import WRITE_ERRNOS, write_error
from .methods import NAMES as METHOD_NAMES
from .mvtecad import RESIZE_FILTERS
from .nearest_neighbor import METHODS
from .state_cache import default_cache_dir


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (`error: argument --epochs: must be at least 1, not 0`) and
    ends --help with example commands."""

    def __init__(self, *args, examples: tuple[str, ...] = (), **kwargs) -> None:
        if examples:
            kwargs['epilog'] = 'examples:\n' + '\n'.join(f'  {e}' for e in examples)
            kwargs['formatter_class'] = argparse.RawDescriptionHelpFormatter
        super().__init__(*args, **kwargs)

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
                             '(certified; faster where the cells barely prune, 1.2-2.4x at eps 0.2-0.5); brute = blockwise '
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
                        help='normal: a quantile of the training images\' held-out scores (each scored by a model '
                             'that did not see it); f1: the F1-max '
                             'threshold on the labelled test images (and masks, for pixels). Default: f1 when the '
                             'class has defective test images, else normal')
    parser.add_argument('--normal_quantile', type=fraction, default=1.0,
                        help='quantile of the training images\' held-out scores for the normal threshold '
                             '(default 1.0: their maximum)')
    parser.add_argument('--normal_images', type=positive_int, default=None,
                        help='score only this many training images (evenly spaced) held out, to bound the '
                             'cost on large classes (default: all)')


# the method flags' defaults, also what main_predict.py restores where a model file does not decide
METHOD_DEFAULTS = {'method': 'patchsvdd', 'backbone': DEFAULT_BACKBONE, 'backbone_weights': None, 'psdl_type': 'single',
                   'layer': 'layer3', 'pool_classes': False, 'padim_d': None, 'coreset_ratio': 0.01}


def method_list(text: str) -> str:
    """--method for evaluate and visualize: one method, a comma list, or all."""
    names = METHOD_NAMES if text == 'all' else tuple(n.strip() for n in text.split(',') if n.strip())
    unknown = [n for n in names if n not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f'{unknown[0] if unknown else text!r} is not a method: use one of '
                                         f'{", ".join(METHOD_NAMES)}, a comma list of them, or all')
    return ','.join(dict.fromkeys(names))


def methods_of(args: argparse.Namespace) -> list[str]:
    return args.method.split(',')


def add_method_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--method and the flags of the methods on a pre-trained backbone (PSDL, PaDiM, PatchCore). With
    `several`, --method takes a comma list or all."""
    if several:
        parser.add_argument('--method', type=method_list, default=METHOD_DEFAULTS['method'],
                            help=f'{", ".join(METHOD_NAMES)}, a comma list of them, or all (default patchsvdd; '
                                 'the flags above): the methods other than patchsvdd run on a pre-trained '
                                 'ImageNet backbone; with several, patchsvdd is skipped where it has no checkpoint')
    else:
        parser.add_argument('--method', choices=METHOD_NAMES, default=METHOD_DEFAULTS['method'],
                            help='patchsvdd (default; the flags above) or a method on a pre-trained ImageNet backbone')
    parser.add_argument('--backbone', choices=tuple(BACKBONES), default=METHOD_DEFAULTS['backbone'],
                        help=f'pre-trained network for psdl / padim / patchcore (default {DEFAULT_BACKBONE}, '
                             'whose weights install with pip)')
    parser.add_argument('--backbone_weights', default=METHOD_DEFAULTS['backbone_weights'],
                        help="the backbone's ImageNet weights (torchvision's resnet18-f37072fd.pth or "
                             'wide_resnet50_2-95faca4d.pth); default for efficientnet_lite0: the pip package\'s file')
    parser.add_argument('--psdl_type', choices=('single', 'multiple'), default=METHOD_DEFAULTS['psdl_type'],
                        help='psdl: one layer (single, default) or layers 1-3 pooled onto layer3\'s grid (multiple)')
    parser.add_argument('--layer', choices=LAYERS, default=METHOD_DEFAULTS['layer'], help='psdl single: which layer (default layer3)')
    parser.add_argument('--pool_classes', action='store_true',
                        help='psdl: fit one model on every class under the data root (as the PSDL repository does)')
    parser.add_argument('--padim_d', type=positive_int, default=METHOD_DEFAULTS['padim_d'],
                        help='padim: channels kept (default 100 for resnet18 and efficientnet_lite0, 550 for '
                             'wide_resnet50_2)')
    parser.add_argument('--coreset_ratio', type=positive_float, default=METHOD_DEFAULTS['coreset_ratio'],
                        help='patchcore: fraction of training patches kept in the coreset (default 0.01)')


def add_alias(parser: argparse.ArgumentParser, alias: str, dest: str) -> None:
    """An older spelling of a flag, still accepted (not listed in --help)."""
    parser.add_argument(alias, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda when available, else cpu)')
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')


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
