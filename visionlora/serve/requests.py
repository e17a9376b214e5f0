"""Checking and decoding ``POST /predict`` requests: ``{"task", "image" (base64 PNG or JPEG), "top_k"}``.

A bad request must be answered on its own: LitServe's batched loop (0.2.19) answers every request of a batch with
the error when ``decode_request`` raises for one of them. So :class:`RequestCheck`, an ASGI middleware in the HTTP
process, checks each request fully (JSON, fields, task, base64, size, pixels, decoding) before it is queued and
answers a bad one with its 4xx and ``{"detail": message}``, like FastAPI's ``HTTPException``; the inference worker
decodes the same request again with the same function (:func:`parse_request`), which then cannot fail.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionlora.data.common import to_rgb_array

DEFAULT_MAX_BYTES = 8 * 1024 * 1024  # of the decoded image file
DEFAULT_MAX_PIXELS = 25_000_000  # width x height
DEFAULT_TOP_K = 3
FORMATS = ("PNG", "JPEG")
FIELDS = ("task", "image", "top_k")


class RequestError(Exception):
    """A request the server refuses: the HTTP status and the message it answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may send: the decoded image file's bytes and its width x height."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class ParsedRequest:
    task: str
    image: np.ndarray  # H x W x 3 uint8
    top_k: int


def parse_request(payload: object, task_classes: Mapping[str, int], limits: Limits) -> ParsedRequest:
    """A checked request: known task, decodable image within the limits, ``top_k`` in ``[1, classes]``.

    Args:
        payload: The parsed JSON body.
        task_classes: ``{task: number of classes}`` of the served tasks.

    Raises:
        RequestError: 400 for a malformed request, 404 for an unknown task, 413 for an image over a limit.
    """
    if not isinstance(payload, dict):
        raise RequestError(400, f"the body must be a JSON object with {FIELDS[:2]} (and optionally 'top_k')")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; a request has {list(FIELDS)}")
    for name in FIELDS[:2]:
        if name not in payload:
            raise RequestError(400, f"missing field {name!r}; a request has {list(FIELDS)}")
    task = payload["task"]
    if not isinstance(task, str):
        raise RequestError(400, f"'task' must be a string, got {type(task).__name__}")
    if task not in task_classes:
        raise RequestError(404, f"unknown task {task!r}; this server answers {sorted(task_classes)}")
    classes = task_classes[task]
    top_k = payload.get("top_k", min(DEFAULT_TOP_K, classes))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= classes:
        raise RequestError(400, f"'top_k' must be an integer in [1, {classes}] (task {task!r} has {classes} "
                                f"classes), got {top_k!r}")
    return ParsedRequest(task, decode_image(payload["image"], limits), top_k)


def decode_image(text: object, limits: Limits) -> np.ndarray:
    """A base64 PNG or JPEG as an ``H x W x 3`` uint8 array (EXIF orientation applied, as ``load_rgb`` does)."""
    if not isinstance(text, str):
        raise RequestError(400, f"'image' must be a base64 string, got {type(text).__name__}")
    if len(text) // 4 * 3 > limits.max_bytes + 3:  # refused before decoding
        raise RequestError(413, f"the image is over the limit of {limits.max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise RequestError(413, f"the image has {len(data)} bytes, over the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > limits.max_pixels:
                raise RequestError(413, f"the image has {width}x{height} = {width * height} pixels, over the limit "
                                        f"of {limits.max_pixels}")
            image.load()
            return to_rgb_array(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError:  # so large that PIL refuses to read even its header
        raise RequestError(413, f"the image is over the limit of {limits.max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise RequestError(400, "'image' is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt data
        raise RequestError(400, f"'image' cannot be decoded ({error})") from None


class RequestCheck:
    """ASGI middleware: ``POST`` requests to ``path`` are checked by :func:`parse_request` before LitServe queues
    them; a bad one is answered ``{"detail": message}`` with its status, a good one passes on unchanged."""

    def __init__(self, app, task_classes: Mapping[str, int], limits: Limits, path: str = "/predict") -> None:
        self.app = app
        self.task_classes = dict(task_classes)
        self.limits = limits
        self.path = path
        # base64 grows a file by 4/3; the JSON around it is small.
        self.max_body = limits.max_bytes * 4 // 3 + 64 * 1024

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _answer(send, 413, f"the request body is over {self.max_body} bytes (the image limit is "
                                         f"{self.limits.max_bytes} bytes)")
                return
        try:
            parse_request(_json_body(body), self.task_classes, self.limits)
        except RequestError as error:
            await _answer(send, error.status, error.message)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _json_body(body: bytes) -> object:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise RequestError(400, "the body is not JSON") from None


async def _answer(send, status: int, message: str) -> None:
    content = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})
