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



def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupt) must not leave litter behind
        raise


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
    """All shards of one split as (images float16 Nx3xSxS, labels int64 N) torch tensors.

    Each shard is read once, straight into its slice of the result, and hashed on the way: no
    intermediate copies (a split can be gigabytes). Only the JSON header is parsed, as safetensors
    does, so a shard still cannot run code.
    """
    import torch

    manifest = manifest or read_manifest(shards_dir)
    chosen = [shard for shard in manifest["shards"] if shard["split"] == split]
    size = manifest["image_size"]
    total = sum(shard["count"] for shard in chosen)
    images = torch.empty(total, 3, size, size, dtype=torch.float16)
    labels = torch.empty(total, dtype=torch.int64)
    start = 0
    for shard in chosen:
        path = shards_dir / shard["file"]
        if not path.is_file():
            raise UserError(f"shard {path} listed in the manifest is missing: run `dvc repro preprocess` (or `dvc checkout`)")
        end = start + shard["count"]
        _read_shard_into(path, shard["sha256"], {"images": images[start:end], "labels": labels[start:end]})
        start = end
    return images, labels


_SAFETENSORS_DTYPES = {"F16": "float16", "I64": "int64"}


def _read_shard_into(path: Path, sha256: str, targets: dict) -> None:
    """Fill the (contiguous) tensors `targets` from the safetensors file `path`, checking its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        try:
            head = handle.read(8)
            digest.update(head)
            header_size = int.from_bytes(head, "little")
            if len(head) != 8 or header_size > 1 << 24:
                raise ValueError("bad header size")
            header_bytes = handle.read(header_size)
            digest.update(header_bytes)
            header = json.loads(header_bytes)
            entries = sorted((info["data_offsets"], name, info) for name, info in header.items() if name != "__metadata__")
            if sorted(name for _, name, _ in entries) != sorted(targets):
                raise ValueError("unexpected tensors")
            position = 0
            for (begin, end), name, info in entries:
                target = targets[name]
                buffer = memoryview(target.numpy().reshape(-1).view(np.uint8))
                if (
                    begin != position
                    or end - begin != len(buffer)
                    or list(info["shape"]) != list(target.shape)
                    or _SAFETENSORS_DTYPES.get(info["dtype"]) != str(target.dtype).removeprefix("torch.")
                ):
                    raise ValueError(f"tensor {name} is not as the manifest describes")
                if _read_exactly(handle, buffer) != len(buffer):
                    raise ValueError("file ends early")
                digest.update(buffer)
                position = end
            if handle.read(1):
                raise ValueError("trailing bytes")
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSON and Unicode errors are ValueErrors
            # A damaged file normally fails the checksum; one that passes it was written by
            # something else (or the manifest was edited).
            problem = "is corrupt (sha256 does not match manifest.json)" if sha256_of(path) != sha256 else f"does not match manifest.json ({err})"
            raise UserError(f"shard {path} {problem}: run `dvc repro -f preprocess` to rebuild it") from None
    if digest.hexdigest() != sha256:
        raise UserError(f"shard {path} is corrupt (sha256 does not match manifest.json): run `dvc repro -f preprocess` to rebuild it")


def _read_exactly(handle, buffer: memoryview) -> int:
    filled = 0
    while filled < len(buffer):
        count = handle.readinto(buffer[filled:])
        if not count:
            break
        filled += count
    return filled


def split_files(manifest: dict, split: str) -> list[str]:
    """Source file of every image of `split`, in the order `load_split` returns them."""
    return [name for shard in manifest["shards"] if shard["split"] == split for name in shard["files"]]
