"""The authors' trained encoders on demand: `python -m codes.pretrained download bottle` (or `all`).

Fetches `ckpts/<obj>/enchier.pkl` from the authors' public repository
(nuclearboy95/Anomaly-Detection-PatchSVDD-PyTorch, branch master) into `<ckpt_dir>/<obj>/enchier.pkl`,
and keeps it only if its SHA-256 is the published file's. Set PATCHSVDD_WEIGHTS_URL to use a mirror
(any URL urllib opens, file:// included) laid out as `<base>/<obj>/enchier.pkl`.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from .checkpoints import AUTHORS_NAME
from .cli import ArgumentParser, run
from .errors import UserError
from .files import make_dir
from .mvtecad import OBJS

DEFAULT_BASE_URL = 'https://github.com/nuclearboy95/Anomaly-Detection-PatchSVDD-PyTorch/raw/master/ckpts'
URL_VARIABLE = 'PATCHSVDD_WEIGHTS_URL'
# SHA-256 of the authors' enchier.pkl files, one per MVTec AD class.
SHA256 = {
    'bottle': 'd8ba97a6a9a19ddfbbcef4a82f15061f5cfa8975fedff457f8b67a2841b69b9b',
    'cable': '5f8192a5f5b760ffeb55ad8485001e851ae5b24ef0794298b9885c8a76e11ada',
    'capsule': '7270e815cc57ee299790f0e0cda02cb3465f735caf705d5931cbebc4aa96b9bd',
    'carpet': '8ce68b109352bed66a6573b224bea86b528e476ec1303557c0bd12a9f660e0b4',
    'grid': '2f18de53c790cef78dfc1f94717bbefe057084389cf58a6ac71b8067b812e44a',
    'hazelnut': '145d20dd505b2086d739b3f3488750e1707a7d57296bfb344c5a12be9b116fc9',
    'leather': '23392e3655e80edf703bc03a9b628ee47b89dbda58609bb4388a9701f56f7074',
    'metal_nut': '1613fb112e3e32e6d568cec09bf4c689ffdf2b4deb29a7590aa6a620db1c9779',
    'pill': '480ff60a8c9c75d488304f3082cc009c8add300d89f7209f168c2a897035e3c6',
    'screw': '3b97375c7fb2495d536a1ac87bc3818c51d01eeb92cca1b6a1c78c77e3810999',
    'tile': '36098f5e46b35ee9ec9c6299d0860742c3c09aa65b1d1807db5cc0b440c18447',
    'toothbrush': 'fd3ec1907d63df5fb6d4e6252bc68a0a17aaf7db4aa86bedca38c134c00c17d3',
    'transistor': '29d2ef7a5f00dd4d9a91221d102e0b70ef5441ecaa8837bda5e5ca2231dbfdab',
    'wood': '6785dd122b81502e4a1d689d41669d785b7f7130586cae3dd184a3b96b48a1d1',
    'zipper': '64dc960ea0012a58e450ac05426e75f192231249ae1e57db497653ea97614205',
}


def url_for(obj: str) -> str:
    base = os.environ.get(URL_VARIABLE) or DEFAULT_BASE_URL
    return f'{base.rstrip("/")}/{obj}/{AUTHORS_NAME}'


def download(obj: str, ckpt_dir: Path) -> Path:
    """Downloads one class's encoder to <ckpt_dir>/<obj>/enchier.pkl, verified; a partial or wrong file never lands."""
    if obj not in SHA256:
        raise UserError(f'no authors\' checkpoint for {obj!r}: choose from {", ".join(OBJS)} or all')
    target = ckpt_dir / obj / AUTHORS_NAME
    make_dir(target.parent, 'checkpoint')
    url = url_for(obj)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f'.{AUTHORS_NAME}.', suffix='.part', dir=target.parent)
    try:
        with os.fdopen(fd, 'wb') as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise UserError(f'cannot download {url}: {getattr(e, "reason", e)}; check the network or set '
                                f'{URL_VARIABLE} to a mirror') from None
            with response, tqdm(total=int(response.headers.get('Content-Length') or 0) or None, unit='B',
                                unit_scale=True, desc=f'{obj}/{AUTHORS_NAME}', leave=False, disable=None) as bar:
                for block in iter(lambda: response.read(1 << 16), b''):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if digest.hexdigest() != SHA256[obj]:
            raise UserError(f'{url} is not the authors\' {obj} checkpoint (SHA-256 {digest.hexdigest()[:16]}... '
                            f'expected {SHA256[obj][:16]}...): refused, nothing written')
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog='python -m codes.pretrained', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=['download'])
    parser.add_argument('obj', help='class name, comma list, or all')
    parser.add_argument('--ckpt_dir', default='ckpts', help='where <obj>/enchier.pkl goes (default ckpts)')
    args = parser.parse_args(argv)
    objs = list(OBJS) if args.obj == 'all' else [o.strip() for o in args.obj.split(',') if o.strip()]

    def fetch_all() -> None:
        for obj in objs:
            print(f'{download(obj, Path(args.ckpt_dir))} (SHA-256 verified)')

    run(fetch_all)


if __name__ == '__main__':
    sys.exit(main())
