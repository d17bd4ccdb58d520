"""How much decoding may run at once: concurrent decodes reserve their peak memory from one byte
budget, and wait in a bounded line for it, so that a server's memory has a stated ceiling however
many clients send large images. The web page and the logged model (`mlflow models serve`) share it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator

MIB = 1 << 20
DEFAULT_DECODE_QUEUE = 32
"""Decodes that may wait for room in the budget; the next one is refused as busy."""
DEFAULT_DECODE_WAIT_S = 30.0
"""Longest wait for room before a decode is refused as busy."""
_TRIM_AFTER_BYTES = 32 * MIB  # below this, malloc keeps its free memory usefully for the next request


class OverBudget(ValueError):
    """One image needs more memory to decode than the whole budget: it can never be decoded here."""


class Busy(Exception):
    """The budget is taken and the line for it is full (or did not move in time): retry shortly."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MemoryBudget:
    """A byte budget that decodes reserve from, served first come, first served.

    `reserve(cost)` waits while earlier reservations hold the room it needs; with `max_waiting`
    already waiting, or after `timeout_s`, it raises `Busy`. A cost over the whole budget raises
    `OverBudget`. Waiting in line order means a large image is never starved by a stream of small ones.
    """

    def __init__(
        self,
        capacity_bytes: int,
        max_waiting: int = DEFAULT_DECODE_QUEUE,
        timeout_s: float = DEFAULT_DECODE_WAIT_S,
    ):
        if capacity_bytes <= 0 or max_waiting < 0 or timeout_s <= 0:
            raise ValueError(f"invalid budget: {capacity_bytes} bytes, {max_waiting} waiting, {timeout_s} s")
        self.capacity, self.max_waiting, self.timeout_s = capacity_bytes, max_waiting, timeout_s
        self.used = 0
        self._line: deque[int] = deque()
        self._tickets = itertools.count()
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def _fits(self, ticket: int, cost: int) -> bool:
        return self._line[0] == ticket and self.used + cost <= self.capacity

    def _take(self, cost: int) -> None:
        if cost > self.capacity:
            raise OverBudget(
                f"decoding it takes about {cost / MIB:.0f} MB, "
                f"more than the whole decode budget of {self.capacity / MIB:.0f} MB"
            )
        with self._changed:
            if not self._line and self.used + cost <= self.capacity:
                self.used += cost
                return
            if len(self._line) >= self.max_waiting:
                raise Busy(f"{len(self._line)} images are already waiting to be decoded; retry in a moment")
            ticket = next(self._tickets)
            self._line.append(ticket)
            try:
                if not self._changed.wait_for(lambda: self._fits(ticket, cost), self.timeout_s):
                    raise Busy(f"no room to decode within {self.timeout_s:g} s; retry in a moment")
                self.used += cost
            finally:
                self._line.remove(ticket)
                self._changed.notify_all()  # the next in line may fit now

    def _give_back(self, cost: int) -> None:
        with self._changed:
            self.used -= cost
            self._changed.notify_all()
        if cost >= _TRIM_AFTER_BYTES:
            return_freed_memory()

    @contextlib.contextmanager
    def reserve(self, cost: int) -> Iterator[None]:
        """Hold `cost` bytes of the budget meanwhile (see the class docstring for the refusals)."""
        self._take(cost)
        try:
            yield
        finally:
            self._give_back(cost)


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    # The process's own symbols, which hold libc's: ctypes.util.find_library would run ldconfig in
    # a forked child, a copy (in RSS) of a server that may be holding a gigabyte at the time.
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def return_freed_memory() -> float:
    """Hand the memory that freed decodes left in malloc's arenas back to the system (glibc keeps
    it otherwise, and a server's size would only ever grow); returns the seconds it took."""
    started = time.perf_counter()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
    return time.perf_counter() - started
