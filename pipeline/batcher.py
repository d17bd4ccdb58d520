"""One forward pass for many requests: the web page's model thread takes every decoded image that is
ready, up to `max_batch`, and waits at most `wait_s` for more while other requests are still being
decoded, then answers each request's future with its own row.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]  # uint8 N x S x S x 3 -> N x classes


class Batcher:
    """Runs `forward` on a thread of its own over batches of the images `submit`ted.

    Wrap a request's decoding in `coming()`: while any request is in there, a batch with room
    waits (at most `wait_s`) for its image; when none is, the batch runs at once, so a lone client
    never waits for company. `batch_sizes` counts the batches run, by size.
    """

    def __init__(self, forward: Forward, max_batch: int, wait_s: float):
        self.forward, self.max_batch, self.wait_s = forward, max_batch, wait_s
        self.batch_sizes: Counter[int] = Counter()
        self._ready: queue.SimpleQueue[tuple[np.ndarray, Future] | None] = queue.SimpleQueue()
        self._decoding = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="forward-batches", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Mark a request whose image is being decoded and will be submitted (or fail) on exit."""
        with self._lock:
            self._decoding += 1
        try:
            yield
        finally:
            with self._lock:
                self._decoding -= 1

    def submit(self, pixels: np.ndarray) -> Future:
        """A future for the class probabilities of one image (uint8 S x S x 3)."""
        answer: Future = Future()
        self._ready.put((pixels, answer))
        return answer

    def totals(self) -> dict[str, int]:
        """Forward passes run so far, and the images they classified."""
        with self._lock:
            sizes = dict(self.batch_sizes)
        return {
            "forward_passes": sum(sizes.values()),
            "images": sum(size * count for size, count in sizes.items()),
        }

    def close(self) -> None:
        """Stop the thread once the images already submitted are answered."""
        self._ready.put(None)
        self._thread.join(timeout=60)

    def _gather(self, first: tuple[np.ndarray, Future]) -> tuple[list[tuple[np.ndarray, Future]], bool]:
        """The batch that starts with `first`, and whether the thread was asked to stop meanwhile."""
        batch, deadline = [first], time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._decoding == 0 or remaining <= 0:  # nothing on its way, or waited enough
                    break
                try:
                    # Short naps: a decode that fails submits nothing, and the wait should end with it.
                    item = self._ready.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._ready.get()
            if first is None:
                return
            batch, stopping = self._gather(first)
            self._answer(batch)

    def _answer(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        batch = [item for item in batch if item[1].set_running_or_notify_cancel()]  # its client may have gone
        if not batch:
            return
        with self._lock:
            self.batch_sizes[len(batch)] += 1
        try:
            probabilities = self.forward(np.stack([pixels for pixels, _ in batch]))
        except Exception as err:  # noqa: BLE001 -- each request gets the error; the thread lives on
            for _, answer in batch:
                answer.set_exception(err)
            return
        for row, (_, answer) in zip(probabilities, batch, strict=True):
            answer.set_result(row)
