"""Serve model files over HTTP: `python main_serve.py --model bottle.safetensors [--model name=other.safetensors]`.

POST /predict (or /models/<name>/predict with several models): multipart image files or one raw image
body; answers JSON per image (score, normalised score, decision, anomalous area; ?map=png adds the
heat-map overlay, ?map=npy the raw map, both base64). GET / is a page to drop images into; GET /health
and GET /models describe the server. Binds 127.0.0.1 by default; --token requires `Authorization:
Bearer <token>` on every route but /health, and a non-loopback --host needs it (or --insecure).
Exit status: 2 a usage error (bad flags, an unreadable model file).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from codes import cli, model_file
from codes.errors import UserError
from codes.service.app import SETTINGS_ENV, Settings, create_app

TOKEN_ENV = 'PATCHSVDD_TOKEN'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog='main_serve.py', description=__doc__, examples=(
        'python main_serve.py --model=bottle.safetensors    # then open http://127.0.0.1:8000/',
        'python main_serve.py --model bottle=bottle.safetensors --model cable=cable.safetensors --workers=2',
        'PATCHSVDD_TOKEN=secret python main_serve.py --model=bottle.safetensors --host=0.0.0.0'))
    parser.add_argument('--model', action='append', required=True,
                        help='a model file from main_export.py, or name=file; repeat for several models '
                             '(the name defaults to the file name without .safetensors)')
    parser.add_argument('--host', default='127.0.0.1', help='address to bind (default 127.0.0.1: this machine only)')
    parser.add_argument('--port', type=int, default=8000)
    parser.add_argument('--workers', type=int, default=1, help='processes, each loading the models (default 1)')
    parser.add_argument('--max_batch', type=int, default=16, help='most images scored together (default 16)')
    parser.add_argument('--max_wait_ms', type=float, default=2.0,
                        help='longest a request waits for others to share its batch (default 2)')
    parser.add_argument('--max_queue', type=int, default=64,
                        help='requests waiting per model; past it, 503 with Retry-After (default 64)')
    parser.add_argument('--max_upload_mb', type=float, default=20.0, help='largest request body (default 20; 413)')
    parser.add_argument('--max_pixels', type=int, default=25_000_000,
                        help='largest image in pixels, checked before decoding (default 25e6; 413)')
    parser.add_argument('--max_files', type=int, default=32, help='most images per request (default 32)')
    parser.add_argument('--token', default=None,
                        help=f'require Authorization: Bearer <token> (or set {TOKEN_ENV}, which ps does not show)')
    parser.add_argument('--insecure', action='store_true', help='allow a non-loopback --host without a token')
    parser.add_argument('--log_level', default='info', choices=('critical', 'error', 'warning', 'info', 'debug'))
    cli.add_run_args(parser)
    return parser.parse_args(argv)


def model_names(values: list[str]) -> list[tuple[str, str]]:
    """(name, file) pairs from --model values; names must be unique and URL-safe."""
    pairs = []
    for value in values:
        name, sep, path = value.partition('=')
        if not sep or '/' in name or not name:
            name, path = Path(value).name.removesuffix('.safetensors'), value
        if not name.replace('-', '').replace('_', '').replace('.', '').isalnum():
            raise UserError(f'--model {value}: the name {name!r} must be letters, digits, - _ or . '
                            '(give name=file)')
        pairs.append((name, str(Path(path).expanduser())))
    names = [n for n, _ in pairs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UserError(f'two models are named {duplicate!r}: give them names, --model name=file')
    return pairs


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> Settings:
    for flag in ('workers', 'max_batch', 'max_queue', 'max_pixels', 'max_files'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, not {getattr(args, flag)}')
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise UserError('--max_wait_ms must be >= 0 and --max_upload_mb > 0')
    if not 0 <= args.port <= 65535:
        raise UserError(f'--port must be 0..65535, not {args.port}')
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and token is None and not args.insecure:
        raise UserError(f'--host {args.host} is reachable from other machines: give --token (or {TOKEN_ENV}), '
                        'or --insecure to serve without one')
    models = model_names(args.model)
    for _, path in models:      # fail here, in one line, rather than in every worker's startup
        model_file.load_model(Path(path))
    device = cli.resolve_device(args.device)
    return Settings(models=models, device=str(device), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                    max_queue=args.max_queue, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels,
                    max_files=args.max_files, token=token)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    settings = check_args(args)
    common = {'host': args.host, 'port': args.port, 'log_level': args.log_level}
    if args.workers == 1:
        uvicorn.run(create_app(settings), **common)
    else:
        # Worker processes build the app themselves, from the settings in their environment.
        os.environ[SETTINGS_ENV] = settings.to_json()
        uvicorn.run('codes.service.app:app_from_env', factory=True, workers=args.workers, **common)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run(lambda: run(args), args.debug)


if __name__ == '__main__':
    main()
