"""Classify image files with the registered champion, or any MLflow model.

    python -m pipeline predict photo.jpg more/ [--model URI_OR_DIR] [--top-k 5] [--json]

The files' bytes go to the logged model as they are; it decodes and normalizes them itself. An
unreadable file becomes an error row and the command exits 1. The web page loads models the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.serving.imaging import is_image_name

_BATCH = 64  # files per model call: bounds memory for a folder of thousands
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


@dataclass(frozen=True)
class ModelRef:
    """Which model answers: what was asked for, what is loaded, and its registry name and version.

    An alias is resolved to its version once, and that version is loaded: if the alias moves
    while a server runs, the version reported is still the one answering.
    """

    uri: str
    load_uri: str
    name: str | None = None
    version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "uri": self.uri}

    def describe(self) -> str:
        return f"{self.name} version {self.version}" if self.version is not None else self.uri


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # mlflow.pyfunc.PyFuncModel
    classes: list[str]
    ref: ModelRef


# --- finding and loading the model ----------------------------------------------------------------


def use_store() -> str:
    """Point MLflow (tracking and registry) at the pipeline's store, and return its URI.

    A missing sqlite file is an error, not a new empty store: opening one would create it.
    """
    import mlflow

    from pipeline.tracking import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(
            f"no MLflow store at {uri.removeprefix('sqlite:///')}: "
            "run `dvc repro` first, or set MLFLOW_TRACKING_URI"
        )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _unreachable(err: Exception) -> bool:
    """A tracking server that did not answer is not a missing model: the command line says which."""
    from pipeline.tracking import unreachable

    return unreachable(err)


def _registry_ref(uri: str, name: str, alias: str | None, version: str | None) -> ModelRef:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    store = use_store()
    if alias is None:
        number = int(version) if version and version.isdigit() else None
        return ModelRef(uri, uri, name if number is not None else None, number)
    try:
        found = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if _unreachable(err):
            raise
        raise UserError(
            f"no version of the registered model {name!r} has the alias {alias!r} in {store}: "
            "run `dvc repro` (its promote stage registers the model and sets `champion`) "
            "or `python -m pipeline promote`, or pass --model"
        ) from None
    return ModelRef(uri, f"models:/{name}/{found.version}", name, int(found.version))


def resolve_model(uri_or_dir: str) -> ModelRef:
    """A `ModelRef` for a registry URI, a run's model URI or a local model folder."""
    match = _REGISTRY_URI.match(uri_or_dir)
    if match and (
        match["alias"] or match["version"]
    ):  # `models:/<id>` alone is a logged model, not a registered one
        return _registry_ref(uri_or_dir, match["name"], match["alias"], match["version"])
    if uri_or_dir.startswith(("models:/", "runs:/")):
        use_store()
        return ModelRef(uri_or_dir, uri_or_dir)
    folder = Path(uri_or_dir)
    if folder.is_dir():
        if not (folder / "MLmodel").is_file():
            raise UserError(
                f"{folder} is not an MLflow model folder (no MLmodel file): pass a logged model's folder, "
                "`runs:/<run_id>/model`, or `models:/<name>@champion`"
            )
        return ModelRef(str(folder.resolve()), str(folder.resolve()))
    if "://" in uri_or_dir or ":/" in uri_or_dir:
        return ModelRef(
            uri_or_dir, uri_or_dir
        )  # another MLflow artifact URI (s3://, file:/...): MLflow decides
    raise UserError(
        f"{uri_or_dir!r} is neither a model folder nor a model URI "
        "(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model)"
    )


def model_classes(model: Any) -> list[str]:
    """Class names in the order of the model's `probabilities`: its metadata, else its config."""
    classes = (model.metadata.metadata or {}).get("classes")
    if classes is None:
        classes = getattr(model.unwrap_python_model(), "classes", None)
    if not classes:
        raise UserError(
            "the model carries no class names: is it an ASL classifier logged by `python -m pipeline train`?"
        )
    return [str(name) for name in classes]


def load_model(uri_or_dir: str) -> LoadedModel:
    """Load a model once, with its class names and the registry version it is."""
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = resolve_model(uri_or_dir)
    try:
        model = mlflow.pyfunc.load_model(ref.load_uri)
    except (MlflowException, OSError) as err:
        if _unreachable(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load the model {ref.uri}: {reason}") from None
    return LoadedModel(model, model_classes(model), ref)


# --- classifying -----------------------------------------------------------------------------------


def top_k(
    probabilities: Sequence[float] | np.ndarray, classes: Sequence[str], k: int
) -> list[dict[str, Any]]:
    """The `k` most probable classes, most probable first (ties in class order)."""
    values = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(-values, kind="stable")[:k]
    return [{"label": classes[i], "probability": float(values[i])} for i in order]


def classify(model: Any, images: list[bytes]) -> list[np.ndarray | str]:
    """Per image, its class probabilities or why it could not be classified.

    The model rejects a whole batch for one bad image and names its row (`InvalidImage.row`):
    that row is recorded as failed and the rest are sent again.
    """
    from mlflow.exceptions import MlflowException

    results: list[np.ndarray | str] = [""] * len(images)
    pending = list(range(len(images)))
    while pending:
        try:
            frame = model.predict(pd.DataFrame({"image": [images[i] for i in pending]}))
        except (MlflowException, ValueError) as err:
            row = getattr(err, "row", None)
            if not isinstance(row, int) or not 0 <= row < len(pending):
                raise
            results[pending.pop(row)] = str(getattr(err, "reason", err))
            continue
        for index, probabilities in zip(pending, frame["probabilities"], strict=True):
            results[index] = np.asarray(probabilities, dtype=np.float64)
        break
    return results


def image_files(paths: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their images (recursively, sorted)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name))
            if not inside:
                raise UserError(f"{path} holds no .jpg, .jpeg or .png files")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist")
    return found


def _read(path: Path) -> bytes | str:
    try:
        return path.read_bytes()
    except OSError as err:
        return f"cannot read the file ({err.strerror or err})"


def predict_files(loaded: LoadedModel, files: Sequence[Path], k: int) -> list[dict[str, Any]]:
    """One result per file: label, probability and top-k, or the error."""
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), _BATCH):
        chunk = files[start : start + _BATCH]
        contents = [_read(path) for path in chunk]
        readable = {i: data for i, data in enumerate(contents) if isinstance(data, bytes)}
        answers = dict(zip(readable, classify(loaded.model, list(readable.values())), strict=True))
        for i, path in enumerate(chunk):
            answer = answers.get(i, contents[i])
            results.append(_result(str(path), answer, loaded.classes, k))
    return results


def _result(file: str, answer: np.ndarray | bytes | str, classes: list[str], k: int) -> dict[str, Any]:
    if isinstance(answer, np.ndarray):
        ranked = top_k(answer, classes, k)
        return {
            "file": file,
            "label": ranked[0]["label"],
            "probability": ranked[0]["probability"],
            "top_k": ranked,
        }
    return {"file": file, "error": str(answer)}


# --- output ----------------------------------------------------------------------------------------


def render_table(results: list[dict[str, Any]], ref: ModelRef, k: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{ref.describe()}", title_justify="left")
    # File names get room first: an error message may wrap, a name cut in the middle is unreadable.
    longest = max((len(result["file"]) for result in results), default=4)
    table.add_column("file", overflow="fold", min_width=min(longest, 48))
    table.add_column("prediction", no_wrap=True)
    table.add_column(f"top {k}", overflow="fold")
    for result in results:
        if "error" in result:
            table.add_row(escape(result["file"]), "[red]error[/red]", f"[red]{escape(result['error'])}[/red]")
        else:
            ranked = "\n".join(f"{item['label']:<7} {item['probability']:6.1%}" for item in result["top_k"])
            table.add_row(escape(result["file"]), f"[bold]{escape(result['label'])}[/bold]", ranked)
    Console().print(table)


def run_predict(images: list[Path], model_uri: str, k: int, as_json: bool) -> int:
    """The command's body; returns the exit code (1 when any file failed)."""
    files = image_files(images)
    loaded = load_model(model_uri)
    results = predict_files(loaded, files, k)
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        render_table(results, loaded.ref, k)
    return 1 if any("error" in result for result in results) else 0
