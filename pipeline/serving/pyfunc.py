"""The served model: an MLflow pyfunc that takes raw images and returns class probabilities.

Input is a DataFrame with, per row, `image` (encoded JPEG/PNG/WebP bytes, or their base64) or
`pixels` (uint8 HxWx3 arrays or nested lists); output is `label`, `probability`, `probabilities`.
The model resizes and normalizes images itself, as training did (`model_config.json`), decodes
within a process-wide memory budget, and runs in bf16 where the processor computes it natively.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Schema
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from pipeline.errors import UserError
from pipeline.serving import DEFAULT_DECODE_MEMORY_MB
from pipeline.serving.imaging import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLarge,
    decode_opened,
    normalize,
    open_image,
    resize_pixels,
)
from pipeline.serving.limits import DEFAULT_DECODE_QUEUE, MIB, Busy, MemoryBudget, OverBudget
from pipeline.serving.networks import build_model
from pipeline.serving.precision import autocast, precision

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
IMAGE_COLUMN = "image"
PIXELS_COLUMN = "pixels"
DEVICE_ENV = "ASL_SERVING_DEVICE"
"""Torch device the served model runs on (default `cpu`; e.g. `cuda` on a GPU server)."""
BF16_ENV = "ASL_SERVING_BF16"
"""`1` (default): bf16 where the device computes it natively (CPUs with AVX512-BF16 or AMX, CUDA),
fp32 elsewhere; `0`: always fp32."""
DECODE_MEMORY_ENV = "ASL_DECODE_MEMORY_MB"
"""Memory that all the process's decodes may hold at once, in MB (default 1024)."""
DECODE_QUEUE_ENV = "ASL_DECODE_QUEUE"
"""Decodes that may wait for that memory (default 32); beyond them a request is answered 503."""

_FORWARD_BATCH = 64  # images per forward pass: bounds the memory a large request takes
# A child of MLflow's logger: MLflow shows its INFO lines wherever the model loads (`mlflow models
# serve` configures no other logging), so the precision that serves is in the server's log.
log = logging.getLogger("mlflow.pyfunc.asl_classifier")
_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# What pipeline.serving imports, pinned to the versions installed here. Given explicitly, MLflow
# does not infer them: inference loads the model in a subprocess to watch its imports (slow, a guess).
_REQUIREMENTS = (
    "mlflow",
    "cloudpickle",
    "torch",
    "torchvision",
    "numpy",
    "pandas",
    "pillow",
    "simplejpeg",
    "safetensors",
)
# What PIL raises for bytes that are not a (complete) image; ImageTooLarge is a ValueError.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")  # standard alphabet, padding, line breaks

# `pixels` is AnyType: MLflow checks an Array(Array(Array(long))) column element by element (about
# 2 s for one 200x200 image); `_pixels_from_cell` checks the array in one vectorized step instead.
INPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
        ColSpec(AnyType(), PIXELS_COLUMN, required=False),
    ]
)
OUTPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.double, "probability"),
        ColSpec(Array(DataType.double), "probabilities"),
    ]
)
SIGNATURE = ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA)


class InvalidImage(MlflowException, ValueError):
    """One input row is not a usable image. An MlflowException with INVALID_PARAMETER_VALUE, so
    the scoring server answers 400 with this message; a ValueError for plain Python callers."""

    def __init__(self, row: int, reason: str, label: Any = None):
        self.row, self.reason = row, reason
        where = f"row {row}" if label is None or label == row else f"row {row} (index {label!r})"
        super().__init__(f"image at {where}: {reason}", error_code=INVALID_PARAMETER_VALUE)


class ServerBusy(MlflowException):
    """Decoding would take more memory than the budget has free, and the line for it is full: the
    scoring server answers 503 (TEMPORARILY_UNAVAILABLE), and the client should retry shortly."""

    def __init__(self, reason: str):
        super().__init__(f"the model server is busy: {reason}", error_code=TEMPORARILY_UNAVAILABLE)


# --- the model folder -------------------------------------------------------------------------


def read_model_config(path: Path) -> dict[str, Any]:
    """`model_config.json` as a dict, with `max_image_pixels` filled in if training left it out."""
    config = json.loads(Path(path).read_text())
    config.setdefault("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
    return config


def load_network(weights: Path, config: dict[str, Any]) -> nn.Module:
    """The trained network in eval mode, rebuilt from its config and safetensors weights."""
    # Never download ImageNet weights: the trained ones replace them all anyway.
    model = build_model(config["model"]["name"], len(config["classes"]))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


# --- turning one input row into pixels ---------------------------------------------------------


def _is_missing(cell: Any) -> bool:
    return cell is None or cell is pd.NA or (isinstance(cell, float) and math.isnan(cell))


def _from_base64(data: bytes) -> bytes | None:
    """The decoded bytes if `data` is base64 text (line breaks allowed), else None."""
    if not _BASE64_TEXT.fullmatch(data):
        return None
    try:
        return base64.b64decode(b"".join(data.split()), validate=True)
    except binascii.Error:  # e.g. plain words: base64 characters, but not base64
        return None


def _bytes_from_cell(cell: Any) -> bytes:
    """The encoded image in an `image` cell: raw bytes, or base64 text of them (str or bytes).

    Base64 arrives undecoded through the `inputs`/`instances` JSON formats (MLflow decodes binary
    columns only in `dataframe_split`/`dataframe_records`) and from clients that pass `str`. Telling
    the two apart is safe: every format PIL reads starts with a binary header, so an image file is
    never made of base64 characters alone.
    """
    if isinstance(cell, str):
        data = cell.encode("utf-8")
    elif isinstance(cell, (bytes, bytearray, memoryview)):
        data = bytes(cell)
    else:
        raise TypeError(
            f"'{IMAGE_COLUMN}' must hold the encoded image as bytes or base64 text, got {type(cell).__name__}"
        )
    if not data:
        raise ValueError(f"'{IMAGE_COLUMN}' is empty")
    decoded = _from_base64(data)
    if decoded is not None:
        return decoded
    if isinstance(cell, str):
        reason = f"'{IMAGE_COLUMN}' holds text that is not base64; send the image bytes or their base64"
        raise ValueError(reason)  # noqa: TRY004
    return data


def _pixels_from_cell(cell: Any) -> np.ndarray:
    """A uint8 array from a numpy array or nested lists (what JSON gives): integers 0-255 only,
    since floats are ambiguous (0-1 or 0-255?)."""
    try:
        array = np.asarray(cell)
    except ValueError as err:  # ragged nested lists
        raise ValueError(f"'{PIXELS_COLUMN}' is not a rectangular array ({err})") from None
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iu" or array.size == 0:
        raise ValueError(f"'{PIXELS_COLUMN}' must hold integers 0-255 (uint8), got dtype {array.dtype}")
    if array.min() < 0 or array.max() > 255:
        raise ValueError(f"'{PIXELS_COLUMN}' values must lie in 0-255, got {array.min()} to {array.max()}")
    return array.astype(np.uint8)


def _describe_decode_error(err: Exception, max_pixels: int) -> str:
    if isinstance(err, Image.UnidentifiedImageError):
        return "not an image format PIL can read (send JPEG or PNG bytes)"
    if isinstance(err, ImageTooLarge):
        return f"too large: {err}"
    if isinstance(
        err, Image.DecompressionBombError
    ):  # PIL's own guard, far above ours: its message cites its limit
        return f"too large: over the limit of {max_pixels} pixels"
    return f"unreadable or truncated image ({type(err).__name__}: {err})"


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{name}={text!r}: expected an integer >= {minimum}")
    return int(text)


def _env_bf16() -> bool:
    text = os.environ.get(BF16_ENV, "1").strip().lower()
    if text not in ("1", "0", "true", "false"):
        raise ValueError(f"{BF16_ENV}={text!r}: expected 1 or 0")
    return text in ("1", "true")


_SHARED_BUDGET: MemoryBudget | None = None


def shared_decode_budget() -> MemoryBudget:
    """The process's decode budget, sized from the environment once: every model loaded in the
    process decodes within it, since they share the process's memory."""
    global _SHARED_BUDGET
    if _SHARED_BUDGET is None:
        megabytes = _env_int(DECODE_MEMORY_ENV, DEFAULT_DECODE_MEMORY_MB, 1)
        _SHARED_BUDGET = MemoryBudget(megabytes * MIB, _env_int(DECODE_QUEUE_ENV, DEFAULT_DECODE_QUEUE, 0))
    return _SHARED_BUDGET


def inference_network(network: nn.Module, precision_: str) -> nn.Module:
    """The channels_last `network` as a forward pass in `precision_` runs it: itself for fp32; for
    bf16 a copy with its weights cast once (autocast would cast fp32 weights on every forward pass)."""
    return copy.deepcopy(network).to(torch.bfloat16).eval() if precision_ == "bf16" else network


# --- the pyfunc --------------------------------------------------------------------------------


class AslClassifier(PythonModel):
    """Raw images in, class probabilities out; see the module docstring for the formats.

    The web page calls `prepare_image` and `probabilities` directly, from its own threads: both are
    safe to call concurrently. `max_pixels`, `budget` and `precision` may be changed after loading.
    """

    def load_context(self, context: PythonModelContext) -> None:
        config = read_model_config(Path(context.artifacts["config"]))
        self.classes: list[str] = list(config["classes"])
        self.image_size = int(config["image_size"])
        self.mean, self.std = tuple(config["mean"]), tuple(config["std"])
        self.max_pixels = int(config["max_image_pixels"])
        self.device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
        self.budget = shared_decode_budget()
        network = load_network(Path(context.artifacts["weights"]), config)
        self.network = network.to(self.device).to(memory_format=torch.channels_last)
        self._networks: dict[str, nn.Module] = {}
        self.precision = precision(self.device, _env_bf16())
        self._network_for(self.precision)
        log.info("%s on %s: forward passes in %s", config["model"]["name"], self.device.type, self.precision)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # The pd.DataFrame hint is one MLflow does not infer a signature from or validate against:
        # the explicit SIGNATURE is the one enforced.
        pixels = self._prepare_batch(model_input)
        return self._result_frame(self.probabilities(pixels))

    def prepare_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> uint8 pixels for `probabilities`, decoded within the decode budget.

        Raises `ImageTooLarge`, PIL's errors, `OverBudget` (never decodable here) or `Busy` (retry).
        """
        with (
            open_image(data, self.image_size, self.max_pixels) as opened,
            self.budget.reserve(opened.peak_bytes),
        ):
            return decode_opened(opened, self.image_size)

    @torch.inference_mode()
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float64 N x classes, in forward passes of at most 64 images."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.classes)))
        network, chunks = self._network_for(self.precision), []
        for start in range(0, len(pixels), _FORWARD_BATCH):
            images = torch.from_numpy(normalize(pixels[start : start + _FORWARD_BATCH], self.mean, self.std))
            images = images.to(self.device).contiguous(memory_format=torch.channels_last)
            with autocast(self.device, self.precision):
                logits = network(images)
            chunks.append(torch.softmax(logits.float(), dim=1).double().cpu().numpy())
        return np.concatenate(chunks)

    def _network_for(self, precision_: str) -> nn.Module:
        # Two threads may both build a missing one: the same network, and one of them is kept.
        if precision_ not in self._networks:
            self._networks[precision_] = inference_network(self.network, precision_)
        return self._networks[precision_]

    def _prepare_batch(self, frame: pd.DataFrame) -> np.ndarray:
        if not isinstance(frame, pd.DataFrame):
            raise MlflowException.invalid_parameter_value(
                f"expected a DataFrame with a column '{IMAGE_COLUMN}' or '{PIXELS_COLUMN}', "
                f"got {type(frame).__name__}"
            )
        if IMAGE_COLUMN not in frame and PIXELS_COLUMN not in frame:
            raise MlflowException.invalid_parameter_value(
                f"the input has neither a column '{IMAGE_COLUMN}' (encoded image bytes; base64 in JSON) "
                f"nor '{PIXELS_COLUMN}' (uint8 HxWx3 arrays)"
            )
        images = frame[IMAGE_COLUMN] if IMAGE_COLUMN in frame else pd.Series([None] * len(frame))
        arrays = frame[PIXELS_COLUMN] if PIXELS_COLUMN in frame else pd.Series([None] * len(frame))
        rows = zip(frame.index, images.tolist(), arrays.tolist(), strict=True)
        try:
            prepared = [
                self._prepare_row(position, label, image, array)
                for position, (label, image, array) in enumerate(rows)
            ]
        except Busy as err:
            raise ServerBusy(str(err)) from None
        return (
            np.stack(prepared) if prepared else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)
        )

    def _prepare_row(self, position: int, label: Any, image: Any, array: Any) -> np.ndarray:
        if _is_missing(image) == _is_missing(array):
            raise InvalidImage(position, f"fill exactly one of '{IMAGE_COLUMN}' and '{PIXELS_COLUMN}'", label)
        try:
            source = _pixels_from_cell(array) if _is_missing(image) else _bytes_from_cell(image)
        except (TypeError, ValueError) as err:
            raise InvalidImage(position, str(err), label) from None
        try:
            if isinstance(source, bytes):
                return self.prepare_image(source)
            return resize_pixels(source, self.image_size, self.max_pixels)
        except OverBudget as err:
            raise InvalidImage(
                position, f"too large to decode here: {err} ({DECODE_MEMORY_ENV})", label
            ) from None
        except _DECODE_ERRORS as err:
            reason = _describe_decode_error(err, self.max_pixels) if isinstance(source, bytes) else str(err)
            raise InvalidImage(position, reason, label) from None

    def _result_frame(self, probabilities: np.ndarray) -> pd.DataFrame:
        best = probabilities.argmax(axis=1)
        return pd.DataFrame(
            {
                "label": [self.classes[i] for i in best],
                "probability": probabilities[np.arange(len(best)), best].astype(np.float64),
                "probabilities": [row.tolist() for row in probabilities.astype(np.float64)],
            }
        )


# --- logging -----------------------------------------------------------------------------------


def pinned_requirements() -> list[str]:
    """`name==version` for what the served model imports, as installed here, without local
    version labels (`2.14.1+cu130` is not on PyPI; `2.14.1` is)."""
    return [f"{name}=={version(name).split('+')[0]}" for name in _REQUIREMENTS]


def _default_example_images() -> list[bytes]:
    """Two small images of different sizes and formats: a batch, so nothing gets shaped for one."""
    gradient = np.linspace(0, 255, 48 * 64 * 3).reshape(48, 64, 3).astype(np.uint8)
    examples = []
    for pixels, fmt in ((gradient, "JPEG"), (gradient[:40, :40][::-1], "PNG")):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format=fmt)
        examples.append(buffer.getvalue())
    return examples


def _example_frame(images: list | None) -> pd.DataFrame:
    items = _default_example_images() if images is None else images
    encoded = [item if isinstance(item, bytes) else Path(item).read_bytes() for item in items]
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def log_pyfunc_model(
    model_dir: Path,
    *,
    name: str = "model",
    input_example_images: list | None = None,
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log `model_dir` (model.safetensors + model_config.json) as a pyfunc model in the active run.

    `input_example_images`: encoded images (bytes, or paths to image files) for the logged input
    example; two generated images when omitted. The model is run on the example before anything is
    logged, so a folder that cannot serve fails here: MLflow's own check of the example while
    logging only warns.
    """
    model_dir = Path(model_dir)
    artifacts = {"weights": str(model_dir / WEIGHTS_FILE), "config": str(model_dir / CONFIG_FILE)}
    for path in artifacts.values():
        if not Path(path).is_file():
            raise UserError(f"{path} is missing: train the model first")
    if mlflow.active_run() is None:
        raise MlflowException("log_pyfunc_model logs into the active MLflow run, and none is active")
    example = _example_frame(input_example_images)
    classifier = AslClassifier()
    classifier.load_context(PythonModelContext(artifacts, None))
    classifier.predict(None, example)
    with tempfile.TemporaryDirectory(prefix="asl-model-code-") as tmp:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=AslClassifier(),  # a fresh one: load_context's network must not be pickled
            artifacts=artifacts,
            signature=SIGNATURE,
            input_example=example,
            code_paths=[str(_code_to_ship(Path(tmp)))],
            pip_requirements=pinned_requirements(),
            metadata={"classes": classifier.classes, "image_size": classifier.image_size},
            registered_model_name=registered_model_name,
        )


def _code_to_ship(folder: Path) -> Path:
    """A copy of the package holding only what the model imports: `pipeline/__init__.py`,
    `pipeline/errors.py` and `pipeline/serving/`. No training code or data generators."""
    package = folder / "pipeline"
    package.mkdir()
    for name in ("__init__.py", "errors.py"):
        shutil.copy(_PACKAGE_DIR / name, package / name)
    shutil.copytree(
        _PACKAGE_DIR / "serving", package / "serving", ignore=shutil.ignore_patterns("__pycache__")
    )
    return package
