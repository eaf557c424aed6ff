"""The FastAPI application: POST /predict (/models/{name}/predict), GET / (the page), /health, /models.

Every client error is a 4xx JSON {"error": "..."} naming the problem; an unexpected failure is a 500
{"error": "internal error"} (the traceback goes to the server's log, never to the client).
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batching import BatchQueue, QueueFull
from .scoring import Scored, open_scorer
from .uploads import BadRequest, Limits, Upload, decode, read_uploads

SETTINGS_ENV = 'PATCHSVDD_SERVE_SETTINGS'    # how main_serve.py hands the settings to uvicorn's worker processes
MAP_FORMATS = ('png', 'npy')
QUERY_NAMES = ('map',)
PAGE = (Path(__file__).with_name('page.html')).read_text(encoding='utf-8')


@dataclass
class Settings:
    models: list[tuple[str, str]]               # (name, model file)
    device: str = 'cpu'
    max_batch: int = 16
    max_wait_ms: float = 2.0
    max_queue: int = 64
    max_upload_mb: float = 20.0
    max_pixels: int = 25_000_000
    max_files: int = 32
    token: str | None = None
    cache_dir: str | None = None

    def limits(self) -> Limits:
        return Limits(int(self.max_upload_mb * 2**20), self.max_pixels, self.max_files)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Settings:
        data = json.loads(text)
        return cls(**{**data, 'models': [tuple(m) for m in data['models']]})


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({'error': message}, status_code=status, headers=headers)


def map_formats(request: Request) -> set[str]:
    """The ?map= values; any other query parameter or value is a 400."""
    unknown = sorted(set(request.query_params) - set(QUERY_NAMES))
    if unknown:
        raise BadRequest(400, f'unknown query parameter {unknown[0]!r}: the only one is map={"|".join(MAP_FORMATS)}')
    wanted = set(request.query_params.getlist('map'))
    bad = sorted(wanted - set(MAP_FORMATS))
    if bad:
        raise BadRequest(400, f'map={bad[0]!r} is not one of {", ".join(MAP_FORMATS)}')
    return wanted


def png_base64(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format='PNG', compress_level=1)   # speed over size, as main_predict
    return base64.b64encode(buffer.getvalue()).decode('ascii')


def npy_base64(score_map: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, score_map.astype(np.float32), allow_pickle=False)       # main_predict's --save_maps npy
    return base64.b64encode(buffer.getvalue()).decode('ascii')


def image_row(scorer, upload: Upload, s: Scored, maps: set[str]) -> dict:
    """A predictions.csv row for one upload (its file name in place of a path), with the maps asked for."""
    row = {'filename': upload.filename, 'score': s.score, 'normalized_score': s.normalized,
           'decision': 'anomalous' if s.anomalous else 'normal', 'anomalous_area': s.area, 'error': None}
    if 'png' in maps:
        row['overlay_png'] = png_base64(scorer.overlay(s))
    if 'npy' in maps:
        row['map_npy'] = npy_base64(s.map)
    return row


def create_app(settings: Settings, open_model: Callable = open_scorer) -> FastAPI:
    """The application; `open_model(name, path, device, batch_size, cache_dir)` is the method seam."""
    limits = settings.limits()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        with contextlib.ExitStack() as stack, ThreadPoolExecutor(1, thread_name_prefix='score') as executor:
            # One scoring thread for all models: the model's own ops use the cores (torch threads).
            app.state.scorers = {name: stack.enter_context(open_model(name, Path(path), settings.device,
                                                                      settings.max_batch, settings.cache_dir))
                                 for name, path in settings.models}
            app.state.queues = {name: BatchQueue(s.score, executor, settings.max_batch, settings.max_wait_ms / 1000,
                                                 settings.max_queue) for name, s in app.state.scorers.items()}
            for queue in app.state.queues.values():
                queue.start()
            app.state.ready = True
            try:
                yield
            finally:
                app.state.ready = False
                for queue in app.state.queues.values():
                    await queue.stop()

    app = FastAPI(title='Patch SVDD inspection service', lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.ready = False

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return error(e.status, e.message, e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail), getattr(e, 'headers', None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, 'bad request: ' + '; '.join(str(x.get('msg', x)) for x in e.errors())[:300])

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return error(500, 'internal error (see the server log)')

    async def require_token(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, given = request.headers.get('authorization', '').partition(' ')
        if scheme.lower() != 'bearer' or not secrets.compare_digest(given.strip().encode(), settings.token.encode()):
            raise BadRequest(401, 'missing or wrong token: send Authorization: Bearer <token>',
                             {'WWW-Authenticate': 'Bearer'})

    @app.get('/health')
    async def health(request: Request) -> JSONResponse:
        if not request.app.state.ready:
            return JSONResponse({'status': 'loading'}, status_code=503)
        return JSONResponse({'status': 'ready', 'models': list(request.app.state.scorers)})

    router = APIRouter(dependencies=[Depends(require_token)])

    @router.get('/', response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @router.get('/models')
    async def models(request: Request) -> dict:
        return {'models': [s.describe() for s in request.app.state.scorers.values()]}

    async def predict_with(request: Request, name: str) -> JSONResponse:
        maps = map_formats(request)
        scorers, queues = request.app.state.scorers, request.app.state.queues
        if name not in scorers:
            raise BadRequest(404, f'no model named {name!r}: loaded are {", ".join(scorers)}')
        scorer, queue = scorers[name], queues[name]
        busy = BadRequest(503, f'the server is busy ({settings.max_queue} requests waiting): retry shortly',
                          {'Retry-After': '1'})
        if queue.queue.full():         # before spending time on the upload
            raise busy
        with queue.arriving():
            uploads = await read_uploads(request, limits)
            if len(uploads) > limits.max_files:
                raise BadRequest(413, f'{len(uploads)} files is over the limit of {limits.max_files} (--max_files)')
            images = await anyio.to_thread.run_sync(
                lambda: np.stack([scorer.prepare(decode(u, limits.max_pixels)) for u in uploads]))
            try:
                answer = queue.put(images)
            except QueueFull:
                raise busy from None
        results = await answer
        rows = await anyio.to_thread.run_sync(lambda: [image_row(scorer, u, s, maps) for u, s in zip(uploads, results)])
        return JSONResponse({'model': name, 'method': scorer.method, 'thresholds': scorer.thresholds.to_dict(),
                             'images': rows})

    @router.post('/predict')
    async def predict(request: Request) -> JSONResponse:
        names = list(request.app.state.scorers)
        if len(names) > 1:
            raise BadRequest(400, f'several models are loaded: POST to /models/{{name}}/predict, name one of '
                                  f'{", ".join(names)}')
        return await predict_with(request, names[0])

    @router.post('/models/{name}/predict')
    async def predict_named(request: Request, name: str) -> JSONResponse:
        return await predict_with(request, name)

    app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory in each worker process (--workers N): the settings come from main_serve.py."""
    return create_app(Settings.from_json(os.environ[SETTINGS_ENV]))
