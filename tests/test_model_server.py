"""MLflow's own model server, for real: `mlflow models serve -m models:/<name>@champion` as a
subprocess on a free loopback port, answering base64 JPEGs in `dataframe_split` JSON, refusing a
non-image with a 4xx that names it, and still serving afterwards; refusing an image that needs more
memory to decode than its budget (ASL_DECODE_MEMORY_MB, 64 MB here); saying in its log which
precision runs. The README's curl example is run as written (port and image swapped in).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from pipeline.dataset import CLASSES
from pipeline.serving.precision import precision

from serving_support import (
    COLOURS,
    colour_champion,
    encode,
    free_port,
    noisy,
    solid,
    start_server,
    stop,
    wait_until_up,
)

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the base URL of `mlflow models serve` on the colour champion, its log file)."""
    root = tmp_path_factory.mktemp("model-server")
    with colour_champion(root) as champion:
        port, log = free_port(), root / "server.log"
        command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", champion.uri,
                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": champion.tracking_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "ASL_DECODE_MEMORY_MB": "64",
        }
        process = start_server(command, log, cwd=root, env=env)
        try:
            wait_until_up(process, f"http://127.0.0.1:{port}/ping", log, timeout=START_TIMEOUT_S)
            yield f"http://127.0.0.1:{port}", log
        finally:
            stop(process)


@pytest.fixture(scope="module")
def server(served) -> str:
    return served[0]


def _invoke(server: str, images: list[bytes]) -> requests.Response:
    rows = [[base64.b64encode(image).decode("ascii")] for image in images]
    return requests.post(
        f"{server}/invocations", json={"dataframe_split": {"columns": ["image"], "data": rows}}, timeout=30
    )


def test_two_jpegs_give_two_predictions(server: str) -> None:
    response = _invoke(server, [solid(COLOURS["A"], 120, 80), solid(COLOURS["C"], 50, 90)])
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == ["A", "C"]
    for prediction in predictions:
        probabilities = np.asarray(prediction["probabilities"])
        assert probabilities.shape == (len(CLASSES),)
        assert abs(probabilities.sum() - 1.0) < 1e-5
        assert prediction["label"] == CLASSES[int(probabilities.argmax())]
        assert prediction["probability"] == pytest.approx(probabilities.max())


def test_a_non_image_is_4xx_naming_it_and_the_server_carries_on(server: str) -> None:
    response = _invoke(server, [solid(COLOURS["B"]), b"plain text, not a picture"])
    assert response.status_code == 400  # as the README says
    assert response.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "image at row 1: not an image format" in response.json()["message"]
    again = _invoke(server, [noisy(3), solid(COLOURS["B"])])
    assert again.status_code == 200 and again.json()["predictions"][1]["label"] == "B"


def test_an_image_over_the_decode_budget_is_400_naming_it(server: str) -> None:
    """A 4200x4200 RGBA PNG decodes to 71 MB, over the server's 64 MB budget: refused, not decoded."""
    big = encode(Image.new("RGBA", (4200, 4200), (*COLOURS["A"], 255)), "PNG")
    response = _invoke(server, [solid(COLOURS["B"]), big])
    assert response.status_code == 400, response.text
    assert "image at row 1: too large to decode here" in response.json()["message"]
    assert "ASL_DECODE_MEMORY_MB" in response.json()["message"]
    assert _invoke(server, [solid(COLOURS["C"])]).json()["predictions"][0]["label"] == "C"


def test_the_log_says_which_precision_runs(served) -> None:
    _, log = served
    expected = precision(torch.device("cpu"), True)
    assert f"small_cnn on cpu: forward passes in {expected}" in log.read_text()


def test_the_readme_curl_example(server: str, tmp_path: Path) -> None:
    serving = (REPO / "README.md").read_text().split("## Serving", 1)[1]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", serving, re.DOTALL) if "curl" in b)
    image = tmp_path / "red.jpg"
    image.write_bytes(solid(COLOURS["A"]))
    script = re.sub(r"^IMAGE=.*$", f"IMAGE={image}", block, flags=re.MULTILINE).replace(
        "http://127.0.0.1:5001", server
    )
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert '"label": "A"' in out.stdout, out.stdout + out.stderr
