"""What the serving tests share (predict, web page, model server): a registered champion in seconds,
and starting and stopping a real server process.

The champion is a `small_cnn` trained for a few steps to tell red (A), green (B) and blue (C) apart:
accurate on those colours, so a test can assert "the right class", and logged exactly as training logs
a model (`log_pyfunc_model`), registered and given the alias `champion` in a private sqlite store.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import requests
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import save_file

from pipeline.dataset import CLASSES
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.serving.networks import build_model
from pipeline.serving.pyfunc import CONFIG_FILE, WEIGHTS_FILE, log_pyfunc_model

SIZE = 32
COLOURS = {"A": (220, 30, 30), "B": (30, 200, 30), "C": (30, 30, 220)}
MODEL_NAME = "asl-colours"


@dataclass(frozen=True)
class Champion:
    tracking_uri: str
    root: Path
    name: str
    version: int

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@champion"


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def solid(rgb: tuple[int, int, int], width: int = 64, height: int = 64, fmt: str = "JPEG") -> bytes:
    return encode(Image.new("RGB", (width, height), rgb), fmt)


def noisy(seed: int, width: int = 80, height: int = 60, fmt: str = "JPEG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), fmt)


def train_colour_model(folder: Path) -> Path:
    """A trained model folder (weights + model_config.json), as `pipeline.train` writes one."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("small_cnn", len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(25):
        images, labels = [], []
        for name, rgb in COLOURS.items():
            noise = rng.integers(-40, 40, size=(4, SIZE, SIZE, 3))
            images.append(np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8))
            labels += [CLASSES.index(name)] * 4
        loss = torch.nn.functional.cross_entropy(
            model(torch.from_numpy(normalize(np.concatenate(images)))), torch.tensor(labels)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return write_model_dir(folder, model.eval())


def write_model_dir(folder: Path, model: torch.nn.Module, **extra: object) -> Path:
    """A `small_cnn` model folder as training writes one: weights + model_config.json (+ `extra` keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().float().contiguous() for k, v in model.state_dict().items()},
        str(folder / WEIGHTS_FILE),
    )
    config = {
        "model": {"name": "small_cnn", "pretrained": False, "freeze_backbone": False},
        "classes": list(CLASSES),
        "image_size": SIZE,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        **extra,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return folder


def register_champion(model_dir: Path, name: str, artifacts: Path) -> int:
    """Log `model_dir` in a new run of the current store, register it, alias it `champion`."""
    experiment = mlflow.get_experiment_by_name("serving") or mlflow.get_experiment(
        mlflow.create_experiment("serving", artifact_location=artifacts.as_uri())
    )
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = log_pyfunc_model(model_dir, registered_model_name=name)
    assert info.registered_model_version is not None  # registered_model_name was given
    version = int(info.registered_model_version)
    MlflowClient().set_registered_model_alias(name, "champion", str(version))
    return version


@contextlib.contextmanager
def pinned_store(root: Path) -> Iterator[str]:
    """MLflow pointed at a sqlite store under `root`, through the variables too (so subprocesses
    find it); afterwards the variables are put back and the process-wide URIs reset, so later test
    modules do not inherit this store. Yields the store's URI."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        # set_tracking_uri/set_registry_uri export these variables; setting them here first lets
        # the context restore them.
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("MLFLOW_REGISTRY_URI", uri)
        env.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
            mlflow.set_registry_uri(None)  # type: ignore[arg-type]  # None: back to the default


@contextlib.contextmanager
def colour_champion(root: Path, name: str = MODEL_NAME) -> Iterator[Champion]:
    """A store under `root` holding `name@champion`, pinned (see `pinned_store`) meanwhile."""
    with pinned_store(root) as uri:
        version = register_champion(train_colour_model(root / "model"), name, root / "artifacts")
        yield Champion(uri, root, name, version)


# --- server processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(command: list[str], log: Path, *, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """`command` in its own process group (servers start children), output into `log`."""
    with log.open("wb") as out:
        # `mlflow models serve` execs `uvicorn` by name: this environment's bin must come first on PATH.
        env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until_up(process: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    """Poll `url` until it answers 200; fail with the server's log if it exits or never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the server did not answer {url} within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def app_in_thread(app: Callable[..., Any]) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port, in a thread of this process (so that
    a test can look inside the app); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
