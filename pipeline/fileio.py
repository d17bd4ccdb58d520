"""File and folder writes that a crash cannot leave half done, and file hashes: helpers every stage uses."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write to: renamed over `path` when the block succeeds,
    deleted when it fails, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full, interrupt) must not leave litter behind
        raise


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def swap_in(staging: Path, target: Path) -> None:
    """Replace the folder (or file) `target` by `staging`, a sibling named `<target>.tmp-<suffix>`."""
    # Move the old target aside instead of deleting it in place, so the target path only ever
    # holds a complete copy; the old copy is deleted after the swap.
    old = None
    if target.exists() or target.is_symlink():
        old = target.with_name(f"{target.name}.old-{staging.name[len(target.name) + len('.tmp-') :]}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        _remove(old)


def remove_leftovers(target: Path) -> None:
    """Delete the staging and old copies beside `target` left by a killed swap (SIGKILL skips cleanup)."""
    for pattern in (".tmp-*", ".old-*"):
        for leftover in glob.glob(glob.escape(str(target)) + pattern):
            _remove(Path(leftover))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
