"""The web page in a real browser: Debian's Chromium, headless, driven by Playwright, against the
real server (`python -m pipeline serve-ui` as a subprocess on a free loopback port).

Two servers:
- the pipeline's own champion: a tiny model trained, evaluated and promoted by the stages, served by
  default (no --model). A validation image goes in through #file-input; the class on the page must
  be the one the model itself gives for that file (`mlflow.pyfunc.load_model(...).predict`).
- the colour model (red A, green B, blue C) given by --model, so "the right class" means something:
  a red image must read "A". Drag-and-drop, a webcam snapshot (Chromium's fake camera), a
  non-image and an upload over serve.max_request_bytes (an error on the page, then the next image
  still works) go through it too.

Screenshots land in /tmp/asl-webapp-*.png. Skipped only when /usr/bin/chromium is missing and
`apt-get install chromium` cannot provide it.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import REPO, write_params
from serving_support import (
    COLOURS,
    colour_champion,
    free_port,
    noisy,
    solid,
    start_server,
    stop,
    wait_until_up,
)

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.slow
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # a generated test pattern as the webcam, and no permission prompt for it
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]  # fmt: skip
SCREENSHOTS = Path("/tmp")
MAX_REQUEST_BYTES = 300_000  # the colour server's serve.max_request_bytes


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(
            "apt-get update -qq && apt-get install -y -qq chromium",
            shell=True,
            capture_output=True,
            timeout=900,
            check=False,
        )
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing and `apt-get install chromium` could not install it "
            "(needs root, apt and the Debian archive)"
        )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    _ensure_chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def _serve_ui(workspace: Path, tracking_uri: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`python -m pipeline serve-ui` in `workspace` (its params.yaml sets serve.port); returns the
    process and the base URL once /api/health answers."""
    port = yaml.safe_load((workspace / "params.yaml").read_text())["serve"]["port"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = workspace / "serve-ui.log"
    process = start_server(
        [sys.executable, "-m", "pipeline", "serve-ui", *extra], log, cwd=workspace, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, f"{url}/api/health", log)
    except BaseException:
        stop(process)
        raise
    return process, url


@pytest.fixture(scope="module")
def pipeline_champion(tmp_path_factory, tiny_data):
    """(workspace, tracking URI, a validation image): the tiny profile trained by `train dp`,
    evaluated, and promoted to `asl-classifier@champion` in the workspace's own store."""
    from pipeline.config import load_params
    from pipeline.evaluate import run_evaluate
    from pipeline.paths import workspace_paths
    from pipeline.preprocess import plan_splits, scan_train
    from pipeline.promote import run_promote
    from pipeline.train import run_train

    workspace = tmp_path_factory.mktemp("browser-pipeline") / "ws"
    shutil.copytree(tiny_data / "data", workspace / "data")
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    write_params(workspace, {"serve": {"port": free_port()}})
    (workspace / "mlruns").mkdir()
    tracking_uri = f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        patch.setenv("MLFLOW_REGISTRY_URI", tracking_uri)
        patch.delenv("DVC_ROOT", raising=False)
        patch.chdir(workspace)
        params, paths = load_params("params.yaml"), workspace_paths()
        try:
            assert run_train(params, paths, "dp", Path("params.yaml")) == 0
            run_evaluate(params, paths, "dp")
            run_promote(params, paths)
            validation = plan_splits(scan_train(paths.raw_train), params.data, params.seed)[0]["val"]
            yield workspace, tracking_uri, validation[len(validation) // 2][0]
        finally:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
            mlflow.set_registry_uri(None)  # type: ignore[arg-type]  # None: back to the default


@pytest.fixture(scope="module")
def pipeline_server(pipeline_champion):
    workspace, tracking_uri, _ = pipeline_champion
    process, url = _serve_ui(workspace, tracking_uri)  # no --model: the champion params.yaml names
    yield url
    stop(process)


@pytest.fixture(scope="module")
def colour_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-colours")
    with colour_champion(root) as champion:
        (root / "params.yaml").write_text(
            yaml.safe_dump({"serve": {"port": free_port(), "max_request_bytes": MAX_REQUEST_BYTES}})
        )
        process, url = _serve_ui(root, champion.tracking_uri, "--model", champion.uri)
        yield url, champion
        stop(process)


def _open(browser: Browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(url)
    expect(page.locator("#model-version")).not_to_have_text("model: loading…")
    return page


def _upload(page: Page, path: Path) -> None:
    page.set_input_files("#file-input", str(path))
    page.wait_for_selector('#result[data-state="done"], #result[data-state="error"]')


def test_the_page_shows_what_the_champion_predicts(
    browser: Browser, pipeline_server: str, pipeline_champion
) -> None:
    _, tracking_uri, image = pipeline_champion
    mlflow.set_tracking_uri(tracking_uri)
    try:
        expected = mlflow.pyfunc.load_model("models:/asl-classifier@champion").predict(
            pd.DataFrame({"image": [image.read_bytes()]})
        )
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
    page = _open(browser, pipeline_server)
    expect(page.locator("#model-version")).to_have_text("model: asl-classifier v1")
    _upload(page, image)
    assert page.get_attribute("#result", "data-state") == "done", page.inner_text("#error")
    assert page.inner_text("#prediction").strip() == expected["label"][0]
    bars = page.locator("#top5 li")
    expect(bars).to_have_count(5)
    assert bars.first.get_attribute("data-label") == expected["label"][0]
    assert page.locator("#preview").is_visible()
    page.screenshot(path=str(SCREENSHOTS / "asl-webapp-pipeline.png"), full_page=True)
    page.close()


def test_a_red_image_reads_a(browser: Browser, colour_server, tmp_path: Path) -> None:
    url, champion = colour_server
    page = _open(browser, url)
    expect(page.locator("#model-version")).to_have_text(f"model: {champion.name} v{champion.version}")
    assert page.get_attribute("#model-version", "data-version") == str(champion.version)
    precision = requests.get(f"{url}/api/health", timeout=10).json()["precision"]
    assert page.get_attribute("#model-version", "title") == f"forward passes in {precision}"
    for name, colour in (("red.jpg", "A"), ("green.png", "B")):
        (tmp_path / name).write_bytes(
            solid(COLOURS[colour], 160, 120, fmt="PNG" if name.endswith("png") else "JPEG")
        )
        _upload(page, tmp_path / name)
        assert page.inner_text("#prediction").strip() == colour
        expect(page.locator("#top5 li")).to_have_count(5)
        assert page.locator("#top5 li .fill").first.evaluate("el => el.getBoundingClientRect().width") > 0
        assert page.inner_text("#probability").startswith("probability ")
    page.screenshot(path=str(SCREENSHOTS / "asl-webapp-colours.png"), full_page=True)
    page.close()


def test_a_non_image_shows_an_error_and_the_next_image_works(
    browser: Browser, colour_server, tmp_path: Path
) -> None:
    url, _ = colour_server
    page = _open(browser, url)
    (tmp_path / "notes.png").write_text("this is text with an image's name")
    _upload(page, tmp_path / "notes.png")
    assert page.get_attribute("#result", "data-state") == "error"
    expect(page.locator("#error")).to_contain_text("not an image")
    assert page.inner_text("#prediction") == ""
    page.screenshot(path=str(SCREENSHOTS / "asl-webapp-error.png"), full_page=True)
    (tmp_path / "blue.jpg").write_bytes(solid(COLOURS["C"]))
    _upload(page, tmp_path / "blue.jpg")
    assert page.inner_text("#prediction").strip() == "C" and not page.locator("#error").is_visible()
    page.close()


def test_an_upload_over_the_limit_shows_the_servers_reason(
    browser: Browser, colour_server, tmp_path: Path
) -> None:
    url, _ = colour_server
    page = _open(browser, url)
    big = tmp_path / "big.png"
    big.write_bytes(noisy(9, 400, 400, fmt="PNG"))
    assert big.stat().st_size > MAX_REQUEST_BYTES
    _upload(page, big)
    assert page.get_attribute("#result", "data-state") == "error"
    expect(page.locator("#error")).to_contain_text(f"over the limit of {MAX_REQUEST_BYTES} bytes")
    (tmp_path / "red.jpg").write_bytes(solid(COLOURS["A"]))
    _upload(page, tmp_path / "red.jpg")
    assert page.inner_text("#prediction").strip() == "A"
    page.close()


def test_drag_and_drop(browser: Browser, colour_server) -> None:
    url, _ = colour_server
    page = _open(browser, url)
    data = base64.b64encode(solid(COLOURS["B"])).decode("ascii")
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true })
            );
        }""",
        data,
    )
    page.wait_for_selector('#result[data-state="done"]')
    assert page.inner_text("#prediction").strip() == "B"
    page.close()


def test_webcam_snapshot(browser: Browser, colour_server) -> None:
    """Chromium's fake camera (a test pattern) stands in for a webcam: the snapshot is sent and
    answered; what the pattern looks like to the model does not matter here."""
    url, _ = colour_server
    page = _open(browser, url)
    expect(page.locator("#webcam-start")).to_be_visible()
    page.click("#webcam-start")
    expect(page.locator("#webcam-snap")).to_be_enabled()  # once the first frames play
    page.click("#webcam-snap")
    page.wait_for_selector('#result[data-state="done"], #result[data-state="error"]')
    assert page.get_attribute("#result", "data-state") == "done", page.inner_text("#error")
    assert page.inner_text("#prediction").strip() != ""
    expect(page.locator("#top5 li")).to_have_count(5)
    page.screenshot(path=str(SCREENSHOTS / "asl-webapp-webcam.png"), full_page=True)
    page.close()
