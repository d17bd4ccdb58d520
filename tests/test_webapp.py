"""The web app's API in-process (FastAPI's TestClient): answers, model version, and every limit.

One colour model (red A, green B, blue C) is registered as champion in a private store and loaded
once; the apps here wrap it with small limits so the limit tests stay cheap.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from serving_support import COLOURS, colour_champion, encode, noisy, solid
from typer.testing import CliRunner

from pipeline.cli import app as cli
from pipeline.config import ServeConfig
from pipeline.predict import LoadedModel, load_model
from pipeline.webapp import create_app

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
def client(loaded) -> TestClient:
    with TestClient(create_app(loaded, SERVE)) as test_client:
        yield test_client


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` in its header but holds almost no data: what a
    decompression bomb looks like to anything that reads only the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


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
    for element in ('id="file-input"', 'id="prediction"', 'id="top5"', 'id="model-version"', 'id="webcam-snap"'):
        assert element in response.text
    assert 'src="http' not in response.text and 'href="http' not in response.text  # nothing fetched from elsewhere
    assert "default-src 'none'" in response.headers["content-security-policy"]


def test_health_names_the_version_that_answers(client: TestClient, champion) -> None:
    body = client.get("/api/health").json()
    assert body == {"status": "ok", "model": {"name": champion.name, "version": champion.version, "uri": champion.uri}}


@pytest.mark.parametrize("colour", ["A", "B", "C"])
def test_multipart_upload_reads_the_colour(client: TestClient, champion, colour: str) -> None:
    body = _upload(client, solid(COLOURS[colour], 120, 90)).json()
    assert body["label"] == colour
    assert body["model"] == {"name": champion.name, "version": champion.version, "uri": champion.uri}
    assert len(body["top5"]) == 5 and body["top5"][0] == {"label": body["label"], "probability": body["probability"]}
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
    response = client.post("/api/predict", content=solid(COLOURS["B"], fmt="PNG"), headers={"content-type": "image/png"})
    assert response.status_code == 200 and response.json()["label"] == "B"


def test_the_models_decode_limit_follows_the_serve_limit(loaded: LoadedModel, client: TestClient) -> None:
    assert loaded.model.unwrap_python_model().max_pixels == MAX_PIXELS


# --- bad input: a clear 4xx, and the next request still works -----------------------------------


def _truncated_jpeg() -> bytes:
    data = noisy(3, 200, 200)
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "empty": (b"", 400, "empty"),
    "text": (b"hello, this is not a picture", 415, "not an image"),
    "gif": (encode(Image.new("RGB", (8, 8)), "GIF"), 415, "JPEG, PNG or WebP"),
    "truncated-jpeg": (_truncated_jpeg(), 400, "truncated"),
    "bomb-20000x20000": (_png_header(20000, 20000), 413, "too large"),
    "header-over-limit": (_png_header(5000, 5000), 413, "5000x5000 pixels is over the limit of 1000000"),
    "real-over-limit": (solid((1, 2, 3), 1001, 1000, fmt="PNG"), 413, "1001x1000"),
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
        (b"--x\r\nthis is not a header line\r\n\r\n", "multipart/form-data; boundary=x", "malformed multipart"),
    ],
    ids=["wrong-field", "no-boundary", "garbled"],
)
def test_malformed_multipart_is_400(client: TestClient, body: bytes, content_type: str, message: str) -> None:
    response = client.post("/api/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == 400 and message in response.json()["error"]
    _assert_good(client, "C")


def test_over_the_request_limit_by_content_length(client: TestClient) -> None:
    response = client.post("/api/predict", content=b"\xff" * (MAX_BYTES + 1), headers={"content-type": "image/jpeg"})
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
    with TestClient(create_app(loaded, ServeConfig(max_request_bytes=4_000_000, max_image_pixels=MAX_PIXELS))) as big:
        response = _upload(big, image, "big.png")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "path", ["/static/index.html", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/docs", "/openapi.json", "/index.html"]
)
def test_serves_nothing_but_its_page(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404 and "error" in response.json()


def test_wrong_method_is_a_json_error(client: TestClient) -> None:
    response = client.get("/api/predict")
    assert response.status_code == 405 and "error" in response.json()


# --- the command ----------------------------------------------------------------------------------


def test_serve_ui_without_a_champion_is_one_line(champion, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"mlflow": {"registered_model": "nobody-registered-this"}, "serve": {"port": 1}}))
    result = CliRunner().invoke(cli, ["serve-ui", "--params", str(params)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alias 'champion'" in lines[0] and "dvc repro" in lines[0], result.stderr
