"""What one HTTP request may cost the matcher: its body's size, and an uploaded image's pixels, both checked
before anything is parsed or decoded.

| what               | how                                                                                  |
|--------------------|--------------------------------------------------------------------------------------|
| request bodies     | `BodyLimit` (ASGI middleware): `Content-Length` checked up front, bytes counted as they |
|                    | arrive (chunked uploads too); over `http.max_json_bytes` / `http.max_upload_bytes` (multipart) → 413 |
| image dimensions   | `image_size(data)` (`kernel.images`): (kind, width, height) from a PNG's IHDR or a JPEG's SOF header |
| decoding           | `decode_image(data, name, max_pixels)`: refuses other formats, more than `http.max_image_pixels` |
|                    | (a 100 KB PNG can declare 30,000² pixels: 2.7 GB decoded) and JPEGs of more than `MAX_JPEG_SCANS` |
|                    | scans (10,000 take 13 s of CPU) with a `ValueError` (400) naming the size or the limit |

    app.add_middleware(BodyLimit, max_json=cfg.max_json_bytes, max_upload=cfg.max_upload_bytes)
    image_size(png_bytes)                   # ('PNG', 640, 480)
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import cv2
import numpy as np

from crossview.kernel.images import check_scans, image_size

_DRAIN_S = 10.0  # longest the rest of a refused body is read (and dropped), so its client gets to read the 413


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """BGR pixels of an uploaded JPEG or PNG; `ValueError` naming what is wrong with it."""
    if not data:
        raise ValueError(f"upload {name!r} is empty")
    try:
        kind, width, height = image_size(data)
        if kind == "JPEG":
            check_scans(data)
    except ValueError as e:
        raise ValueError(f"upload {name!r} is {e}") from None
    if width * height > max_pixels:
        raise ValueError(f"upload {name!r} is a {width} x {height} {kind} ({width * height / 1e6:.1f} megapixels); "
                         f"the limit is {max_pixels / 1e6:.1f} (http.max_image_pixels): send a person crop")
    if not width or not height:
        raise ValueError(f"upload {name!r} is a {kind} of {width} x {height} pixels")
    # libjpeg pads a cut-off file with grey instead of failing, so check the end-of-image marker.
    if kind == "JPEG" and not data.rstrip(b"\0\r\n").endswith(b"\xff\xd9"):
        raise ValueError(f"upload {name!r} is a truncated or corrupt JPEG (no end-of-image marker)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None:
        raise ValueError(f"upload {name!r} is a corrupt {kind}: it could not be decoded")
    return image


class BodyTooLarge(Exception):
    """Raised to the app reading a body that outgrew its limit, after the 413 is sent; what it answers is dropped."""


class BodyLimit:
    """ASGI middleware: a request body over its limit gets 413 naming the config key, before the app parses it."""

    def __init__(self, app, max_json: int, max_upload: int, max_model: int = 0, model_path: str = ""):
        self.app, self.max_json, self.max_upload = app, max_json, max_upload
        self.max_model, self.model_path = max_model, model_path

    def _limit(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str]:
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            if self.model_path and scope["path"] == self.model_path:  # an ONNX file is larger than any image
                return self.max_model, "http.max_model_bytes"
            return self.max_upload, "http.max_upload_bytes"
        return self.max_json, "http.max_json_bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        limit, key = self._limit(scope, headers)
        if _declared_length(headers) > limit:
            # A client waiting for "100 Continue" sends nothing more: no body to read past.
            return await _refuse(receive, send, limit, key, drain=b"100-continue" not in headers.get(b"expect", b"").lower())
        seen, refused = 0, False

        async def counting_receive():
            # The app is still reading, so nothing is sent yet: answer 413 here, whatever the app makes of the error.
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                if not refused:
                    refused = True
                    await _refuse(receive, send, limit, key, drain=message.get("more_body", False))
                raise BodyTooLarge
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, counting_receive, unless_refused)
        except BodyTooLarge:
            pass  # answered already


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:  # h11 refuses such a request before it gets here
        return 0


async def _refuse(receive, send, limit: int, key: str, drain: bool) -> None:
    """413, after reading and dropping what the client still sends (for at most _DRAIN_S): a client that is
    still sending when the connection closes sees a reset connection instead of this answer."""
    body = json.dumps({"detail": f"request body larger than {limit} bytes ({key})"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    if drain:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_DRAIN_S):
                while (await receive()).get("more_body"):
                    pass
    await send({"type": "http.response.body", "body": body})
