"""The tensor shards that `preprocess` writes and training and evaluation read.

`data/shards/` holds `<split>-<nnnnn>.safetensors` files (`images`: float16 N x 3 x S x S, already
normalized; `labels`: int64 N) and `manifest.json`, which lists every shard with its sha256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.fileio import atomic_path, sha256_of


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write one shard atomically with safetensors; returns its sha256."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file({"images": np.ascontiguousarray(images, np.float16), "labels": np.ascontiguousarray(labels, np.int64)}, tmp)
    return sha256_of(path)


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shards_dir} (manifest.json is missing): run `dvc repro preprocess` first")
    return json.loads(path.read_text())


def _rebuild(path: Path, problem: str) -> UserError:
    return UserError(f"shard {path} {problem}: run `dvc repro -f preprocess` to rebuild it")


def load_shard(shards_dir: Path, shard: dict, image_size: int):
    """One shard's (images, labels) torch tensors, checked against its manifest entry.

    safetensors holds no pickled code, so a shard cannot run anything when it is read.
    """
    from safetensors import SafetensorError, safe_open

    path = shards_dir / shard["file"]
    if not path.is_file():
        raise UserError(f"shard {path} listed in the manifest is missing: run `dvc repro preprocess` (or `dvc checkout`)")
    if sha256_of(path) != shard["sha256"]:
        raise _rebuild(path, "is corrupt (sha256 does not match manifest.json)")
    try:
        with safe_open(path, framework="pt") as handle:
            images, labels = handle.get_tensor("images"), handle.get_tensor("labels")
    except (SafetensorError, KeyError) as err:  # the sha256 matched: a manifest edited by hand, or another writer
        raise _rebuild(path, f"does not match manifest.json ({err})") from None
    expected = (shard["count"], 3, image_size, image_size)
    if tuple(images.shape) != expected or str(images.dtype) != "torch.float16" or tuple(labels.shape) != expected[:1]:
        raise _rebuild(path, f"does not match manifest.json (images {tuple(images.shape)}, expected {expected})")
    return images, labels


def load_split(shards_dir: Path, split: str, manifest: dict | None = None):
    """All shards of one split as one (images float16 Nx3xSxS, labels int64 N) pair of tensors."""
    import torch

    manifest = manifest or read_manifest(shards_dir)
    size = manifest["image_size"]
    pairs = [load_shard(shards_dir, shard, size) for shard in manifest["shards"] if shard["split"] == split]
    if not pairs:
        return torch.empty(0, 3, size, size, dtype=torch.float16), torch.empty(0, dtype=torch.int64)
    return torch.cat([images for images, _ in pairs]), torch.cat([labels for _, labels in pairs])
