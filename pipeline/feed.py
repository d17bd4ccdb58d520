"""Batches ready for the step, from splits held on the GPU, memory-mapped, or streamed past memory.

`open_training_data` picks how the splits are held (`train.data_on_device`,
`train.memory_budget_gb`) and gives `fit` iterables of (images, labels) on the device, float32, in
the model's memory format, made ahead by pipeline.prefetch off the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.batches import EpochOrder, epoch_order, eval_chunks, rank_batches
from pipeline.errors import UserError
from pipeline.loop import Batch, StepSettings
from pipeline.prefetch import Prefetched, host_buffer, model_input
from pipeline.shards import ShardedSplit, image_bytes, open_split, split_shards, verify_shards
from pipeline.strategy import Strategy
from pipeline.streaming import Streamed, check_stream_fits, offsets_of

if TYPE_CHECKING:  # not imported at run time: tools without PyYAML use tensor_batches
    from pipeline.config import Params


# --- the three ways of holding a split ---------------------------------------------------------------


class _OnDevice:
    """Both splits in GPU memory: a batch is an index_select on the device, the epoch's order one copy."""

    mode = "device"

    def __init__(self, train: ShardedSplit, val: ShardedSplit, device: torch.device):
        self.train_x, self.train_y = _to_device(train, device), train.labels.to(device)
        self.val_x, self.val_y = _to_device(val, device), val.labels.to(device)
        self.device = device

    def train_batches(
        self, batches: np.ndarray, order: EpochOrder, settings: StepSettings
    ) -> Iterable[Batch]:
        return tensor_batches(self.train_x, self.train_y, list(batches), settings)

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        return tensor_batches(self.val_x, self.val_y, [index for _, index in chunks], settings)


def tensor_batches(
    images: torch.Tensor, labels: torch.Tensor, steps: list[np.ndarray], settings: StepSettings
) -> Iterable[Batch]:
    """Batches of a split held as tensors, `steps` holding each batch's ascending indices: on the
    device, index_selects there (the indices copied once, then sliced, so no step waits for a
    copy); on the host, gathered and copied ahead by `Prefetched`."""
    if images.device.type == "cuda":
        if not steps:
            return []
        # Pinned and non-blocking: the copy never makes the host wait (set_sync_debug_mode allows it).
        flat = torch.as_tensor(np.concatenate(steps)).pin_memory().to(images.device, non_blocking=True)
        parts = flat.split([len(step) for step in steps])
        return (
            (model_input(images.index_select(0, index), settings), labels.index_select(0, index))
            for index in parts
        )
    split = ShardedSplit([images], labels, [0, len(labels)], images.shape[-1])
    return Prefetched(
        lambda step: _gather(split, torch.from_numpy(steps[step]), settings.device), len(steps), settings
    )


def _to_device(split: ShardedSplit, device: torch.device) -> torch.Tensor:
    images = torch.empty(
        (len(split), 3, split.image_size, split.image_size), dtype=torch.float16, device=device
    )
    for begin, shard in split.shard_slices():
        images[begin : begin + len(shard)].copy_(shard)
    return images


class _Mapped:
    """Both splits memory-mapped: one copy per machine in the page cache, shared by every rank."""

    mode = "mapped"

    def __init__(self, train: ShardedSplit, val: ShardedSplit):
        self.train, self.val = train, val

    def train_batches(
        self, batches: np.ndarray, order: EpochOrder, settings: StepSettings
    ) -> Iterable[Batch]:
        return Prefetched(
            lambda step: _gather(self.train, torch.from_numpy(batches[step]), settings.device),
            len(batches),
            settings,
        )

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        return Prefetched(
            lambda i: _gather(self.val, torch.from_numpy(chunks[i][1]), settings.device),
            len(chunks),
            settings,
        )


def _gather(split: ShardedSplit, index: torch.Tensor, device: torch.device) -> Batch:
    x = split.gather(
        index, out=host_buffer((len(index), 3, split.image_size, split.image_size), torch.float16, device)
    )
    return x, torch.index_select(split.labels, 0, index, out=host_buffer((len(index),), torch.int64, device))


# --- what fit uses ---------------------------------------------------------------------------------


def memory_budget_bytes(params: Params) -> int:
    import psutil

    budget = params.train.memory_budget_gb
    return int(budget * 1e9) if budget is not None else psutil.virtual_memory().total // 2


class TrainingData:
    """This process's view of the training and validation splits: the batches of each epoch."""

    def __init__(
        self,
        holder: _OnDevice | _Mapped | Streamed,
        params: Params,
        strategy: Strategy,
        settings: StepSettings,
        manifest: dict,
    ):
        self.holder, self.settings = holder, settings
        self.train_counts = [shard["count"] for shard in split_shards(manifest, "train")]
        self.batch_size, self.shuffle_buffer, self.seed = (
            params.train.batch_size,
            params.train.shuffle_buffer,
            params.seed,
        )
        self.world_size, self.rank = strategy.world_size, strategy.rank
        self.steps_per_epoch = sum(self.train_counts) // self.batch_size
        val_offsets = offsets_of(split_shards(manifest, "val"))
        mine = np.asarray(strategy.eval_indices(val_offsets[-1]), dtype=np.int64)
        self.val_chunks = eval_chunks(val_offsets, mine, params.evaluate.batch_size)
        self.step_indices = np.empty((0, 0), dtype=np.int64)
        """The split indices of each step's images (rows as in the batch) of the last train_batches."""
        self.first_batch_at: float | None = None
        """time.time() when the first training batch was ready."""
        self.startup_reported = False

    @property
    def mode(self) -> str:
        return self.holder.mode

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        order = epoch_order(self.train_counts, self.shuffle_buffer, self.seed, epoch)
        mine = rank_batches(order.order, self.batch_size, self.world_size, self.rank)
        self.step_indices = mine
        batches = self.holder.train_batches(mine, order, self.settings)
        return batches if self.first_batch_at is not None else self._noting_first(batches)

    def val_batches(self) -> Iterable[Batch]:
        return self.holder.val_batches(self.val_chunks, self.settings)

    def _noting_first(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        iterator = iter(batches)
        try:
            for batch in iterator:
                if self.first_batch_at is None:
                    self.first_batch_at = time.time()
                yield batch
        finally:
            getattr(iterator, "close", lambda: None)()


def open_training_data(
    params: Params, shards_dir: Path, manifest: dict, strategy: Strategy, settings: StepSettings
) -> TrainingData:
    """Check the shards, then hold the splits on the GPU (asked for, and fits), memory-mapped
    (within the budget) or streamed."""
    verify_shards(shards_dir, manifest, ("train", "val"))
    train_count = manifest["splits"]["train"]["count"]
    if train_count < params.train.batch_size:
        raise UserError(
            f"train.batch_size={params.train.batch_size} is larger than the training split "
            f"({train_count} images): lower it"
        )
    strategy.per_process_batch(params.train.batch_size)  # refuses a batch that does not split evenly
    size = manifest["image_size"]
    needed = (train_count + manifest["splits"]["val"]["count"]) * image_bytes(size)
    budget = strategy.broadcast_object(memory_budget_bytes(params))  # rank 0's: every rank decides alike
    holder: _OnDevice | _Mapped | Streamed
    if (
        settings.device.type == "cuda"
        and params.train.data_on_device
        and needed <= 0.5 * torch.cuda.mem_get_info(settings.device)[0]
    ):
        holder = _OnDevice(
            open_split(shards_dir, "train", manifest),
            open_split(shards_dir, "val", manifest),
            settings.device,
        )
    elif needed <= budget:
        holder = _Mapped(open_split(shards_dir, "train", manifest), open_split(shards_dir, "val", manifest))
    else:
        check_stream_fits(params, manifest, budget)
        holder = Streamed(shards_dir, manifest)
    return TrainingData(holder, params, strategy, settings, manifest)
