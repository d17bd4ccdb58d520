"""The training loop: one epoch of optimizer steps, and an exact evaluation pass.

It knows nothing about DataParallel or DDP, nor where the data lives: it is handed this process's
batches (pipeline.feed), and the strategy sums the counters across processes. No step waits for the
device: the loss is checked for NaN there and read back late; an epoch ends with one intended sync.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.serving.precision import autocast
from pipeline.strategy import Strategy

if TYPE_CHECKING:
    from pipeline.augment import Augment

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    device: torch.device
    channels_last: bool
    bf16: bool
    """bf16 autocast: true only where the device computes bf16 natively (see serving/precision.py)."""

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int
    """Images seen by all processes together."""
    seconds: float
    data_wait_seconds: float
    """Time the main process spent waiting for its batches (gather and host-to-device copy)."""


def _autocast(settings: StepSettings) -> contextlib.AbstractContextManager:
    return autocast(settings.device, settings.precision)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _intended_sync(device: torch.device) -> Iterator[None]:
    """An intended host-device synchronization (an epoch's end): allowed under
    torch.cuda.set_sync_debug_mode, which then reports every other one."""
    if device.type != "cuda":
        yield
        return
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite, at the latest by this epoch's step `step` (1-based)."""

    def __init__(self, step: int):
        super().__init__(f"the training loss became NaN or infinite by step {step} of the epoch")
        self.step = step


NAN_CHECK_INTERVAL = 20
"""Steps between two looks at the running loss; a NaN stops the epoch at most twice this many steps late."""


class DivergenceCheck:
    """Stops a training whose loss turned NaN or infinite within 2 x `interval` steps, without a host sync.

    Every `interval` steps, whether the epoch's running loss sum is finite (summed over the processes,
    so that all stop at the same step) is copied to the host asynchronously; the next check reads it,
    by when the copy has long arrived (the host runs at most a few steps ahead of the GPU).
    """

    def __init__(self, strategy: Strategy, device: torch.device, interval: int = NAN_CHECK_INTERVAL):
        self.strategy, self.device, self.interval = strategy, device, interval
        self.flag: torch.Tensor | None = None  # 1 or more: some process's loss sum is not finite
        self.copied: torch.cuda.Event | None = None
        self.flag_step = 0

    def after_step(self, loss_sum: torch.Tensor, step: int) -> None:
        if step % self.interval:
            return
        self.raise_if_diverged()
        flag = self.strategy.all_reduce_sum(torch.isfinite(loss_sum).logical_not().double().reshape(1))
        if self.device.type == "cuda":
            if self.flag is None:
                self.flag = torch.empty(1, dtype=torch.float64, pin_memory=True)
            self.flag.copy_(flag, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.flag = flag
        self.flag_step = step

    def raise_if_diverged(self) -> None:
        if self.flag is None:
            return
        if self.copied is not None:
            self.copied.synchronize()  # recorded `interval` steps ago: long complete, so no stall
        if self.flag.item() > 0:
            raise NonFiniteLoss(self.flag_step)


class _Timed:
    """Iterates `batches`, adding up the time spent waiting for each (gather and host-to-device copy)."""

    def __init__(self, batches: Iterable[Batch]):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self.batches)
        while True:
            fetch_started = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - fetch_started
            if batch is None:
                return
            yield batch


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    batches: Iterable[Batch],
    strategy: Strategy,
    settings: StepSettings,
    augment: Augment | None = None,
) -> EpochStats:
    """One optimizer step per batch of `batches`, this process's share of the epoch, ready on the
    device (pipeline.feed): every step of every rank has the same number of images. `augment`
    changes each batch on its device, given the step's number. Raises NonFiniteLoss when the loss
    becomes NaN or infinite."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)  # loss sum, correct, count
    count, steps = 0, 0  # Python numbers: a count made a device tensor every step is a host-to-device copy
    divergence = DivergenceCheck(strategy, settings.device)
    timed = _Timed(batches)
    started = time.perf_counter()
    for x, y in timed:
        if augment is not None:
            x = augment(x, steps)
        with _autocast(settings):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulated on the device: calling .item() here would stall the GPU every step.
        totals[:2] += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
        count, steps = count + len(y), steps + 1
        # Checked every NAN_CHECK_INTERVAL steps, read one interval later: .item() here would stall the GPU.
        divergence.after_step(totals[0], steps)
    totals[2].fill_(count)
    with _intended_sync(settings.device):
        _synchronize(settings.device)
        seconds = time.perf_counter() - started
        loss_sum, correct, count = strategy.all_reduce_sum(totals).tolist()
    if not math.isfinite(loss_sum):
        raise NonFiniteLoss(steps)
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), int(count), seconds, timed.seconds)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Batch], strategy: Strategy, settings: StepSettings
) -> tuple[float, float]:
    """(mean loss, accuracy) over every item exactly once: `batches` holds this process's share."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)
    for x, y in batches:
        with _autocast(settings):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        totals[:2] += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double()])
        totals[2] += len(y)
    with _intended_sync(settings.device):
        loss_sum, correct, count = strategy.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)
