"""What a run over several classes or methods covers (`--obj` a comma list or all, `--method` a comma list
or all), for main_evaluate.py and main_visualize.py alike."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .cli import methods_of
from .errors import UserError
from .methods.patchsvdd import encoder_path
from .mvtecad import requested_classes, resolve_data_root


def several_classes(args: argparse.Namespace) -> bool:
    return args.obj == 'all' or ',' in args.obj


def classes(args: argparse.Namespace) -> list[str]:
    """--obj's classes found under the data root; the missing ones are named in one line, none found is an error."""
    if not several_classes(args):
        return [args.obj]
    present, missing = requested_classes(resolve_data_root(args.data_root), args.obj)
    if missing:
        print(f'not found under the data root, skipped: {", ".join(missing)}')
    if not present:
        raise UserError(f'none of the classes {args.obj!r} is under the data root')
    return present


def each(runs: list[tuple[str, argparse.Namespace]], work: Callable[[argparse.Namespace], object]) -> tuple[list, list[str]]:
    """work(flags) for each (label, flags), `== label` printed before each; one run's UserError is printed and
    the others go on. Returns (what each successful run gave, the failed runs' labels)."""
    done, failed = [], []
    for label, flags in runs:
        print(f'== {label}')
        try:
            done.append(work(flags))
        except UserError as e:
            print(f'error: {e}', file=sys.stderr)
            failed.append(label)
    return done, failed


def check_failures(failed: list[str], total: int, what: str) -> None:
    if failed:
        raise UserError(f'{len(failed)} of {total} {what} failed: {", ".join(failed)} (see above)')


def method_runs(args: argparse.Namespace, obj: str) -> list[argparse.Namespace]:
    """One set of flags per --method for class `obj`. Comparing methods, Patch SVDD runs only where it has a
    checkpoint (said in one line); alone, a missing checkpoint is its run's error as usual."""
    names = methods_of(args)
    runs = []
    for method in names:
        one = argparse.Namespace(**{**vars(args), 'obj': obj, 'method': method})
        if method == 'patchsvdd' and len(names) > 1:
            try:
                encoder_path(one)
            except UserError as e:
                print(f'skipped patchsvdd: {e}')
                continue
        runs.append(one)
    return runs
