"""The web app's API in-process (FastAPI's TestClient, or uvicorn in a thread where requests must
overlap): answers, model version, precision, every limit, and batching of concurrent requests.

One colour model (red A, green B, blue C) is registered as champion in a private store and loaded
once; the apps here wrap it with small limits so the limit tests stay cheap.
"""

from __future__ import annotations

import socket
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import torch
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app as cli
from pipeline.config import ServeConfig
from pipeline.predict import LoadedModel, load_model
from pipeline.serving.limits import MIB, MemoryBudget
from pipeline.serving.precision import precision
from pipeline.webapp import create_app

from serving_support import COLOURS, app_in_thread, colour_champion, encode, noisy, solid

MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
SERVE = ServeConfig(max_request_bytes=MAX_BYTES, max_image_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    with colour_champion(tmp_path_factory.mktemp("webapp-store")) as found:
        yield found


@pytest.fixture(scope="module")
def loaded(champion) -> LoadedModel:
    return load_model(champion.uri)


@pytest.fixture(scope="module")
def client(loaded) -> Iterator[TestClient]:
    with TestClient(create_app(loaded, SERVE)) as test_client:
        yield test_client


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` in its header but holds almost no data: what a
    decompression bomb looks like to anything that reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def _upload(client: TestClient, data: bytes, name: str = "image.jpg"):
    return client.post("/api/predict", files={"file": (name, data, "application/octet-stream")})


def _assert_good(client: TestClient, colour: str = "A") -> None:
    response = _upload(client, solid(COLOURS[colour]))
    assert response.status_code == 200, response.text
    assert response.json()["label"] == colour


# --- answers --------------------------------------------------------------------------------------


def test_page_is_one_self_contained_file(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for element in (
        'id="file-input"',
        'id="prediction"',
        'id="top5"',
        'id="model-version"',
        'id="webcam-snap"',
    ):
        assert element in response.text
    assert (
        'src="http' not in response.text and 'href="http' not in response.text
    )  # nothing fetched from elsewhere
    assert "default-src 'none'" in response.headers["content-security-policy"]


def test_health_names_the_version_that_answers(client: TestClient, champion) -> None:
    body = client.get("/api/health").json()
    model = {"name": champion.name, "version": champion.version, "uri": champion.uri}
    assert body.pop("batches").keys() == {"forward_passes", "images"}
    assert body == {"status": "ok", "model": model, "precision": precision(torch.device("cpu"), True)}


@pytest.mark.parametrize("colour", ["A", "B", "C"])
def test_multipart_upload_reads_the_colour(client: TestClient, champion, colour: str) -> None:
    body = _upload(client, solid(COLOURS[colour], 120, 90)).json()
    assert body["label"] == colour
    assert body["model"] == {"name": champion.name, "version": champion.version, "uri": champion.uri}
    assert len(body["top5"]) == 5 and body["top5"][0] == {
        "label": body["label"],
        "probability": body["probability"],
    }
    probabilities = [item["probability"] for item in body["top5"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_answer_is_the_models_own(client: TestClient, loaded: LoadedModel) -> None:
    image = noisy(7, fmt="PNG")
    expected = loaded.model.predict(pd.DataFrame({"image": [image]}))
    row = np.asarray(expected["probabilities"][0])
    body = _upload(client, image, "noise.png").json()
    assert body["label"] == expected["label"][0]
    top = np.argsort(-row, kind="stable")[:5]
    assert [item["label"] for item in body["top5"]] == [loaded.classes[i] for i in top]
    np.testing.assert_allclose([item["probability"] for item in body["top5"]], row[top], rtol=1e-6)


def test_raw_body_works_too(client: TestClient) -> None:
    response = client.post(
        "/api/predict", content=solid(COLOURS["B"], fmt="PNG"), headers={"content-type": "image/png"}
    )
    assert response.status_code == 200 and response.json()["label"] == "B"


def test_the_models_decode_limit_follows_the_serve_limit(client: TestClient) -> None:
    assert isinstance(client.app, FastAPI)  # TestClient types it as any ASGI app
    assert client.app.state.classifier.max_pixels == MAX_PIXELS


@pytest.mark.parametrize("bf16", [True, False])
def test_answers_say_which_precision_ran(loaded: LoadedModel, bf16: bool) -> None:
    expected = precision(torch.device("cpu"), bf16)  # bf16 only where the CPU computes it natively
    with TestClient(create_app(loaded, ServeConfig(bf16=bf16))) as app:
        assert app.get("/api/health").json()["precision"] == expected
        body = _upload(app, solid(COLOURS["C"])).json()
    assert body["precision"] == expected and body["label"] == "C"


# --- bad input: a clear 4xx, and the next request still works -----------------------------------


def _truncated_jpeg() -> bytes:
    data = noisy(3, 200, 200)
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "empty": (b"", 400, "empty"),
    "text": (b"hello, this is not a picture", 415, "not an image"),
    "gif": (encode(Image.new("RGB", (8, 8)), "GIF"), 415, "JPEG, PNG or WebP"),
    "truncated-jpeg": (_truncated_jpeg(), 400, "truncated"),
    # Over twice PIL's own limit, Image.open refuses before the app sees a size: the app names its own limit.
    "bomb-20000x20000": (
        _png_header(20000, 20000),
        413,
        "over the limit of 1000000 pixels (serve.max_image_pixels)",
    ),
    "header-over-limit": (
        _png_header(5000, 5000),
        413,
        "5000x5000 pixels is over the limit of 1000000 (serve.max_image_pixels)",
    ),
    "real-over-limit": (
        solid((1, 2, 3), 1001, 1000, fmt="PNG"),
        413,
        "1001x1000 pixels is over the limit of 1000000 (serve.max_image_pixels)",
    ),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_bad_uploads_are_4xx_with_a_reason(client: TestClient, case: str) -> None:
    data, status, message = BAD_UPLOADS[case]
    for response in (_upload(client, data), client.post("/api/predict", content=data)):
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    _assert_good(client)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (
            b'--x\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n\r\nabc\r\n--x--\r\n',
            "multipart/form-data; boundary=x",
            "no field named 'file'",
        ),
        (b"no parts here", "multipart/form-data", "no boundary"),
        (
            b"--x\r\nthis is not a header line\r\n\r\n",
            "multipart/form-data; boundary=x",
            "malformed multipart",
        ),
    ],
    ids=["wrong-field", "no-boundary", "garbled"],
)
def test_malformed_multipart_is_400(client: TestClient, body: bytes, content_type: str, message: str) -> None:
    response = client.post("/api/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and message in response.json()["error"]
    _assert_good(client, "C")


def test_over_the_request_limit_by_content_length(client: TestClient) -> None:
    response = client.post(
        "/api/predict", content=b"\xff" * (MAX_BYTES + 1), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 413
    assert f"{MAX_BYTES + 1} bytes, over the limit of {MAX_BYTES}" in response.json()["error"]
    _assert_good(client)


def test_over_the_request_limit_by_counting_a_stream(client: TestClient) -> None:
    """Chunked: no Content-Length to go by, so the bytes themselves are counted."""
    sent = []

    def chunks():
        for _ in range(50):
            sent.append(1)
            yield b"\0" * 10_000  # 500 kB in all, over the 200 kB limit

    response = client.post("/api/predict", content=chunks(), headers={"content-type": "image/png"})
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    _assert_good(client)


def test_uploads_never_touch_the_disk(loaded: LoadedModel, monkeypatch) -> None:
    """A 1.5 MB upload (Starlette's own form parser spools anything over 1 MB to a temp file)."""
    image = noisy(5, 700, 700, fmt="PNG")
    assert len(image) > 1_100_000

    def refuse(*args, **kwargs):
        raise AssertionError("the app tried to create a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr("starlette.formparsers.SpooledTemporaryFile", refuse)
    with TestClient(
        create_app(loaded, ServeConfig(max_request_bytes=4_000_000, max_image_pixels=MAX_PIXELS))
    ) as big:
        response = _upload(big, image, "big.png")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path",
    [
        "/static/index.html",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/docs",
        "/openapi.json",
        "/index.html",
    ],
)
def test_serves_nothing_but_its_page(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "error" in response.json()


def test_wrong_method_is_a_json_error(client: TestClient) -> None:
    response = client.get("/api/predict")
    assert response.status_code == 405 and "error" in response.json()


# --- memory and load ------------------------------------------------------------------------------


def test_a_png_that_needs_more_than_the_decode_budget_is_413_naming_it(loaded: LoadedModel) -> None:
    """A 2100x2100 RGBA PNG is decoded whole (17.6 MB) and is refused by a 16 MB budget; a JPEG of
    the same size decodes at 1/8 scale and is classified."""
    serve = ServeConfig(decode_memory_mb=16, max_image_pixels=5_000_000)
    png = encode(Image.new("RGBA", (2100, 2100), (*COLOURS["B"], 255)), "PNG")
    with TestClient(create_app(loaded, serve)) as app:
        response = _upload(app, png, "big.png")
        assert response.status_code == 413
        assert (
            "more than the whole decode budget of 16 MB (serve.decode_memory_mb)" in response.json()["error"]
        )
        jpeg = _upload(app, solid(COLOURS["B"], 2100, 2100))
        assert jpeg.status_code == 200 and jpeg.json()["label"] == "B"


def _send_half_an_upload(url: str, body: bytes) -> socket.socket:
    """A connection that has sent the headers and half of `body`: its request stays inside the app."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=30)
    head = (
        f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    connection.sendall(head.encode() + body[: len(body) // 2])
    return connection


def _wait_for(condition, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_full_server_answers_503_with_retry_after(loaded: LoadedModel) -> None:
    app = create_app(loaded, ServeConfig(max_pending=1))
    image = solid(COLOURS["A"])
    with app_in_thread(app) as url:
        slow = _send_half_an_upload(url, image)
        try:
            _wait_for(lambda: app.state.admission.inside == 1, "the slow upload to be inside the app")
            refused = requests.post(f"{url}/api/predict", data=image, timeout=30)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
            assert "serve.max_pending" in refused.json()["error"]
            slow.sendall(image[len(image) // 2 :])
            assert slow.recv(100).startswith(b"HTTP/1.1 200")
        finally:
            slow.close()
        assert requests.post(f"{url}/api/predict", data=image, timeout=30).json()["label"] == "A"


def test_no_room_to_decode_is_503_with_retry_after(loaded: LoadedModel) -> None:
    """The decode budget is taken (here: held by the test) and nobody may wait for it."""
    with TestClient(create_app(loaded, ServeConfig())) as app:
        assert isinstance(app.app, FastAPI)
        budget = app.app.state.classifier.budget = MemoryBudget(64 * MIB, max_waiting=0)
        with budget.reserve(60 * MIB):
            response = _upload(app, solid(COLOURS["A"]))
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "retry" in response.json()["error"]
        assert _upload(app, solid(COLOURS["A"])).json()["label"] == "A"


def test_concurrent_requests_share_forward_passes(loaded: LoadedModel) -> None:
    """Twelve clients at once: every one gets its own answer, from fewer than twelve forward passes
    of at most serve.max_batch images."""
    app = create_app(loaded, ServeConfig(max_batch=8, batch_wait_ms=300))
    colours = [("A", "B", "C")[i % 3] for i in range(12)]
    start = threading.Barrier(len(colours))

    def ask(url: str, colour: str) -> str:
        start.wait()
        return requests.post(
            f"{url}/api/predict", files={"file": ("x.jpg", solid(COLOURS[colour]))}, timeout=60
        ).json()["label"]

    with app_in_thread(app) as url, ThreadPoolExecutor(len(colours)) as clients:
        labels = list(clients.map(lambda colour: ask(url, colour), colours))
    assert labels == colours
    sizes = app.state.batcher.batch_sizes
    assert sum(size * count for size, count in sizes.items()) == 12
    assert max(sizes) <= 8 and sum(sizes.values()) < 12, sizes
    assert app.state.batcher.totals() == {"forward_passes": sum(sizes.values()), "images": 12}


# --- the command ----------------------------------------------------------------------------------


def test_serve_ui_without_a_champion_is_one_line(champion, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"mlflow": {"registered_model": "nobody-registered-this"}, "serve": {"port": 1}})
    )
    result = CliRunner().invoke(cli, ["serve-ui", "--params", str(params)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alias 'champion'" in lines[0] and "dvc repro" in lines[0], result.stderr
