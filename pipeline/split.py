"""Train/validation split of the training folder, stratified per class.

The frames were cut from video, so neighbours are near-duplicates: a `random` split leaks them into
validation. The `block` split keeps runs of consecutive frames on one side, with a gap between.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_FRAME_NUMBER = re.compile(r"(\d+)$")


def frame_number(stem: str) -> int | None:
    """`A123` -> 123; None for a name without a trailing number."""
    match = _FRAME_NUMBER.search(stem)
    return int(match.group(1)) if match else None


def frame_order(stems: Sequence[str]) -> list[int]:
    """Indices of `stems` in frame order (numbered frames first, then the rest by name)."""
    return sorted(
        range(len(stems)),
        key=lambda i: (frame_number(stems[i]) is None, frame_number(stems[i]) or 0, stems[i]),
    )


@dataclass(frozen=True)
class ClassSplit:
    train: list[int]
    val: list[int]
    dropped: list[int]
    """Training frames removed because they neighbour a validation block."""


def stratified_cap(
    counts: Sequence[int], max_images: int | None, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, the sorted positions kept so that all classes together hold about `max_images`."""
    total = sum(counts)
    if max_images is None or max_images >= total:
        return [np.arange(n) for n in counts]
    keep = [max(2, math.floor(n * max_images / total)) for n in counts]
    return [np.sort(rng.choice(n, size=min(k, n), replace=False)) for n, k in zip(counts, keep, strict=True)]


def block_split(
    n: int, val_fraction: float, block_size: int, gap: int, rng: np.random.Generator
) -> ClassSplit:
    """Split positions 0..n-1 (already in frame order) by whole blocks."""
    n_blocks = math.ceil(n / block_size)
    if n_blocks < 2:
        raise ValueError(f"{n} frames make only one block of {block_size}: lower data.block_size")
    n_val = min(n_blocks - 1, max(1, round(val_fraction * n_blocks)))
    val_blocks = set(rng.choice(n_blocks, size=n_val, replace=False).tolist())
    in_val = np.array([(i // block_size) in val_blocks for i in range(n)])
    val = np.flatnonzero(in_val)
    near_val = np.zeros(n, dtype=bool)
    for offset in range(1, gap + 1):
        near_val[:-offset] |= in_val[offset:]
        near_val[offset:] |= in_val[:-offset]
    dropped = np.flatnonzero(near_val & ~in_val)
    train = np.flatnonzero(~near_val & ~in_val)
    if len(train) == 0:
        # A class with validation frames but nothing to learn from would silently score zero.
        raise ValueError(
            f"{n} frames leave no training frame once a validation block of {block_size} and a gap of {gap} "
            "are set aside: lower data.block_size or data.block_gap (or raise data.max_images)"
        )
    return ClassSplit(train.tolist(), val.tolist(), dropped.tolist())


def random_split(n: int, val_fraction: float, rng: np.random.Generator) -> ClassSplit:
    """The naive split, kept to show how much it overstates accuracy."""
    order = rng.permutation(n)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return ClassSplit(sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist()), [])
