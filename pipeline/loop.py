"""The training loop: one epoch of optimizer steps, and an exact evaluation pass.

It knows nothing about DataParallel or DDP, nor where the data lives: it is handed this process's
batches (pipeline.feed), and the strategy sums the counters across processes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.strategy import Strategy

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StepSettings:
    device: torch.device
    channels_last: bool
    bf16: bool
    """bf16 autocast; only ever true on CUDA."""


@dataclass(frozen=True)
class EpochStats:
    loss: float
    accuracy: float
    images: int
    """Images seen by all processes together."""
    seconds: float
    data_wait_seconds: float
    """Time the main process spent waiting for its batches (gather and host-to-device copy)."""


def _autocast(settings: StepSettings):
    return torch.autocast("cuda", dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
) -> EpochStats:
    """One optimizer step per batch of `batches`, this process's share of the epoch, ready on the
    device (pipeline.feed): every step of every rank has the same number of images."""
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)  # loss sum, correct, count
    timed = _Timed(batches)
    started = time.perf_counter()
    for x, y in timed:
        with _autocast(settings):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Accumulated on the device: calling .item() here would stall the GPU every step.
        totals += torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=y.device)])
    _synchronize(settings.device)
    seconds = time.perf_counter() - started
    loss_sum, correct, count = strategy.all_reduce_sum(totals).tolist()
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), int(count), seconds, timed.seconds)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], strategy: Strategy, settings: StepSettings) -> tuple[float, float]:
    """(mean loss, accuracy) over every item exactly once: `batches` holds this process's share."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)
    for x, y in batches:
        with _autocast(settings):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=y.device)])
    loss_sum, correct, count = strategy.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)
