"""What clients send, read within limits and decoded; every problem is a BadRequest with a status and a
one-line message naming it. Only bytes from the request are read: never a path a client names."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException
from starlette.requests import Request

from ..mvtecad import to_rgb_array

# Formats main_predict.py reads by extension (mvtecad.IMAGE_EXTENSIONS), as PIL names them.
FORMATS = {'PNG', 'JPEG', 'MPO', 'BMP', 'DIB', 'TIFF'}
IMAGE_TYPES = {'image/png', 'image/jpeg', 'image/jpg', 'image/bmp', 'image/x-bmp', 'image/x-ms-bmp', 'image/tiff'}
# Sent by clients that do not know the type; the decoder then decides.
UNTYPED = {'', 'application/octet-stream'}
MULTIPART = 'multipart/form-data'


class BadRequest(Exception):
    """A client error: answered as {"error": message} with this status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int
    max_pixels: int
    max_files: int


@dataclass
class Upload:
    filename: str
    content_type: str
    data: bytes


def media_type(header: str | None) -> str:
    return (header or '').split(';')[0].strip().lower()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_large = BadRequest(413, f'the upload is larger than the limit of {limit / 2**20:g} MB (--max_upload_mb)')
    declared = request.headers.get('content-length')
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest(400, 'the Content-Length header is not a number')
        if int(declared) > limit:
            raise too_large
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise too_large
        chunks.append(chunk)
    return b''.join(chunks)


async def read_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The images of a request: multipart files (any field name) or one raw image body."""
    kind = media_type(request.headers.get('content-type'))
    body = await read_body(request, limits.max_upload_bytes)
    if kind == MULTIPART:
        uploads = await _multipart(request, body, limits)
    elif kind in IMAGE_TYPES or kind in UNTYPED:
        uploads = [Upload('body', kind, body)]
    else:
        raise BadRequest(415, f'unsupported content type {kind!r}: send an image (image/png, image/jpeg, '
                              'image/bmp, image/tiff) as the body, or multipart/form-data files')
    if not uploads:
        raise BadRequest(400, 'no image in the request: send multipart files or an image body')
    return uploads


async def _multipart(request: Request, body: bytes, limits: Limits) -> list[Upload]:
    async def replay() -> dict:      # the body was read (within the limit) already: hand it to the parser
        return {'type': 'http.request', 'body': body, 'more_body': False}
    try:
        form = await Request(request.scope, replay).form(max_files=limits.max_files, max_fields=limits.max_files)
    except HTTPException as e:          # the parser's own refusals (too many parts, a malformed body)
        if 'too many files' in str(e.detail).lower():
            raise BadRequest(413, f'more files than the limit of {limits.max_files} (--max_files)') from None
        raise BadRequest(400, f'bad multipart body: {e.detail}') from None
    uploads = []
    try:
        for _, value in form.multi_items():
            if isinstance(value, str):
                continue                 # text fields carry no image
            kind = media_type(value.content_type)
            name = value.filename or 'file'
            if kind not in IMAGE_TYPES and kind not in UNTYPED:
                raise BadRequest(415, f'{name}: unsupported content type {kind!r}: send PNG, JPEG, BMP or TIFF')
            uploads.append(Upload(name, kind, await value.read()))
    finally:
        await form.close()
    return uploads


def decode(upload: Upload, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8, as main_predict.py decodes a file; the pixel limit is checked from the header, before
    any pixel is decoded (a decompression bomb costs nothing)."""
    name = upload.filename
    if not upload.data:
        raise BadRequest(422, f'{name}: the file is empty (0 bytes)')
    try:
        with Image.open(io.BytesIO(upload.data)) as im:
            if im.format not in FORMATS:
                raise BadRequest(415, f'{name}: unsupported image format {im.format}: send PNG, JPEG, BMP or TIFF')
            width, height = im.size
            if width * height > max_pixels:
                raise BadRequest(413, f'{name}: {width}x{height} pixels is over the limit of {max_pixels} '
                                      '(--max_pixels)')
            if width == 0 or height == 0:
                raise BadRequest(422, f'{name}: the image has 0 pixels ({width}x{height})')
            im.load()
            return to_rgb_array(im)
    except BadRequest:
        raise
    except Image.DecompressionBombError as e:   # PIL's own limit (2 x its MAX_IMAGE_PIXELS) tripped first
        raise BadRequest(413, f'{name}: over the limit of {max_pixels} pixels (--max_pixels): {e}') from None
    except UnidentifiedImageError:
        raise BadRequest(422, f'{name}: not an image (no known image format in its bytes)') from None
    except Exception as e:   # whatever a decoder raises on a hostile or truncated file
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise BadRequest(422, f'{name}: not a readable image ({detail})') from None
