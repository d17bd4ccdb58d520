"""The tensor shards that `preprocess` writes and training and evaluation read.

`data/shards/` holds `<split>-<nnnnn>.safetensors` files, each with `images` (float16, N x 3 x S x S,
already normalized) and `labels` (int64, N), plus `manifest.json`:

    classes               class names; a label is an index into this list
    image_size            S
    mean, std             the normalization applied (per RGB channel, on pixels scaled to [0, 1])
    splits                {split: {"count": n, "per_class": {class: n}}}
    shards                [{"file", "split", "count", "sha256", "files": [source file, ...]}]
    skipped               [{"file", "reason"}]  files that could not be decoded
    dropped_for_gap       training frames left out beside validation blocks
    params                the data params that produced them

safetensors holds no pickled code, so loading a shard cannot run anything. Every load checks the
file's sha256 against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

SPLITS = ("train", "val", "test")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write one shard atomically; returns its sha256."""
    from safetensors.numpy import save

    payload = save({"images": np.ascontiguousarray(images, dtype=np.float16), "labels": labels.astype(np.int64)})
    atomic_write_bytes(path, payload)
    return hashlib.sha256(payload).hexdigest()


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shards_dir} (manifest.json is missing): run `dvc repro preprocess` first")
    return json.loads(path.read_text())


def load_split(shards_dir: Path, split: str, manifest: dict | None = None):
    """All shards of one split as (images float16 Nx3xSxS, labels int64 N) torch tensors."""
    import torch
    from safetensors.torch import load

    manifest = manifest or read_manifest(shards_dir)
    images, labels = [], []
    for shard in manifest["shards"]:
        if shard["split"] != split:
            continue
        path = shards_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"shard {path} listed in the manifest is missing: run `dvc repro preprocess` (or `dvc checkout`)")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != shard["sha256"]:
            raise UserError(f"shard {path} is corrupt (sha256 does not match manifest.json): run `dvc repro -f preprocess` to rebuild it")
        tensors = load(data)
        images.append(tensors["images"])
        labels.append(tensors["labels"])
    if not images:
        size = manifest["image_size"]
        return torch.empty(0, 3, size, size, dtype=torch.float16), torch.empty(0, dtype=torch.int64)
    return torch.cat(images), torch.cat(labels)


def split_files(manifest: dict, split: str) -> list[str]:
    """Source file of every image of `split`, in the order `load_split` returns them."""
    return [name for shard in manifest["shards"] if shard["split"] == split for name in shard["files"]]
