"""A background thread that makes the next batches while the current step runs.

Off the GPU it gathers each batch into pinned memory and copies it on a side CUDA stream, so the
step waits for that copy only, never the CPU; on CPU it also converts the batch for the model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch

from pipeline.loop import Batch, StepSettings

_PREFETCH_DEPTH = 2


def model_input(images: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    # One conversion: float16 -> float32 straight into the memory format the model uses.
    return images.to(
        torch.float32,
        memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format,
    )


class Prefetched:
    """`produce(i)` for i in range(count), run `depth` batches ahead in a background thread.

    `produce` returns host tensors (pinned when the device is CUDA); the thread copies them on a
    side stream, and the step's stream waits for that copy only, never the CPU."""

    def __init__(
        self,
        produce: Callable[[int], Batch],
        count: int,
        settings: StepSettings,
        on_close: Callable[[], None] | None = None,
    ):
        self.produce, self.count, self.settings, self.on_close = produce, count, settings, on_close

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        ready: queue.Queue = queue.Queue(_PREFETCH_DEPTH)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._produce_all, args=(ready, stop), name="batch-prefetch", daemon=True
        )
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
        # Made on the side stream, used on this one: the allocator must not reuse them before this
        # stream is done with them.
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


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda")
