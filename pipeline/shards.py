"""The tensor shards that `preprocess` writes and training and evaluation read.

`data/shards/` holds `<split>-<nnnnn>.safetensors` files (`images`: float16 N x 3 x S x S, already
normalized; `labels`: int64 N) and `manifest.json`, which lists every shard with its sha256. Shards
are read memory-mapped, so every process on a machine shares the page cache's one copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import UserError
from pipeline.fileio import atomic_path, atomic_write_json, sha256_of

if TYPE_CHECKING:  # imported where used: preprocess and its workers never load torch
    import torch

SHARD_TARGET_BYTES = 64 * 2**20
"""Float16 image bytes per shard when `data.shard_size` is null."""


def image_bytes(image_size: int) -> int:
    return 3 * image_size * image_size * 2  # float16


def auto_shard_size(image_size: int) -> int:
    return max(1, SHARD_TARGET_BYTES // image_bytes(image_size))


SMALL_SPLIT_SHARDS = 8
"""A split smaller than this many ~64 MiB shards is cut into up to this many (of at least 256
images): preprocess's workers each make whole shards, so a small split is still shared by several.
A fixed number, not the worker count: the shards must not depend on the machine that made them."""


def split_shard_size(image_size: int, split_images: int) -> int:
    """Images per shard of a split of `split_images` when `data.shard_size` is null."""
    return min(auto_shard_size(image_size), max(256, -(-split_images // SMALL_SPLIT_SHARDS)))


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray) -> str:
    """Write one shard atomically with safetensors; returns its sha256."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:
        save_file(
            {
                "images": np.ascontiguousarray(images, np.float16),
                "labels": np.ascontiguousarray(labels, np.int64),
            },
            tmp,
        )
    return sha256_of(path)


def read_manifest(shards_dir: Path) -> dict:
    path = shards_dir / "manifest.json"
    if not path.is_file():
        raise UserError(
            f"no shards at {shards_dir} (manifest.json is missing): run `dvc repro preprocess` first"
        )
    return json.loads(path.read_text())


def split_shards(manifest: dict, split: str) -> list[dict]:
    return [shard for shard in manifest["shards"] if shard["split"] == split]


def _missing(path: Path) -> UserError:
    fix = "run `dvc repro preprocess` (or `dvc checkout`)"
    return UserError(f"shard {path} listed in the manifest is missing: {fix}")


def _rebuild(path: Path, problem: str) -> UserError:
    return UserError(f"shard {path} {problem}: run `dvc repro -f preprocess` to rebuild it")


# --- the integrity check, once per machine ---------------------------------------------------------

_SETTLED_NS = 2_000_000_000
"""A file modified this recently is not recorded as checked: a write within the same timestamp tick
as the check would keep its size and mtime (git's "racily clean" files)."""


def checks_dir(shards_dir: Path) -> Path:
    """Where the checks are remembered: beside data/shards/, never inside (a DVC output)."""
    return shards_dir.parent / ".shard-checks" / shards_dir.name


def _identity(stat: os.stat_result, path: Path, sha256: str) -> dict:
    # Any write changes mtime or ctime; a copy, a checkout or a rebuild changes the inode too.
    keys = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
    return {"path": str(path.resolve()), "sha256": sha256, **{k: getattr(stat, k) for k in keys}}


def verify_shards(shards_dir: Path, manifest: dict, splits: tuple[str, ...] | None = None) -> None:
    """Refuse a missing, truncated or corrupt shard (sha256 against manifest.json).

    Each shard is hashed once per machine: a record beside the shards remembers a file that
    matched, keyed by its path, inode, size, mtime and ctime, so later runs and other ranks only
    stat it. A file that fails is never recorded, so it is refused on every load."""
    records = checks_dir(shards_dir)
    for shard in manifest["shards"]:
        if splits is not None and shard["split"] not in splits:
            continue
        path = shards_dir / shard["file"]
        try:
            before = path.stat()
        except FileNotFoundError:
            raise _missing(path) from None
        record = records / f"{shard['file']}.json"
        identity = _identity(before, path, shard["sha256"])
        if _read_record(record) == identity:
            continue
        if sha256_of(path) != shard["sha256"]:
            raise _rebuild(path, "is corrupt (sha256 does not match manifest.json)")
        after = path.stat()
        if (
            _identity(after, path, shard["sha256"]) == identity
            and time.time_ns() - after.st_mtime_ns > _SETTLED_NS
        ):
            _write_record(record, identity)


def _read_record(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_record(path: Path, identity: dict) -> None:
    # A read-only data folder is fine: the check then runs on every load, which is slower, not wrong.
    with contextlib.suppress(OSError):
        atomic_write_json(path, identity)  # atomic: ranks checking at once never leave a torn record


# --- reading ------------------------------------------------------------------------------------------


def open_shard(shards_dir: Path, shard: dict, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One shard's (images, labels): images memory-mapped (read-only use), labels read.

    Checks the header against the manifest; the bytes are checked by `verify_shards`. safetensors
    holds no pickled code, so a shard cannot run anything when it is read."""
    import torch
    from safetensors import SafetensorError, safe_open

    path = shards_dir / shard["file"]
    if not path.is_file():
        raise UserError(
            f"shard {path} listed in the manifest is missing: run `dvc repro preprocess` (or `dvc checkout`)"
        )
    try:
        with safe_open(path, framework="pt") as handle:
            images, labels = handle.get_tensor("images"), handle.get_tensor("labels").clone()
    except (SafetensorError, KeyError) as err:  # a manifest edited by hand, or another writer
        raise _rebuild(path, f"does not match manifest.json ({err})") from None
    expected = (shard["count"], 3, image_size, image_size)
    if (
        tuple(images.shape) != expected
        or images.dtype != torch.float16
        or tuple(labels.shape) != expected[:1]
    ):
        raise _rebuild(
            path, f"does not match manifest.json (images {tuple(images.shape)}, expected {expected})"
        )
    return images, labels


def images_offset(path: Path) -> int:
    """Where a shard's image bytes begin in its file: safetensors' layout is an 8-byte little-endian
    header length, the JSON header, then each tensor at its `data_offsets` (the library reads
    whole tensors only; this is for reading some rows of one)."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    return 8 + length + header["images"]["data_offsets"][0]


_IOV_MAX = 1024  # buffers per preadv call: IOV_MAX on Linux and macOS


def read_images(path: Path, offset: int, rows: np.ndarray, into: np.ndarray, slots: np.ndarray) -> None:
    """into[slots[i]] = the shard's image rows[i], for ascending `rows`, with `into` a uint8 array
    of one image's bytes per row (a view of the caller's tensor). preadv reads consecutive rows in
    one call and maps nothing: a shard's pages stay in the page cache (shared, evictable) and never
    count in this process's memory, as a mapped shard's touched pages do."""
    size = into.shape[1]
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    with open(path, "rb", buffering=0) as file:
        for begin, end in pairwise([0, *breaks.tolist(), len(rows)]):
            for first in range(begin, end, _IOV_MAX):
                last = min(first + _IOV_MAX, end)
                buffers = [memoryview(into[slot]) for slot in slots[first:last].tolist()]
                read = os.preadv(file.fileno(), buffers, offset + int(rows[first]) * size)
                if read != (last - first) * size:
                    raise _rebuild(path, "is truncated (shorter than manifest.json says)")


def load_shard(shards_dir: Path, shard: dict, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`open_shard` after the integrity check."""
    verify_shards(shards_dir, {"shards": [shard]})
    return open_shard(shards_dir, shard, image_size)


@dataclass
class ShardedSplit:
    """A split as its memory-mapped shards, addressed by one global index (shard after shard).

    No private copy: the pages are the page cache's, shared by every process that maps them."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    offsets: list[int]
    """Global index of each shard's first image, and the total at the end."""
    image_size: int

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def nbytes(self) -> int:
        return len(self) * image_bytes(self.image_size)

    def gather(self, index: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """images[index] for an ascending int64 `index`: one index_select per shard it touches."""
        import torch

        if out is None:
            out = torch.empty((len(index), 3, self.image_size, self.image_size), dtype=torch.float16)
        if len(self.images) == 1:
            return torch.index_select(self.images[0], 0, index, out=out)
        bounds = torch.searchsorted(index, torch.tensor(self.offsets)).tolist()
        for shard, (begin, end) in enumerate(pairwise(bounds)):
            if begin < end:
                torch.index_select(
                    self.images[shard], 0, index[begin:end] - self.offsets[shard], out=out[begin:end]
                )
        return out

    def shard_slices(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(global index of the first image, images) of each shard."""
        return zip(self.offsets, self.images, strict=True)


def open_split(shards_dir: Path, split: str, manifest: dict | None = None) -> ShardedSplit:
    """One split, checked and memory-mapped."""
    import torch

    manifest = manifest or read_manifest(shards_dir)
    size = manifest["image_size"]
    shards = split_shards(manifest, split)
    verify_shards(shards_dir, {"shards": shards})
    pairs = [open_shard(shards_dir, shard, size) for shard in shards]
    offsets = np.concatenate([[0], np.cumsum([shard["count"] for shard in shards], dtype=np.int64)]).tolist()
    labels = torch.cat([labels for _, labels in pairs]) if pairs else torch.empty(0, dtype=torch.int64)
    return ShardedSplit([images for images, _ in pairs], labels, offsets, size)


def load_split(
    shards_dir: Path, split: str, manifest: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split as (images float16 Nx3xSxS, labels int64 N) tensors: memory-mapped when the
    split is one shard, else a private copy of its shards (for tools; training uses `open_split`)."""
    import torch

    opened = open_split(shards_dir, split, manifest)
    if len(opened.images) == 1:
        return opened.images[0], opened.labels
    if not opened.images:
        return torch.empty(0, 3, opened.image_size, opened.image_size, dtype=torch.float16), opened.labels
    return torch.cat(opened.images), opened.labels
