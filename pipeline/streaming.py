"""Training on splits larger than the memory budget: each rank reads, shard by shard, only its own
images into a buffer of slots, in a thread of its own (the plan is pipeline.batches.stream_plan).
Rows are read (preadv), not mapped, so the slots are all the split memory a rank holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.batches import EpochOrder, StreamPlan, stream_plan
from pipeline.errors import UserError
from pipeline.loop import Batch, StepSettings
from pipeline.prefetch import Prefetched, host_buffer
from pipeline.shards import image_bytes, images_offset, open_shard, read_images, split_shards

if TYPE_CHECKING:
    from pipeline.config import Params

LOOKAHEAD_SHARDS = 1
"""Streaming reads each shard this many shards before a batch needs it, so reading overlaps training."""


class Streamed:
    """Both splits read shard by shard: training holds its plan's slots, validation a batch."""

    mode = "streamed"

    def __init__(self, shards_dir: Path, manifest: dict):
        self.shards_dir, self.image_size = shards_dir, manifest["image_size"]
        self.train_shards, self.val_shards = split_shards(manifest, "train"), split_shards(manifest, "val")
        self.train_labels = self._labels(self.train_shards)
        self.val_labels = self._labels(self.val_shards)
        self.train_offsets, self.val_offsets = offsets_of(self.train_shards), offsets_of(self.val_shards)
        self.train_files, self.val_files = self._files(self.train_shards), self._files(self.val_shards)

    def _files(self, shards: list[dict]) -> list[tuple[Path, int]]:
        """(path, where its images begin) of each shard: streaming reads rows, it does not map them."""
        paths = [self.shards_dir / shard["file"] for shard in shards]
        return [(path, images_offset(path)) for path in paths]

    def _labels(self, shards: list[dict]) -> torch.Tensor:
        # Labels are small; the images' pages are never touched here, and unmapped right away.
        labels = [open_shard(self.shards_dir, shard, self.image_size)[1] for shard in shards]
        return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)

    def train_batches(
        self, batches: np.ndarray, order: EpochOrder, settings: StepSettings
    ) -> Iterable[Batch]:
        plan = stream_plan(self.train_offsets, order.shard_order, batches, LOOKAHEAD_SHARDS)
        reader = _ShardReader(self.train_files, self.train_offsets, self.image_size, plan)
        device = settings.device

        def produce(step: int) -> Batch:
            reader.wait_for_step(step)
            slots, index = torch.from_numpy(plan.batch_slots[step]), torch.from_numpy(batches[step])
            x = torch.index_select(
                reader.store,
                0,
                slots,
                out=host_buffer((len(slots), *reader.store.shape[1:]), torch.float16, device),
            )
            return x, torch.index_select(
                self.train_labels, 0, index, out=host_buffer((len(index),), torch.int64, device)
            )

        return Prefetched(produce, len(batches), settings, on_close=reader.close)

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        shape = (3, self.image_size, self.image_size)

        def produce(i: int) -> Batch:
            shard, index = chunks[i]
            x = host_buffer((len(index), *shape), torch.float16, settings.device)
            path, offset = self.val_files[shard]
            rows = index - self.val_offsets[shard]
            read_images(path, offset, rows, _bytes_per_row(x), np.arange(len(rows)))
            index_t = torch.from_numpy(index)
            return x, torch.index_select(
                self.val_labels, 0, index_t, out=host_buffer((len(index),), torch.int64, settings.device)
            )

        return Prefetched(produce, len(chunks), settings)


def _bytes_per_row(images: torch.Tensor) -> np.ndarray:
    """A uint8 (N, bytes of one image) view of a contiguous CPU tensor of N images."""
    return images.numpy().view(np.uint8).reshape(len(images), -1)


def offsets_of(shards: list[dict]) -> list[int]:
    return np.concatenate([[0], np.cumsum([shard["count"] for shard in shards], dtype=np.int64)]).tolist()


class _ShardReader:
    """Reads one streamed epoch's shards into its slots, in a thread of its own: each shard from
    the step the plan allows it, so at most `plan.capacity` images are ever held."""

    def __init__(self, files: list[tuple[Path, int]], offsets: list[int], image_size: int, plan: StreamPlan):
        self.files, self.offsets, self.plan = files, offsets, plan
        self.store = torch.empty((plan.capacity, 3, image_size, image_size), dtype=torch.float16)
        self.changed = threading.Condition()
        self.step, self.read, self.closed = 0, 0, False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def wait_for_step(self, step: int) -> None:
        """Called before gathering `step`, once every earlier batch was gathered (their slots are free)."""
        with self.changed:
            if self.thread is None:
                self.thread = threading.Thread(target=self._read_all, name="shard-reader", daemon=True)
                self.thread.start()
            self.step = step
            self.changed.notify_all()
            self.changed.wait_for(
                lambda: self.read > self.plan.need[step] or self.error is not None or self.closed
            )
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if self.thread is not None:
            self.thread.join()

    def _read_all(self) -> None:
        try:
            steps = len(self.plan.need)
            for position, shard in enumerate(self.plan.shard_order.tolist()):
                if self.plan.load_step[position] >= steps:
                    return  # no batch of this epoch needs it, nor any later shard
                with self.changed:
                    self.changed.wait_for(partial(self._may_read, position))
                    if self.closed:
                        return
                self._read(position, shard)
                with self.changed:
                    self.read = position + 1
                    self.changed.notify_all()
        except BaseException as err:  # noqa: BLE001 -- raised in the gathering thread
            with self.changed:
                self.error = err
                self.changed.notify_all()

    def _may_read(self, position: int) -> bool:
        return self.closed or self.plan.load_step[position] <= self.step

    def _read(self, position: int, shard: int) -> None:
        rows = self.plan.rows[position] - self.offsets[shard]
        if len(rows):
            path, offset = self.files[shard]
            read_images(path, offset, rows, _bytes_per_row(self.store), self.plan.row_slots[position])


def stream_bound_images(params: Params, manifest: dict) -> int:
    """Most images a streamed epoch holds on one machine, all its ranks together: the shuffle
    buffer, a global batch, and the shard being read with the one read ahead (pipeline.batches)."""
    shards = split_shards(manifest, "train")
    buffer = min(params.train.shuffle_buffer, sum(shard["count"] for shard in shards))
    return buffer + params.train.batch_size + (LOOKAHEAD_SHARDS + 1) * max(shard["count"] for shard in shards)


def check_stream_fits(params: Params, manifest: dict, budget: int) -> None:
    needed = stream_bound_images(params, manifest) * image_bytes(manifest["image_size"])
    if needed > budget:
        largest = max(shard["count"] for shard in split_shards(manifest, "train"))
        split = f"{manifest['splits']['train']['count']} images at {manifest['image_size']} px"
        raise UserError(
            f"train.memory_budget_gb={budget / 1e9:.3g} cannot hold the training split ({split}), "
            "nor stream it: "
            f"its shuffle buffer (train.shuffle_buffer={params.train.shuffle_buffer}), a batch and "
            f"{LOOKAHEAD_SHARDS + 1} shards of {largest} images take {needed / 1e9:.3g} GB; "
            "raise train.memory_budget_gb, or lower train.shuffle_buffer or data.shard_size"
        )
