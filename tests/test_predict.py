"""`python -m pipeline predict`: the champion by default, files and folders, a table or JSON, bad
files reported without stopping the rest, and a missing champion as one line with exit code 2.

The champion is the colour model (red A, green B, blue C) in a private store; the command runs
in-process through typer's CliRunner.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

from serving_support import COLOURS, colour_champion, noisy, solid


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    with colour_champion(tmp_path_factory.mktemp("predict-store")) as found:
        yield found


@pytest.fixture(scope="module")
def params(champion, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("predict-params") / "params.yaml"
    path.write_text(yaml.safe_dump({"mlflow": {"registered_model": champion.name}}))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """red.jpg, green.PNG, nested/blue.jpeg and a text file that is not an image."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "nested").mkdir()
    (folder / "red.jpg").write_bytes(solid(COLOURS["A"], 90, 60))
    (folder / "green.PNG").write_bytes(solid(COLOURS["B"], fmt="PNG"))
    (folder / "nested" / "blue.jpeg").write_bytes(solid(COLOURS["C"], 40, 70))
    (folder / "notes.txt").write_text("not an image, and not named like one")
    return folder


def _run(*args: str):
    return CliRunner().invoke(app, ["predict", *args])


def _json(*args: str) -> list[dict]:
    result = _run(*args, "--json")
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


def test_table_from_the_champion(champion, params: Path, images: Path) -> None:
    result = _run(str(images / "red.jpg"), str(images / "green.PNG"), "--params", str(params), "--top-k", "3")
    assert result.exit_code == 0, result.output
    assert f"{champion.name} version {champion.version}" in result.stdout
    rows = [line for line in result.stdout.splitlines() if "red.jpg" in line or "green.PNG" in line]
    assert len(rows) == 2
    assert "│ A " in rows[0] and "│ B " in rows[1]
    assert "100.0%" in result.stdout or "99." in result.stdout


def test_json_is_the_models_answer(params: Path, images: Path, champion) -> None:
    files = [images / "red.jpg", images / "nested" / "blue.jpeg"]
    results = _json(*map(str, files), "--params", str(params), "--top-k", "4")
    model = mlflow.pyfunc.load_model(champion.uri)
    expected = model.predict(pd.DataFrame({"image": [path.read_bytes() for path in files]}))
    assert [r["file"] for r in results] == [str(path) for path in files]
    assert [r["label"] for r in results] == expected["label"].tolist() == ["A", "C"]
    classes = model.metadata.metadata["classes"]
    for result, row in zip(results, expected["probabilities"], strict=True):
        order = np.argsort(-np.asarray(row), kind="stable")[:4]
        assert [item["label"] for item in result["top_k"]] == [classes[i] for i in order]
        np.testing.assert_allclose([item["probability"] for item in result["top_k"]], np.asarray(row)[order])
        assert result["probability"] == result["top_k"][0]["probability"]


def test_a_folder_means_its_images_sorted(params: Path, images: Path) -> None:
    results = _json(str(images), "--params", str(params))
    names = [Path(r["file"]).relative_to(images).as_posix() for r in results]
    assert names == ["green.PNG", "nested/blue.jpeg", "red.jpg"]  # notes.txt is not an image name
    assert [r["label"] for r in results] == ["B", "C", "A"]
    assert all(len(r["top_k"]) == 5 for r in results)


def test_a_bad_file_is_reported_and_the_rest_predicted(params: Path, images: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 this is no JPEG")
    (folder / "cut.png").write_bytes(noisy(1, fmt="PNG")[:300])
    result = _run(str(folder), "--params", str(params), "--json")
    assert result.exit_code == 1
    by_name = {Path(r["file"]).name: r for r in json.loads(result.stdout)}
    assert set(by_name) == {"broken.jpg", "cut.png", "green.PNG", "blue.jpeg", "red.jpg"}
    assert "not an image format" in by_name["broken.jpg"]["error"]
    assert "truncated" in by_name["cut.png"]["error"]
    assert [by_name[n]["label"] for n in ("red.jpg", "green.PNG", "blue.jpeg")] == ["A", "B", "C"]
    table = _run(str(folder / "broken.jpg"), str(folder / "red.jpg"), "--params", str(params))
    assert table.exit_code == 1 and "error" in table.stdout and "│ A " in table.stdout


def test_any_model_uri_or_folder(champion, images: Path, tmp_path: Path) -> None:
    local = mlflow.artifacts.download_artifacts(
        f"models:/{champion.name}/{champion.version}", dst_path=str(tmp_path / "model")
    )
    for model in (f"models:/{champion.name}/{champion.version}", local):
        results = _json(str(images / "green.PNG"), "--model", model)  # no params.yaml needed with --model
        assert results[0]["label"] == "B"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "models:/nobody-registered-this@champion"], "has the alias 'champion'"),
        (["--model", "models:/{name}@candidate"], "run `dvc repro`"),
        (["--model", "no/such/folder"], "neither a model folder nor a model URI"),
        (["--model", "{images}"], "not an MLflow model folder"),
    ],
    ids=["no-such-model", "no-such-alias", "no-such-folder", "not-a-model-folder"],
)
def test_no_model_is_one_line_and_exit_2(champion, images: Path, args: list[str], message: str) -> None:
    args = [arg.format(name=champion.name, images=images) for arg in args]
    result = _run(str(images / "red.jpg"), *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_no_champion_by_default_is_one_line(champion, images: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"mlflow": {"registered_model": "nothing-promoted-yet"}}))
    result = _run(str(images / "red.jpg"), "--params", str(params))
    assert result.exit_code == 2
    expected = (
        "error: no version of the registered model 'nothing-promoted-yet' has the alias 'champion' "
        f"in {champion.tracking_uri}: "
        "run `dvc repro` (its promote stage registers the model and sets `champion`) "
        "or `python -m pipeline promote`, or pass --model"
    )
    assert result.stderr.strip().splitlines() == [expected]


def test_no_store_yet_is_one_line(images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    result = _run(str(images / "red.jpg"), "--model", "models:/asl-classifier@champion")
    assert result.exit_code == 2
    assert "no MLflow store" in result.stderr and "dvc repro" in result.stderr
    assert not (tmp_path / "absent").exists()  # looking did not create an empty store


def test_missing_image_path_is_one_line(params: Path, tmp_path: Path) -> None:
    result = _run(str(tmp_path / "nope.jpg"), "--params", str(params))
    assert result.exit_code == 2 and result.stderr.strip() == f"error: {tmp_path / 'nope.jpg'} does not exist"
    (tmp_path / "empty").mkdir()
    result = _run(str(tmp_path / "empty"), "--params", str(params))
    assert result.exit_code == 2 and "holds no .jpg, .jpeg or .png files" in result.stderr
