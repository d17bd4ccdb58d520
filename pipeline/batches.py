"""The epoch's order and the batches of it that one process trains on.

The order depends only on the seed, the epoch, the shards and `train.shuffle_buffer`: shards in a
seeded order, each image then drawn at random from a buffer of the next ones (a stream's shuffle).
It is the same whether the split sits on the GPU, is memory-mapped or is streamed, and whatever
the number of processes: each global batch is split evenly over the ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np


@dataclass(frozen=True)
class EpochOrder:
    shard_order: np.ndarray
    """Shards in the order the epoch reads them."""
    order: np.ndarray
    """Every global index of the split, in the order the epoch trains on them."""


def epoch_order(shard_counts: Sequence[int], shuffle_buffer: int, seed: int, epoch: int) -> EpochOrder:
    """The order of epoch `epoch`: a function of its arguments only, so a resumed run repeats it."""
    rng = np.random.default_rng([seed, epoch])
    offsets = np.concatenate([[0], np.cumsum(shard_counts, dtype=np.int64)])
    shard_order = rng.permutation(len(shard_counts))
    stream = [np.arange(offsets[s], offsets[s + 1]) for s in shard_order]
    stream_order = np.concatenate(stream) if stream else np.empty(0, dtype=np.int64)
    return EpochOrder(shard_order, _buffer_shuffle(stream_order, shuffle_buffer, rng))


def _buffer_shuffle(stream: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffle buffer of `size` over `stream`: each output is a random pick among the next
    `size` items not yet drawn; with `size >= len(stream)` a uniform permutation."""
    size = min(size, len(stream))
    items = stream.tolist()
    buffer, out = items[:size], []
    for refill, slot in enumerate(rng.integers(0, max(size, 1), len(items) - size).tolist(), start=size):
        out.append(buffer[slot])
        buffer[slot] = items[refill]
    out += [buffer[i] for i in rng.permutation(size).tolist()]  # the stream has ended: drain the buffer
    return np.asarray(out, dtype=np.int64)


def rank_batches(order: np.ndarray, global_batch: int, world_size: int, rank: int) -> np.ndarray:
    """(steps, global_batch // world_size): this rank's images of each optimizer step, ascending.

    Step k's global batch is order[k*B:(k+1)*B]; rank r takes every world_size-th image of it, so
    the ranks' shares are disjoint and together are the global batch. The last len(order) % B
    images (fewer than one global batch: a different set every epoch) make no step, as in
    DataLoader(drop_last=True): every step averages the same number of images."""
    steps = len(order) // global_batch
    mine = order[: steps * global_batch].reshape(steps, global_batch)[:, rank::world_size]
    return np.sort(mine, axis=1)  # ascending: a gather then reads each shard front to back


def eval_chunks(offsets: Sequence[int], mine: np.ndarray, batch_size: int) -> list[tuple[int, np.ndarray]]:
    """(shard, global indices) of each evaluation batch of this process, whose images are `mine`
    (ascending): shard by shard, so that a streamed evaluation holds one shard at a time."""
    cuts = np.searchsorted(mine, offsets)
    chunks = []
    for shard, (begin, end) in enumerate(pairwise(cuts)):
        chunks += [(shard, mine[i : min(i + batch_size, end)]) for i in range(begin, end, batch_size)]
    return chunks


@dataclass(frozen=True)
class StreamPlan:
    """How one rank streams an epoch: which rows to read from each shard, in which slot of its
    buffer each image waits, and when each shard may be read."""

    shard_order: np.ndarray
    rows: list[np.ndarray]
    """Per read position: this rank's images in that shard (global indices, ascending)."""
    row_slots: list[np.ndarray]
    """Per read position: the buffer slot each of those images goes to."""
    load_step: np.ndarray
    """Per read position: the step from whose start that shard may be read."""
    need: np.ndarray
    """Per step: the read position that must have been read before the step's batch is gathered."""
    batch_slots: np.ndarray
    """(steps, per-rank batch): the slot of each image of each step."""
    capacity: int
    """Slots needed: the most images this rank ever holds at once."""


def stream_plan(
    offsets: Sequence[int], shard_order: np.ndarray, batches: np.ndarray, lookahead: int
) -> StreamPlan:
    """Read shards in `shard_order`, each `lookahead` shards before a batch needs it, and give each
    image a slot from the step its shard is read to the step it is trained on."""
    steps, per_step = batches.shape
    position = np.empty(len(shard_order), dtype=np.int64)
    position[shard_order] = np.arange(len(shard_order))
    item_position = position[
        np.searchsorted(np.asarray(offsets), batches, side="right") - 1
    ]  # (steps, per_step)
    need = np.maximum.accumulate(item_position.max(axis=1)) if steps else np.empty(0, dtype=np.int64)
    load_step = np.searchsorted(need + lookahead, np.arange(len(shard_order)), side="left")
    items, item_position = batches.ravel(), item_position.ravel()
    enter, leave = load_step[item_position], np.repeat(np.arange(steps), per_step)
    slots = _assign_slots(enter, leave)
    by_read = np.lexsort((items, item_position))
    cuts = np.searchsorted(item_position[by_read], np.arange(len(shard_order) + 1))
    rows = [items[by_read[a:b]] for a, b in pairwise(cuts)]
    row_slots = [slots[by_read[a:b]] for a, b in pairwise(cuts)]
    capacity = int(slots.max()) + 1 if len(slots) else 0
    return StreamPlan(shard_order, rows, row_slots, load_step, need, slots.reshape(steps, per_step), capacity)


def _assign_slots(enter: np.ndarray, leave: np.ndarray) -> np.ndarray:
    """Slot of each image held from step `enter` to step `leave` (inclusive; `leave` ascending):
    a slot is reused once its image has been trained on. Greedy by entry, so as few as possible."""
    enters, leaves = enter.tolist(), leave.tolist()
    slots = [0] * len(enters)
    free: list[int] = []
    created = left = 0
    for item in np.argsort(enter, kind="stable").tolist():
        while left < len(leaves) and leaves[left] < enters[item]:
            free.append(slots[left])  # entered before this one (enter <= leave), so it has a slot
            left += 1
        if free:
            slots[item] = free.pop()
        else:
            slots[item], created = created, created + 1
    return np.asarray(slots, dtype=np.int64)
