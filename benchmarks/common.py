"""What the benchmarks share: the repository on the import path, and the class / data / checkpoint flags."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
sys.path.insert(0, str(REPO))


def class_parser(doc: str) -> argparse.ArgumentParser:
    """--obj, --data_root (default $MVTEC_ROOT, else ../shared/data/mvtec), --ckpt, --resize."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--obj', default='bottle')
    parser.add_argument('--data_root', default=os.environ.get('MVTEC_ROOT', str(SHARED / 'data' / 'mvtec')))
    parser.add_argument('--ckpt', default=None, help="default: ../shared/ckpts/<obj>/enchier.pkl (the authors')")
    parser.add_argument('--resize', default='nearest', choices=('nearest', 'bicubic'))
    return parser


def checkpoint_path(args: argparse.Namespace) -> Path:
    return Path(args.ckpt) if args.ckpt else SHARED / 'ckpts' / args.obj / 'enchier.pkl'
