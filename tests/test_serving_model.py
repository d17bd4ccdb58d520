"""The logged pyfunc must classify raw images of any size and mode exactly as training
preprocessing would, in any batch size, from bytes, raw pixels or the scoring server's JSON, and
say which image is bad when one is.

One small CNN is trained for a few steps to tell red (A), green (B) and blue (C) apart, logged
once into an MLflow store under tmp_path, and loaded once; the tests share it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel, PythonModelContext
from mlflow.pyfunc.scoring_server import invocations
from PIL import Image
from safetensors.torch import load_file

from pipeline.dataset import CLASSES
from pipeline.errors import UserError
from pipeline.serving import pyfunc
from pipeline.serving.imaging import decode_image, normalize
from pipeline.serving.limits import MIB, MemoryBudget
from pipeline.serving.networks import build_model
from pipeline.serving.precision import precision
from pipeline.serving.pyfunc import (
    BF16_ENV,
    CONFIG_FILE,
    DECODE_MEMORY_ENV,
    WEIGHTS_FILE,
    AslClassifier,
    log_pyfunc_model,
)

from conftest import REPO
from serving_support import COLOURS, SIZE, pinned_store, write_model_dir

# --- fixtures ----------------------------------------------------------------------------------


def _colour_batch(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name, rgb in COLOURS.items():
        noise = rng.integers(-40, 40, size=(per_class, SIZE, SIZE, 3))
        images.append(np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8))
        labels += [CLASSES.index(name)] * per_class
    return np.concatenate(images), np.asarray(labels)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_cnn trained 25 steps on solid colours, saved per the training contract."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("small_cnn", len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # a net this small trains faster without thread hand-offs, and busy CPUs stall them
    try:
        for _ in range(25):
            pixels, labels = _colour_batch(rng, per_class=4)
            loss = torch.nn.functional.cross_entropy(
                model(torch.from_numpy(normalize(pixels))), torch.from_numpy(labels)
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return write_model_dir(tmp_path_factory.mktemp("models") / "dp", model.eval())


@pytest.fixture(scope="module")
def logged(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(ModelInfo, the store's tmp folder): logged into a fresh sqlite store, with sockets refused
    while logging so that any attempt to reach the network fails the test."""
    root = tmp_path_factory.mktemp("mlflow")
    with pinned_store(root):
        experiment = mlflow.create_experiment("serving-test", artifact_location=(root / "artifacts").as_uri())
        attempts: list[object] = []

        def refuse(sock: socket.socket, address: object) -> None:
            attempts.append(address)  # recorded too: a caller might swallow the error
            raise OSError(f"the test forbids network access while logging (to {address})")

        with pytest.MonkeyPatch.context() as offline, mlflow.start_run(experiment_id=experiment):
            offline.setattr(socket.socket, "connect", refuse)
            info = log_pyfunc_model(model_dir, registered_model_name="asl-serving-test")
        assert attempts == [], f"logging the model tried to connect to {attempts}"
        yield info, root


@pytest.fixture(scope="module")
def served(logged) -> PyFuncModel:
    info, _ = logged
    return mlflow.pyfunc.load_model(info.model_uri)


@pytest.fixture(scope="module")
def model_files(logged) -> Path:
    """The logged model's folder, as `mlflow models serve` would fetch it."""
    info, root = logged
    return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "download")))


# --- images ------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _random_pixels(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _mixed_images() -> list[bytes]:
    """Five images of different sizes, modes and formats."""
    rgb = Image.fromarray(_random_pixels(200, 200, 1))
    grey = Image.fromarray(_random_pixels(48, 64, 2)[..., 0])  # 64 wide, 48 high, mode L
    rgba = Image.fromarray(np.dstack([_random_pixels(90, 31, 3), np.full((90, 31), 128, np.uint8)]))
    palette = Image.fromarray(_random_pixels(31, 90, 4)).convert("P", palette=Image.Palette.ADAPTIVE)
    return [
        _encode(rgb, "JPEG"),
        _encode(grey, "JPEG"),
        _encode(rgba, "PNG"),
        _encode(palette, "PNG"),
        _encode(Image.fromarray(_random_pixels(50, 50, 5)), "PNG"),
    ]


def _solid(rgb: tuple[int, int, int], height: int, width: int) -> bytes:
    return _encode(Image.new("RGB", (width, height), rgb), "PNG")


def _probabilities(result: pd.DataFrame) -> np.ndarray:
    return np.asarray(result["probabilities"].tolist(), dtype=np.float64)


def _classifier(model_dir: Path, config_file: Path | None = None) -> AslClassifier:
    """An AslClassifier loaded straight from a model folder, as MLflow would load it."""
    classifier = AslClassifier()
    config = config_file or model_dir / CONFIG_FILE
    classifier.load_context(
        PythonModelContext({"weights": str(model_dir / WEIGHTS_FILE), "config": str(config)}, None)
    )
    return classifier


def _direct_forward(model_dir: Path, images: list[bytes]) -> np.ndarray:
    """The trained weights on training-time preprocessing, without MLflow or the pyfunc."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    model = build_model(config["model"]["name"], len(config["classes"]))
    model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE)))
    pixels = np.stack([decode_image(image, config["image_size"]) for image in images])
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(normalize(pixels, config["mean"], config["std"])))
    return torch.softmax(logits, dim=1).numpy()


# --- (i) batches of encoded images -------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 5])
def test_batches_of_any_size_and_mode(served: PyFuncModel, count: int) -> None:
    result = served.predict(pd.DataFrame({"image": _mixed_images()[:count]}))
    assert isinstance(result, pd.DataFrame)
    assert list(result.columns) == ["label", "probability", "probabilities"]
    assert len(result) == count
    probabilities = _probabilities(result)
    assert probabilities.shape == (count, len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result["label"].tolist() == [CLASSES[i] for i in probabilities.argmax(axis=1)]
    np.testing.assert_allclose(result["probability"], probabilities.max(axis=1))


def test_labels_follow_the_class_order(served: PyFuncModel) -> None:
    images = [
        _solid(COLOURS[name], height, width)
        for name, (height, width) in zip("CAB", [(120, 80), (30, 30), (64, 200)], strict=True)
    ]
    result = served.predict(pd.DataFrame({"image": images}))
    assert isinstance(result, pd.DataFrame) and result["label"].tolist() == ["C", "A", "B"]


def test_classes_travel_with_the_model(served: PyFuncModel, model_files: Path) -> None:
    assert served.metadata.metadata is not None
    assert served.metadata.metadata["classes"] == list(CLASSES)
    config = json.loads((model_files / "artifacts" / CONFIG_FILE).read_text())
    assert config["classes"] == list(CLASSES)
    assert {spec.name: spec.required for spec in served.metadata.get_input_schema().inputs} == {
        "image": False,
        "pixels": False,
    }


# --- (ii) the preprocessing is the training one -------------------------------------------------


def test_matches_a_direct_forward_pass(served: PyFuncModel, model_dir: Path, monkeypatch) -> None:
    """In fp32 to float rounding; in bf16 (the default where the CPU computes it natively) to bf16's."""
    images = _mixed_images()
    expected = _direct_forward(model_dir, images)
    assert served.unwrap_python_model().precision == precision(torch.device("cpu"), True)
    np.testing.assert_allclose(
        _probabilities(served.predict(pd.DataFrame({"image": images}))), expected, atol=1e-2
    )
    monkeypatch.setenv(BF16_ENV, "0")
    fp32 = _classifier(model_dir)
    assert fp32.precision == "fp32"
    np.testing.assert_allclose(
        _probabilities(fp32.predict(None, pd.DataFrame({"image": images}))), expected, atol=1e-5
    )


@pytest.mark.parametrize(("bf16", "tolerance"), [(False, 1e-6), (True, 1e-2)])
def test_a_batched_forward_pass_equals_one_image_at_a_time(
    model_dir: Path, bf16: bool, tolerance: float
) -> None:
    classifier = _classifier(model_dir)
    classifier.precision = precision(torch.device("cpu"), bf16)
    pixels = np.stack([decode_image(image, SIZE) for image in _mixed_images()])
    one_at_a_time = np.concatenate([classifier.probabilities(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(classifier.probabilities(pixels), one_at_a_time, atol=tolerance)


def test_precision_follows_the_environment(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv(BF16_ENV, "1")
    assert _classifier(model_dir).precision == precision(torch.device("cpu"), True)
    monkeypatch.setenv(BF16_ENV, "0")
    assert _classifier(model_dir).precision == "fp32"
    monkeypatch.setenv(BF16_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{BF16_ENV}='maybe': expected 1 or 0"):
        _classifier(model_dir)


# --- (iii) raw pixels --------------------------------------------------------------------------


def test_raw_pixels_match_encoded_png(served: PyFuncModel) -> None:
    arrays = [_random_pixels(200, 200, 11), _random_pixels(64, 48, 12), _random_pixels(31, 90, 13)]
    pngs = [_encode(Image.fromarray(array), "PNG") for array in arrays]
    from_png = _probabilities(served.predict(pd.DataFrame({"image": pngs})))
    from_arrays = _probabilities(served.predict(pd.DataFrame({"pixels": arrays})))
    from_lists = _probabilities(
        served.predict(pd.DataFrame({"pixels": [array.tolist() for array in arrays]}))
    )
    np.testing.assert_allclose(from_arrays, from_png, atol=1e-6)
    np.testing.assert_allclose(from_lists, from_png, atol=1e-6)


def test_a_batch_may_mix_bytes_and_pixels(served: PyFuncModel) -> None:
    array = _random_pixels(40, 70, 21)
    png = _encode(Image.fromarray(array), "PNG")
    mixed = pd.DataFrame({"image": [png, None], "pixels": [None, array]})
    probabilities = _probabilities(served.predict(mixed))
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-6)


# --- (iv) errors name the row ------------------------------------------------------------------


def test_non_image_bytes_name_the_row(served: PyFuncModel) -> None:
    images = [_solid((1, 2, 3), 20, 20), b"this is not an image, just some text"]
    with pytest.raises(ValueError, match=r"image at row 1: not an image format") as caught:
        served.predict(pd.DataFrame({"image": images}))
    assert isinstance(caught.value, MlflowException) and caught.value.get_http_status_code() == 400


def test_truncated_image_names_the_row(served: PyFuncModel) -> None:
    good = _encode(Image.fromarray(_random_pixels(60, 60, 31)), "PNG")
    with pytest.raises(ValueError, match=r"image at row 2: unreadable or truncated"):
        served.predict(pd.DataFrame({"image": [good, good, good[: len(good) // 2]]}))


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (np.zeros((10, 10, 3), np.float32), "integers 0-255"),
        (np.full((10, 10, 3), 300), "0-255"),
        (np.zeros((10, 10, 2), np.uint8), "HxW, HxWx3 or HxWx4"),
        ([[1, 2, 3], [4, 5]], "not a rectangular array"),
    ],
)
def test_bad_pixels_name_the_row(served: PyFuncModel, cell: object, message: str) -> None:
    with pytest.raises(ValueError, match=rf"image at row 1: .*{message}"):
        served.predict(pd.DataFrame({"pixels": [np.zeros((8, 8, 3), np.uint8), cell]}))


def test_a_row_needs_exactly_one_source(served: PyFuncModel) -> None:
    with pytest.raises(ValueError, match=r"image at row 0: fill exactly one"):
        served.predict(pd.DataFrame({"image": [None], "pixels": [None]}))
    with pytest.raises(ValueError, match=r"image at row 1: 'image' is empty"):
        served.predict(pd.DataFrame({"image": [_solid((1, 1, 1), 9, 9), b""]}))
    with pytest.raises(MlflowException, match=r"neither a column 'image'"):
        served.predict(pd.DataFrame({"photo": [b"..."]}))


def test_over_limit_pixels_are_refused(model_dir: Path, tmp_path: Path) -> None:
    """`max_image_pixels` in model_config.json caps both encoded images and raw arrays."""
    config = json.loads((model_dir / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "max_image_pixels": 1024}))
    classifier = _classifier(model_dir, tmp_path / CONFIG_FILE)
    small, big = _solid((9, 9, 9), 32, 32), _solid((9, 9, 9), 40, 40)
    assert len(classifier.predict(None, pd.DataFrame({"image": [small]}))) == 1
    with pytest.raises(
        ValueError, match=r"image at row 1: too large: 40x40 pixels is over the limit of 1024"
    ):
        classifier.predict(None, pd.DataFrame({"image": [small, big]}))
    with pytest.raises(ValueError, match=r"image at row 0: 40x40 pixels is over the limit"):
        classifier.predict(None, pd.DataFrame({"pixels": [np.zeros((40, 40, 3), np.uint8)]}))


def test_a_decompression_bomb_names_the_models_limit(served: PyFuncModel) -> None:
    """PIL refuses 20000x20000 itself (over twice its own limit); the message names the model's limit."""
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    limit = served.unwrap_python_model().max_pixels
    with pytest.raises(ValueError, match=rf"image at row 0: too large: over the limit of {limit} pixels$"):
        served.predict(pd.DataFrame({"image": [bomb]}))


def test_an_image_over_the_decode_budget_is_400_naming_it(model_dir: Path) -> None:
    """A 2100x2100 RGBA PNG is decoded whole, 17.6 MB: more than a 16 MB budget can ever give."""
    classifier = _classifier(model_dir)
    classifier.budget = MemoryBudget(16 * MIB)
    png = _encode(Image.new("RGBA", (2100, 2100), (200, 10, 10, 255)), "PNG")
    with pytest.raises(
        MlflowException, match=rf"image at row 1: too large to decode here: .* 16 MB \({DECODE_MEMORY_ENV}\)"
    ) as caught:
        classifier.predict(None, pd.DataFrame({"image": [_solid((1, 2, 3), 20, 20), png]}))
    assert caught.value.get_http_status_code() == 400


def test_the_decode_budget_is_the_processs_sized_from_the_environment(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setattr(pyfunc, "_SHARED_BUDGET", None)
    monkeypatch.setenv(DECODE_MEMORY_ENV, "300")
    first, second = _classifier(model_dir), _classifier(model_dir)
    assert first.budget is second.budget and first.budget.capacity == 300 * MIB


# --- (v) the scoring server's JSON -------------------------------------------------------------


def _invoke(model: PyFuncModel, body: dict) -> list[dict]:
    """What `mlflow models serve` does with a POST to /invocations, minus the HTTP."""
    response = invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    assert response.status == 200, response.response
    return json.loads(response.response)["predictions"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_json_dataframe_split_with_base64(served: PyFuncModel) -> None:
    images = _mixed_images()
    body = {"dataframe_split": {"columns": ["image"], "data": [[_b64(image)] for image in images]}}
    predictions = _invoke(served, body)
    expected = served.predict(pd.DataFrame({"image": images}))
    assert isinstance(expected, pd.DataFrame)
    assert [p["label"] for p in predictions] == expected["label"].tolist()
    np.testing.assert_allclose([p["probabilities"] for p in predictions], _probabilities(expected), atol=1e-7)
    assert set(predictions[0]) == {"label", "probability", "probabilities"}


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_records": [{"image": "<png>"}, {"image": "<png>"}]},
        {"dataframe_split": {"columns": ["pixels"], "data": [["<pixels>"], ["<pixels>"]]}},
        {"dataframe_records": [{"pixels": "<pixels>"}, {"pixels": "<pixels>"}]},
        # MLflow leaves base64 undecoded in these two formats: the model decodes it.
        {"inputs": {"image": ["<png>", "<png>"]}},
        {"instances": [{"image": "<png>"}, {"image": "<png>"}]},
        {"inputs": {"pixels": ["<pixels>", "<pixels>"]}},
    ],
    ids=[
        "records-image",
        "split-pixels",
        "records-pixels",
        "inputs-image",
        "instances-image",
        "inputs-pixels",
    ],
)
def test_every_json_format_gives_the_same_answer(served: PyFuncModel, body: dict) -> None:
    array = _random_pixels(30, 50, 41)
    png = _encode(Image.fromarray(array), "PNG")
    filled = json.loads(
        json.dumps(body)
        .replace('"<png>"', json.dumps(_b64(png)))
        .replace('"<pixels>"', json.dumps(array.tolist()))
    )
    expected = _probabilities(served.predict(pd.DataFrame({"image": [png]})))[0]
    predictions = _invoke(served, filled)
    assert len(predictions) == 2
    for prediction in predictions:
        np.testing.assert_allclose(prediction["probabilities"], expected, atol=1e-6)


def test_base64_text_works_in_process_too(served: PyFuncModel) -> None:
    png = _solid(COLOURS["B"], 30, 60)
    result = served.predict(pd.DataFrame({"image": [_b64(png), base64.encodebytes(png)]}))
    assert isinstance(result, pd.DataFrame)
    assert result["label"].tolist() == ["B", "B"]


def test_json_errors_are_400_and_name_the_row(served: PyFuncModel) -> None:
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[_b64(_solid((5, 5, 5), 9, 9))], [_b64(b"not an image at all")]],
        }
    }
    with pytest.raises(MlflowException) as caught:
        invocations(json.dumps(body), "application/json", served, served.metadata.get_input_schema())
    assert caught.value.get_http_status_code() == 400
    assert "image at row 1: not an image format" in caught.value.message


def test_no_room_to_decode_is_503_from_the_scoring_server(served: PyFuncModel, monkeypatch) -> None:
    """`mlflow models serve`'s own app: with the decode budget taken and no room to wait, 503."""
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    budget = MemoryBudget(64 * MIB, max_waiting=0)
    monkeypatch.setattr(served.unwrap_python_model(), "budget", budget)
    body = {"dataframe_split": {"columns": ["image"], "data": [[_b64(_solid((5, 5, 5), 9, 9))]]}}
    with TestClient(scoring_server.init(served)) as client:
        with budget.reserve(60 * MIB):
            response = client.post("/invocations", json=body)
        assert response.status_code == 503, response.text
        assert response.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        assert "busy" in response.json()["message"] and "retry" in response.json()["message"]
        assert client.post("/invocations", json=body).status_code == 200


def test_logged_serving_example_is_a_batch_that_serves(served: PyFuncModel, model_files: Path) -> None:
    example = json.loads((model_files / "serving_input_example.json").read_text())
    assert len(example["dataframe_split"]["data"]) == 2
    assert len(_invoke(served, example)) == 2


# --- packaging ---------------------------------------------------------------------------------


def test_logging_needs_an_active_run(model_dir: Path, tmp_path: Path) -> None:
    assert mlflow.active_run() is None
    with pytest.raises(MlflowException, match="active MLflow run"):
        log_pyfunc_model(model_dir)
    with pytest.raises(UserError, match="train the model first"):
        log_pyfunc_model(tmp_path)


def test_a_folder_that_cannot_serve_is_not_logged(logged, model_dir: Path, tmp_path: Path) -> None:
    """MLflow only warns when the input example fails; log_pyfunc_model must refuse outright."""
    broken = write_model_dir(tmp_path / "broken", build_model("small_cnn", 3))  # 3-class head, 29 classes
    found = mlflow.get_experiment_by_name("serving-test")
    assert found is not None
    experiment = found.experiment_id
    with mlflow.start_run(experiment_id=experiment):
        with pytest.raises(RuntimeError, match="size mismatch"):
            log_pyfunc_model(broken)
        with pytest.raises(ValueError, match="image at row 1"):
            log_pyfunc_model(model_dir, input_example_images=[_solid((1, 2, 3), 8, 8), b"junk"])
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert [model.model_id for model in models] == [logged[0].model_id]  # nothing new was logged


def test_requirements_are_pinned(model_files: Path) -> None:
    requirements = (model_files / "requirements.txt").read_text().split()
    for package in ("mlflow", "torch", "torchvision", "pillow", "numpy", "pandas", "safetensors"):
        assert any(line.lower().startswith(f"{package}==") for line in requirements), (package, requirements)


def test_the_model_ships_only_the_serving_code(model_files: Path) -> None:
    code = model_files / "code"
    shipped = sorted(path.relative_to(code).as_posix() for path in code.rglob("*.py"))
    serving = sorted(f"pipeline/serving/{path.name}" for path in (REPO / "pipeline" / "serving").glob("*.py"))
    assert shipped == sorted(["pipeline/__init__.py", "pipeline/errors.py", *serving])


def test_loads_outside_the_repository(model_files: Path, tmp_path: Path) -> None:
    """A fresh interpreter that cannot see this checkout imports `pipeline` from the model."""
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import pipeline\n"
        "assert pipeline.__file__.startswith(sys.argv[1]), pipeline.__file__\n"
        "print(model.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]}))['label'][0])\n"
    )
    (tmp_path / "red.png").write_bytes(_solid(COLOURS["A"], 50, 70))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(model_files), str(tmp_path / "red.png")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "A"
