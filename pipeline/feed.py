"""Batches ready for the step, from splits held on the GPU, memory-mapped, or streamed past memory.

`open_training_data` picks how the splits are held (`train.data_on_device`,
`train.memory_budget_gb`) and gives `fit` iterables of (images, labels) on the device, float32, in
the model's memory format. Off the GPU, a thread gathers the next batch (pinned, and copied on a
side CUDA stream) while the current step runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.batches import EpochOrder, StreamPlan, epoch_order, eval_chunks, rank_batches, stream_plan
from pipeline.errors import UserError
from pipeline.loop import Batch, StepSettings
from pipeline.shards import ShardedSplit, image_bytes, open_shard, open_split, split_shards, verify_shards
from pipeline.strategy import Strategy

if TYPE_CHECKING:  # not imported at run time: tools without PyYAML use tensor_batches
    from pipeline.config import Params

LOOKAHEAD_SHARDS = 1
"""Streaming reads each shard this many shards before a batch needs it, so reading overlaps training."""
_PREFETCH_DEPTH = 2


def model_input(images: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    # One conversion: float16 -> float32 straight into the memory format the model uses.
    return images.to(torch.float32, memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)


class Prefetched:
    """`produce(i)` for i in range(count), run `depth` batches ahead in a background thread.

    `produce` returns host tensors (pinned when the device is CUDA); the thread copies them on a
    side stream, and the step's stream waits for that copy only, never the CPU."""

    def __init__(self, produce: Callable[[int], Batch], count: int, settings: StepSettings, on_close: Callable[[], None] | None = None):
        self.produce, self.count, self.settings, self.on_close = produce, count, settings, on_close

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(_PREFETCH_DEPTH)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce_all, args=(ready, stop), name="batch-prefetch", daemon=True)
        thread.start()
        try:
            for _ in range(self.count):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield self._on_step_stream(*item)
        finally:
            stop.set()
            if self.on_close:
                self.on_close()
            thread.join()

    def _produce_all(self, ready: queue.Queue, stop: threading.Event) -> None:
        device = self.settings.device
        try:
            side = None
            if device.type == "cuda":
                torch.cuda.set_device(device)  # per thread
                side = torch.cuda.Stream(device)
            for index in range(self.count):
                if stop.is_set():
                    return
                x, y = self.produce(index)
                done = None
                if side is not None:
                    with torch.cuda.stream(side):
                        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                        done = torch.cuda.Event()
                        done.record(side)
                else:
                    x = model_input(x, self.settings)  # on CPU the conversion is hidden too
                _put(ready, stop, (x, y, done))
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, which raises it
            _put(ready, stop, err)

    def _on_step_stream(self, x: torch.Tensor, y: torch.Tensor, done: torch.cuda.Event | None) -> Batch:
        if done is None:
            return x, y
        step_stream = torch.cuda.current_stream(self.settings.device)
        step_stream.wait_event(done)
        # Made on the side stream, used on this one: the allocator must not reuse them before this stream is done.
        x.record_stream(step_stream)
        y.record_stream(step_stream)
        return model_input(x, self.settings), y


def _put(ready: queue.Queue, stop: threading.Event, item: object) -> None:
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def _host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")


# --- the three ways of holding a split ---------------------------------------------------------------


class _OnDevice:
    """Both splits in GPU memory: a batch is an index_select on the device, the epoch's order one copy."""

    mode = "device"

    def __init__(self, train: ShardedSplit, val: ShardedSplit, device: torch.device):
        self.train_x, self.train_y = _to_device(train, device), train.labels.to(device)
        self.val_x, self.val_y = _to_device(val, device), val.labels.to(device)
        self.device = device

    def train_batches(self, batches: np.ndarray, order: EpochOrder, settings: StepSettings) -> Iterable[Batch]:
        return tensor_batches(self.train_x, self.train_y, list(batches), settings)

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        return tensor_batches(self.val_x, self.val_y, [index for _, index in chunks], settings)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor, steps: list[np.ndarray], settings: StepSettings) -> Iterable[Batch]:
    """Batches of a split held as tensors, `steps` holding each batch's ascending indices: on the
    device, index_selects there (the indices copied once, then sliced, so no step waits for a
    copy); on the host, gathered and copied ahead by `Prefetched`."""
    if images.device.type == "cuda":
        if not steps:
            return []
        flat = torch.as_tensor(np.concatenate(steps)).to(images.device)
        parts = flat.split([len(step) for step in steps])
        return ((model_input(images.index_select(0, index), settings), labels.index_select(0, index)) for index in parts)
    split = ShardedSplit([images], labels, [0, len(labels)], images.shape[-1])
    return Prefetched(lambda step: _gather(split, torch.from_numpy(steps[step]), settings.device), len(steps), settings)


def _to_device(split: ShardedSplit, device: torch.device) -> torch.Tensor:
    images = torch.empty((len(split), 3, split.image_size, split.image_size), dtype=torch.float16, device=device)
    for begin, shard in split.shard_slices():
        images[begin : begin + len(shard)].copy_(shard)
    return images


class _Mapped:
    """Both splits memory-mapped: one copy per machine in the page cache, shared by every rank."""

    mode = "mapped"

    def __init__(self, train: ShardedSplit, val: ShardedSplit):
        self.train, self.val = train, val

    def train_batches(self, batches: np.ndarray, order: EpochOrder, settings: StepSettings) -> Iterable[Batch]:
        return Prefetched(lambda step: _gather(self.train, torch.from_numpy(batches[step]), settings.device), len(batches), settings)

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        return Prefetched(lambda i: _gather(self.val, torch.from_numpy(chunks[i][1]), settings.device), len(chunks), settings)


def _gather(split: ShardedSplit, index: torch.Tensor, device: torch.device) -> Batch:
    x = split.gather(index, out=_host_buffer((len(index), 3, split.image_size, split.image_size), torch.float16, device))
    return x, torch.index_select(split.labels, 0, index, out=_host_buffer((len(index),), torch.int64, device))


class _Streamed:
    """Both splits read shard by shard: training holds at most its plan's slots and a shard or two."""

    mode = "streamed"

    def __init__(self, shards_dir: Path, manifest: dict):
        self.shards_dir, self.image_size = shards_dir, manifest["image_size"]
        self.train_shards, self.val_shards = split_shards(manifest, "train"), split_shards(manifest, "val")
        self.train_labels = self._labels(self.train_shards)
        self.val_labels = self._labels(self.val_shards)
        self.train_offsets, self.val_offsets = _offsets(self.train_shards), _offsets(self.val_shards)

    def _labels(self, shards: list[dict]) -> torch.Tensor:
        # Labels are small; the images' pages are never touched here, and unmapped right away.
        labels = [open_shard(self.shards_dir, shard, self.image_size)[1] for shard in shards]
        return torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)

    def train_batches(self, batches: np.ndarray, order: EpochOrder, settings: StepSettings) -> Iterable[Batch]:
        plan = stream_plan(self.train_offsets, order.shard_order, batches, LOOKAHEAD_SHARDS)
        reader = _ShardReader(self.shards_dir, self.train_shards, self.train_offsets, self.image_size, plan)
        device = settings.device

        def produce(step: int) -> Batch:
            reader.wait_for_step(step)
            slots, index = torch.from_numpy(plan.batch_slots[step]), torch.from_numpy(batches[step])
            x = torch.index_select(reader.store, 0, slots, out=_host_buffer((len(slots), *reader.store.shape[1:]), torch.float16, device))
            return x, torch.index_select(self.train_labels, 0, index, out=_host_buffer((len(index),), torch.int64, device))

        return Prefetched(produce, len(batches), settings, on_close=reader.close)

    def val_batches(self, chunks: list[tuple[int, np.ndarray]], settings: StepSettings) -> Iterable[Batch]:
        mapped: dict[int, torch.Tensor] = {}  # the one shard being read; unmapped when the next one starts

        def produce(i: int) -> Batch:
            shard, index = chunks[i]
            if shard not in mapped:
                mapped.clear()
                mapped[shard] = open_shard(self.shards_dir, self.val_shards[shard], self.image_size)[0]
            rows = torch.from_numpy(index - self.val_offsets[shard])
            x = torch.index_select(mapped[shard], 0, rows, out=_host_buffer((len(rows), *mapped[shard].shape[1:]), torch.float16, settings.device))
            index_t = torch.from_numpy(index)
            return x, torch.index_select(self.val_labels, 0, index_t, out=_host_buffer((len(index),), torch.int64, settings.device))

        return Prefetched(produce, len(chunks), settings, on_close=mapped.clear)


def _offsets(shards: list[dict]) -> list[int]:
    return np.concatenate([[0], np.cumsum([shard["count"] for shard in shards], dtype=np.int64)]).tolist()


_COPY_ROWS = 256  # images per copy from a shard into the slots: bounds the temporary


class _ShardReader:
    """Reads one streamed epoch's shards into its slots, in a thread of its own: each shard from
    the step the plan allows it, so at most `plan.capacity` images are ever held."""

    def __init__(self, shards_dir: Path, shards: list[dict], offsets: list[int], image_size: int, plan: StreamPlan):
        self.shards_dir, self.shards, self.offsets, self.image_size, self.plan = shards_dir, shards, offsets, image_size, plan
        self.store = torch.empty((plan.capacity, 3, image_size, image_size), dtype=torch.float16)
        self.changed = threading.Condition()
        self.step, self.read, self.closed = 0, 0, False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def wait_for_step(self, step: int) -> None:
        """Called before gathering `step`, once every earlier batch has been gathered (their slots are free)."""
        with self.changed:
            if self.thread is None:
                self.thread = threading.Thread(target=self._read_all, name="shard-reader", daemon=True)
                self.thread.start()
            self.step = step
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.read > self.plan.need[step] or self.error is not None or self.closed)
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
                    self.changed.wait_for(lambda: self.closed or self.plan.load_step[position] <= self.step)
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

    def _read(self, position: int, shard: int) -> None:
        rows = torch.from_numpy(self.plan.rows[position] - self.offsets[shard])
        if len(rows) == 0:
            return
        slots = torch.from_numpy(self.plan.row_slots[position])
        images, _ = open_shard(self.shards_dir, self.shards[shard], self.image_size)
        for begin in range(0, len(rows), _COPY_ROWS):
            end = begin + _COPY_ROWS
            self.store.index_copy_(0, slots[begin:end], images.index_select(0, rows[begin:end]))
        del images  # unmapped: its pages leave this process


# --- what fit uses ---------------------------------------------------------------------------------


def memory_budget_bytes(params: Params) -> int:
    import psutil

    budget = params.train.memory_budget_gb
    return int(budget * 1e9) if budget is not None else psutil.virtual_memory().total // 2


class TrainingData:
    """This process's view of the training and validation splits: the batches of each epoch."""

    def __init__(self, holder: _OnDevice | _Mapped | _Streamed, params: Params, strategy: Strategy, settings: StepSettings, manifest: dict):
        self.holder, self.settings = holder, settings
        self.train_counts = [shard["count"] for shard in split_shards(manifest, "train")]
        self.batch_size, self.shuffle_buffer, self.seed = params.train.batch_size, params.train.shuffle_buffer, params.seed
        self.world_size, self.rank = strategy.world_size, strategy.rank
        self.steps_per_epoch = sum(self.train_counts) // self.batch_size
        val_offsets = _offsets(split_shards(manifest, "val"))
        mine = np.asarray(strategy.eval_indices(val_offsets[-1]), dtype=np.int64)
        self.val_chunks = eval_chunks(val_offsets, mine, params.evaluate.batch_size)
        self.first_batch_at: float | None = None
        """time.time() when the first training batch was ready."""
        self.startup_reported = False

    @property
    def mode(self) -> str:
        return self.holder.mode

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        order = epoch_order(self.train_counts, self.shuffle_buffer, self.seed, epoch)
        mine = rank_batches(order.order, self.batch_size, self.world_size, self.rank)
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


def open_training_data(params: Params, shards_dir: Path, manifest: dict, strategy: Strategy, settings: StepSettings) -> TrainingData:
    """Check the shards, then hold the splits on the GPU (asked for, and fits), memory-mapped
    (within the budget) or streamed."""
    verify_shards(shards_dir, manifest, ("train", "val"))
    train_count = manifest["splits"]["train"]["count"]
    if train_count < params.train.batch_size:
        raise UserError(f"train.batch_size={params.train.batch_size} is larger than the training split ({train_count} images): lower it")
    strategy.per_process_batch(params.train.batch_size)  # refuses a batch that does not split evenly
    size = manifest["image_size"]
    needed = (train_count + manifest["splits"]["val"]["count"]) * image_bytes(size)
    budget = strategy.broadcast_object(memory_budget_bytes(params))  # rank 0's: every rank decides alike
    holder: _OnDevice | _Mapped | _Streamed
    if settings.device.type == "cuda" and params.train.data_on_device and needed <= 0.5 * torch.cuda.mem_get_info(settings.device)[0]:
        holder = _OnDevice(open_split(shards_dir, "train", manifest), open_split(shards_dir, "val", manifest), settings.device)
    elif needed <= budget:
        holder = _Mapped(open_split(shards_dir, "train", manifest), open_split(shards_dir, "val", manifest))
    else:
        check_stream_fits(params, manifest, budget)
        holder = _Streamed(shards_dir, manifest)
    return TrainingData(holder, params, strategy, settings, manifest)


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
        raise UserError(
            f"train.memory_budget_gb={budget / 1e9:.3g} cannot hold the training split ({manifest['splits']['train']['count']} images "
            f"at {manifest['image_size']} px), nor stream it: its shuffle buffer (train.shuffle_buffer={params.train.shuffle_buffer}), "
            f"a batch and {LOOKAHEAD_SHARDS + 1} shards of {largest} images take {needed / 1e9:.3g} GB; "
            "raise train.memory_budget_gb, or lower train.shuffle_buffer or data.shard_size"
        )
