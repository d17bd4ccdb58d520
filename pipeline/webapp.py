"""The web page: upload, drop or photograph a hand sign and see what the model reads.

    python -m pipeline serve-ui [--model URI]      # serve.host:serve.port from params.yaml

Routes: `GET /` (the page), `POST /api/predict` (multipart field `file`, or the raw body), `GET
/api/health`. Refusals are 4xx `{"error": ...}`, or 503 with Retry-After when the server is full;
uploads stay in memory and nothing is written. Decoding runs on a few threads within a memory
budget, and one model thread classifies concurrent requests' images in one forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import os
import struct
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.batcher import Batcher
from pipeline.config import ServeConfig
from pipeline.errors import UserError
from pipeline.predict import LoadedModel, load_model, top_k
from pipeline.serving.imaging import IMAGE_FORMATS, ImageTooLarge, check_pixels
from pipeline.serving.limits import MIB, Busy, MemoryBudget, OverBudget
from pipeline.serving.precision import precision
from pipeline.serving.pyfunc import AslClassifier

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


RETRY_AFTER_S = 1
# What PIL raises for bytes that are not a (complete) image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)


class Rejected(Exception):
    """A request the app refuses: answered with `status` and `{"error": message}` (and `headers`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def _busy(reason: str) -> Rejected:
    return Rejected(
        503, f"the server is busy ({reason}): retry in a moment", {"Retry-After": str(RETRY_AFTER_S)}
    )


# --- reading the upload ----------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused (413) once it is over `limit` bytes, declared or counted."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise Rejected(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise Rejected(
                413,
                f"the request is {int(declared)} bytes, over the limit of {limit} bytes "
                "(serve.max_request_bytes)",
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
            parts[-1]["name"] = (
                parse_options_header(header["value"])[1].get(b"name", b"").decode("utf-8", "replace")
            )
        header["name"] = header["value"] = b""

    callbacks: Any = {  # python-multipart's MultipartCallbacks, a TypedDict of these
        "on_part_begin": lambda: parts.append({"name": None, "data": bytearray()}),
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_header_field": lambda data, start, end: header.__setitem__(
            "name", header["name"] + data[start:end]
        ),
        "on_header_value": lambda data, start, end: header.__setitem__(
            "value", header["value"] + data[start:end]
        ),
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
    except Image.DecompressionBombError:  # PIL's own guard, far above ours: its message cites its limit
        raise Rejected(
            413, f"the image is too large: over the limit of {max_pixels} pixels (serve.max_image_pixels)"
        ) from None
    except Image.UnidentifiedImageError:
        raise Rejected(415, "not an image: send a JPEG, PNG or WebP file") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        raise Rejected(400, f"unreadable image ({type(err).__name__}: {err})") from None
    try:
        check_pixels(width, height, max_pixels)
    except ImageTooLarge as err:
        raise Rejected(413, f"the image is too large: {err} (serve.max_image_pixels)") from None


# --- the app ---------------------------------------------------------------------------------------


def served_classifier(loaded: LoadedModel, serve: ServeConfig) -> AslClassifier:
    """The loaded model's own Python object, whose decoding and forward pass the app calls directly,
    as a copy with the serve settings: its decode limit (`max_image_pixels` of its model_config.json)
    lowered to `serve.max_image_pixels` so that the model and the app agree, its decode budget and
    its precision. The copy shares the network; `loaded` itself is left as it was."""
    python_model = loaded.model.unwrap_python_model()
    if not isinstance(python_model, AslClassifier):
        raise UserError(
            f"{loaded.ref.uri} is not an ASL classifier logged by `python -m pipeline train`: "
            "it cannot be served here"
        )
    classifier = copy.copy(python_model)
    classifier.max_pixels = min(int(python_model.max_pixels), serve.max_image_pixels)
    classifier.budget = MemoryBudget(serve.decode_memory_mb * MIB, max_waiting=serve.max_pending)
    classifier.precision = precision(classifier.device, serve.bf16)
    return classifier


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _decode(classifier: AslClassifier, image: bytes) -> Any:
    """The image's pixels, or the refusal, in the app's words."""
    try:
        return classifier.prepare_image(image)
    except Busy as err:
        raise _busy(str(err)) from None
    except OverBudget as err:
        raise Rejected(
            413, f"the image is too large to decode here: {err} (serve.decode_memory_mb)"
        ) from None
    except ImageTooLarge as err:
        raise Rejected(413, f"the image is too large: {err} (serve.max_image_pixels)") from None
    except _DECODE_ERRORS as err:
        raise Rejected(400, f"unreadable image ({type(err).__name__}: {err})") from None


class Admission:
    """Counts the requests inside the app (only the event loop's thread does: no lock needed)."""

    def __init__(self, limit: int):
        self.limit, self.inside = limit, 0

    def refusal(self) -> Rejected | None:
        if self.inside < self.limit:
            return None
        return _busy(f"{self.inside} requests are in progress, the limit of serve.max_pending")

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1


async def _drain(request: Request, limit: int) -> None:
    """Read and drop the body, so that a refused client reads its answer rather than a reset connection."""
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return


def create_app(loaded: LoadedModel, serve: ServeConfig) -> FastAPI:
    """The app around one loaded model; `serve` gives the limits, the batching and the precision."""
    page = PAGE.read_text(encoding="utf-8")
    classifier = served_classifier(loaded, serve)
    decoders = ThreadPoolExecutor(
        serve.decode_threads or min(4, os.cpu_count() or 1), thread_name_prefix="decode"
    )
    batcher = Batcher(classifier.probabilities, serve.max_batch, serve.batch_wait_ms / 1000)
    admission = Admission(serve.max_pending)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        batcher.close()
        decoders.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(
        title="ASL alphabet classifier", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.classifier, app.state.batcher, app.state.admission = classifier, batcher, admission

    @app.exception_handler(Rejected)
    async def rejected(request: Request, err: Rejected) -> JSONResponse:
        return _error(err.status, err.message, err.headers)

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
        return {
            "status": "ok",
            "model": loaded.ref.as_dict(),
            "precision": classifier.precision,
            "batches": batcher.totals(),
        }

    async def classify(request: Request) -> np.ndarray:
        body = await read_body(request, serve.max_request_bytes)
        content_type = request.headers.get("content-type", "")
        image = (
            form_file(content_type, body) if content_type.lower().startswith("multipart/form-data") else body
        )
        check_image(image, classifier.max_pixels)
        # Decoding and the forward pass are CPU-bound: off the event loop, so uploads keep streaming.
        with batcher.coming():
            pixels = await asyncio.get_running_loop().run_in_executor(decoders, _decode, classifier, image)
            answer = batcher.submit(pixels)
        return await asyncio.wrap_future(answer)

    @app.post("/api/predict")
    async def predict(request: Request) -> dict[str, Any]:
        refusal = admission.refusal()
        if refusal is not None:
            await _drain(request, serve.max_request_bytes)
            raise refusal
        with admission.enter():
            probabilities = await classify(request)
        ranked = top_k(probabilities, loaded.classes, TOP)
        return {**ranked[0], "top5": ranked, "model": loaded.ref.as_dict(), "precision": classifier.precision}

    return app


def run_server(model_uri: str, serve: ServeConfig) -> None:
    """Load the model, then serve the page until interrupted."""
    import torch
    import uvicorn

    # This process only serves: PIL's own bomb guard may as well use the same limit (it warns
    # above it and refuses above twice it), behind the header check in `check_image`.
    Image.MAX_IMAGE_PIXELS = serve.max_image_pixels
    torch.set_num_threads(serve.torch_threads or max(1, (os.cpu_count() or 1) - 1))
    loaded = load_model(model_uri)
    app = create_app(loaded, serve)
    print(
        f"serving {loaded.ref.describe()} ({loaded.ref.load_uri}) at http://{serve.host}:{serve.port}/ "
        f"(forward passes of up to {serve.max_batch} images in {app.state.classifier.precision} "
        f"on {torch.get_num_threads()} threads)",
        flush=True,
    )
    uvicorn.run(app, host=serve.host, port=serve.port, log_level="info")
