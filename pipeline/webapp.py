"""The web page: upload, drop or photograph a hand sign and see what the model reads.

    python -m pipeline serve-ui [--model URI]      # serve.host:serve.port from params.yaml

Routes: `GET /` (the page), `POST /api/predict` (multipart field `file`, or the raw body), `GET
/api/health`. Refusals are 4xx `{"error": ...}`; uploads stay in memory and nothing is written.
"""

from __future__ import annotations

import io
import logging
import struct
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import ServeConfig
from pipeline.serving.imaging import IMAGE_FORMATS, ImageTooLarge, check_pixels
from pipeline.predict import LoadedModel, classify, load_model, top_k

PAGE = Path(__file__).resolve().parent / "static" / "index.html"
UPLOAD_FIELD = "file"
TOP = 5
# Browsers may render the page and fetch our own API; nothing else (no external scripts or fonts).
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' blob: data:; media-src 'self' blob: mediastream:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
log = logging.getLogger(__name__)


class Rejected(Exception):
    """A request the app refuses: answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# --- reading the upload ----------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) once it is over `limit` bytes, declared or counted."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Rejected(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise Rejected(
                413, f"the request is {int(declared)} bytes, over the limit of {limit} bytes (serve.max_request_bytes)"
            )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Rejected(413, f"the request is over the limit of {limit} bytes (serve.max_request_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def form_file(content_type: str, body: bytes, field: str = UPLOAD_FIELD) -> bytes:
    """The bytes of the multipart field `field`, parsed in memory (never spooled to disk)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise Rejected(400, "the multipart upload has no boundary")
    parts: list[dict[str, Any]] = []
    header: dict[str, bytes] = {"name": b"", "value": b""}

    def on_header_end() -> None:
        if header["name"].lower() == b"content-disposition":
            parts[-1]["name"] = parse_options_header(header["value"])[1].get(b"name", b"").decode("utf-8", "replace")
        header["name"] = header["value"] = b""

    callbacks = {
        "on_part_begin": lambda: parts.append({"name": None, "data": bytearray()}),
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_header_field": lambda data, start, end: header.__setitem__("name", header["name"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__("value", header["value"] + data[start:end]),
        "on_header_end": on_header_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as err:
        raise Rejected(400, f"malformed multipart upload ({err})") from None
    for part in parts:
        if part["name"] == field:
            return bytes(part["data"])
    raise Rejected(400, f"the multipart upload has no field named {field!r}")


def check_image(data: bytes, max_pixels: int) -> None:
    """Refuse what is not a JPEG/PNG/WebP image, or is over `max_pixels`, from its header alone."""
    if not data:
        raise Rejected(400, "the upload is empty: choose an image file")
    try:
        # Image.open reads only the header: the size is known before a single pixel is decoded.
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            width, height = image.size
    except Image.DecompressionBombError as err:
        raise Rejected(413, f"the image is too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise Rejected(415, "not an image: send a JPEG, PNG or WebP file") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise Rejected(400, f"unreadable image ({type(err).__name__}: {err})") from None
    try:
        check_pixels(width, height, max_pixels)
    except ImageTooLarge as err:
        raise Rejected(413, f"the image is too large: {err} (serve.max_image_pixels)") from None


# --- the app ---------------------------------------------------------------------------------------


def limit_model_pixels(loaded: LoadedModel, max_pixels: int) -> int:
    """Lower the served model's own decode limit (`max_image_pixels` of its model_config.json) to
    `max_pixels`, so that the model and the app agree; returns the limit both now use."""
    python_model = loaded.model.unwrap_python_model()
    if hasattr(python_model, "max_pixels"):
        python_model.max_pixels = min(int(python_model.max_pixels), max_pixels)
        return python_model.max_pixels
    return max_pixels


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _answer(loaded: LoadedModel, image: bytes) -> dict[str, Any]:
    (result,) = classify(loaded.model, [image])
    if isinstance(result, str):
        raise Rejected(400, f"unreadable image: {result}")
    ranked = top_k(result, loaded.classes, TOP)
    return {**ranked[0], "top5": ranked, "model": loaded.ref.as_dict()}


def create_app(loaded: LoadedModel, serve: ServeConfig) -> FastAPI:
    """The app around one loaded model; `serve` gives the limits."""
    page = PAGE.read_text(encoding="utf-8")
    max_pixels = limit_model_pixels(loaded, serve.max_image_pixels)
    app = FastAPI(title="ASL alphabet classifier", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected) -> JSONResponse:
        return _error(err.status, err.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        log.exception("prediction failed")
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": loaded.ref.as_dict()}

    @app.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        body = await read_body(request, serve.max_request_bytes)
        content_type = request.headers.get("content-type", "")
        image = form_file(content_type, body) if content_type.lower().startswith("multipart/form-data") else body
        check_image(image, max_pixels)
        # The forward pass is CPU-bound: off the event loop, so uploads keep streaming meanwhile.
        return await run_in_threadpool(_answer, loaded, image)

    return app


def run_server(model_uri: str, serve: ServeConfig) -> None:
    """Load the model, then serve the page until interrupted."""
    import uvicorn

    # This process only serves: PIL's own bomb guard may as well use the same limit (it warns
    # above it and refuses above twice it), behind the header check in `check_image`.
    Image.MAX_IMAGE_PIXELS = serve.max_image_pixels
    loaded = load_model(model_uri)
    print(f"serving {loaded.ref.describe()} ({loaded.ref.load_uri}) at http://{serve.host}:{serve.port}/", flush=True)
    uvicorn.run(create_app(loaded, serve), host=serve.host, port=serve.port, log_level="info")
