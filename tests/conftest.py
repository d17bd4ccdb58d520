"""Shared fixtures: a private MLflow store per test, and a tiny ready-made data set.

The tiny profile (29 classes x 12 frames at 32 px, `small_cnn`) makes every stage run in seconds
on CPU while going through the same code as the real run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO = Path(__file__).resolve().parents[1]

TINY_PARAMS = {
    "seed": 0,
    "gpus": 2,
    "data": {
        "source": "synthetic",
        "synthetic": {"images_per_class": 12, "frames_per_run": 4, "external_images_per_class": 2},
        "image_size": 32,
        "val_fraction": 0.25,
        "block_size": 4,
        "block_gap": 0,
        "shard_size": 128,
    },
    "model": {"name": "small_cnn"},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.003},
    "evaluate": {"batch_size": 64},
}


def deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            deep_merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A private sqlite store; artifacts beside it."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)  # set_registry_uri writes it; monkeypatch restores it
    # The env var only counts until some code calls set_tracking_uri; pin this process to the store too.
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
    mlflow.set_registry_uri(None)  # type: ignore[arg-type]  # None: back to the default


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """data/raw and data/shards of the tiny profile, built once per session; copy, don't modify."""
    from pipeline.config import params_from_dict
    from pipeline.fetch import fetch_external, fetch_raw
    from pipeline.paths import Paths
    from pipeline.preprocess import shard_workspace

    root = tmp_path_factory.mktemp("tiny-data")
    params = params_from_dict(TINY_PARAMS)
    paths = Paths(root)
    fetch_raw(params, paths)
    fetch_external(params, paths)
    shard_workspace(params, paths)
    return root


@pytest.fixture
def tiny_workspace(tmp_path, tiny_data, monkeypatch, mlflow_store) -> Path:
    """A workspace (cwd) holding dvc.yaml, the tiny data, a params.yaml of the tiny profile and
    its own MLflow store. Write a different params.yaml with `write_params(workspace, overrides)`."""
    workspace = tmp_path / "ws"
    shutil.copytree(tiny_data / "data", workspace / "data")
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    write_params(workspace, {})
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return workspace


def write_params(workspace: Path, overrides: dict) -> Path:
    path = workspace / "params.yaml"
    path.write_text(yaml.safe_dump(deep_merge(TINY_PARAMS, overrides)))
    return path


def split_files(manifest: dict, split: str) -> list[str]:
    """Source file of every image of `split`, in the order `load_split` returns them."""
    return [name for shard in manifest["shards"] if shard["split"] == split for name in shard["files"]]
