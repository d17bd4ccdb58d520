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
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
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
    atomic_write_parts(path, [data])


def atomic_write_parts(path: Path, parts: Sequence[bytes | np.ndarray]) -> None:
    """`atomic_write_bytes` of the concatenated `parts`, without concatenating them in memory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.writelines(parts)
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
    """Write one shard atomically; returns its sha256.

    The file is byte for byte what `safetensors.numpy.save({"images": ..., "labels": ...})` makes
    (a test holds it to that), but written straight from the arrays: the library assembles the
    whole shard in memory twice over first, which made it the parent's largest cost in `preprocess`
    (copies and page faults while the workers wait).
    """
    images = np.ascontiguousarray(images, dtype="<f2")  # safetensors is little-endian whatever the machine
    labels = np.ascontiguousarray(labels, dtype="<i8")
    # As safetensors lays it out: tensors by alignment (8-byte int64 first), then by name; the
    # header compact JSON, padded with spaces to a multiple of 8 bytes.
    header = {
        "labels": {"dtype": "I64", "shape": list(labels.shape), "data_offsets": [0, labels.nbytes]},
        "images": {"dtype": "F16", "shape": list(images.shape), "data_offsets": [labels.nbytes, labels.nbytes + images.nbytes]},
    }
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    parts = [len(header_bytes).to_bytes(8, "little"), header_bytes, labels.reshape(-1).view(np.uint8), images.reshape(-1).view(np.uint8)]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    atomic_write_parts(path, parts)
    return digest.hexdigest()


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"no shards at {shards_dir} (manifest.json is missing): run `dvc repro preprocess` first")
    return json.loads(path.read_text())


def load_split(shards_dir: Path, split: str, manifest: dict | None = None):
    """All shards of one split as (images float16 Nx3xSxS, labels int64 N) torch tensors.

    Each shard is read once, straight into its slice of the result: no intermediate copies (a split
    can be gigabytes). Its sha256 is computed on a helper thread, chunk by chunk right behind the
    read, so checking costs almost no time beyond the read itself (hashlib releases the GIL). Only
    the JSON header is parsed, as safetensors does, so a shard still cannot run code.
    """
    import torch

    manifest = manifest or read_manifest(shards_dir)
    chosen = [shard for shard in manifest["shards"] if shard["split"] == split]
    size = manifest["image_size"]
    total = sum(shard["count"] for shard in chosen)
    images = torch.empty(total, 3, size, size, dtype=torch.float16)
    labels = torch.empty(total, dtype=torch.int64)
    start = 0
    # One hashing thread: it takes the chunks of all shards in the order they were read, which is
    # the order each digest needs.
    with ThreadPoolExecutor(1, thread_name_prefix="shard-sha256") as hasher:
        pending = []
        for shard in chosen:
            path = shards_dir / shard["file"]
            if not path.is_file():
                raise UserError(f"shard {path} listed in the manifest is missing: run `dvc repro preprocess` (or `dvc checkout`)")
            end = start + shard["count"]
            digest = _read_shard_into(path, shard["sha256"], {"images": images[start:end], "labels": labels[start:end]}, hasher)
            pending.append((path, shard["sha256"], digest))
            start = end
        for path, sha256, digest in pending:
            if digest.result() != sha256:
                raise UserError(f"shard {path} is corrupt (sha256 does not match manifest.json): run `dvc repro -f preprocess` to rebuild it")
    return images, labels


_SAFETENSORS_DTYPES = {"F16": "float16", "I64": "int64"}
_HASH_CHUNK = 1 << 20  # small enough that the hasher trails the reader closely, large enough to cost nothing per call


def _read_shard_into(path: Path, sha256: str, targets: dict, hasher: Executor) -> Future:
    """Fill the (contiguous) tensors `targets` from the safetensors file `path`.

    Every byte read is handed to `hasher`; returns the future of the file's sha256 hex digest.
    A file whose layout differs from `targets` is a UserError here; the caller compares the digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        try:
            head = handle.read(8)
            header_size = int.from_bytes(head, "little")
            if len(head) != 8 or header_size > 1 << 24:
                raise ValueError("bad header size")
            header_bytes = handle.read(header_size)
            hasher.submit(digest.update, head + header_bytes)
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
                for offset in range(0, len(buffer), _HASH_CHUNK):
                    chunk = buffer[offset : offset + _HASH_CHUNK]
                    if _read_exactly(handle, chunk) != len(chunk):
                        raise ValueError("file ends early")
                    hasher.submit(digest.update, chunk)
                position = end
            if handle.read(1):
                raise ValueError("trailing bytes")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:  # JSON and Unicode errors are ValueErrors
            # A damaged file normally fails the checksum; one that passes it was written by
            # something else (or the manifest was edited).
            problem = "is corrupt (sha256 does not match manifest.json)" if sha256_of(path) != sha256 else f"does not match manifest.json ({err})"
            raise UserError(f"shard {path} {problem}: run `dvc repro -f preprocess` to rebuild it") from None
    return hasher.submit(digest.hexdigest)


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
