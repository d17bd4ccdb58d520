"""The training loop: one epoch of optimizer steps, and an exact evaluation pass.

It knows nothing about DataParallel or DDP: the strategy picks this process's indices and batch
size and sums the counters across processes.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeline.strategy import Strategy

if TYPE_CHECKING:
    from pipeline.augment import Augment


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


def _batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, settings: StepSettings):
    x, y = images[index], labels[index]
    if x.device != settings.device:
        # Pinned host memory lets the copy overlap with the GPU's work on the previous step.
        if settings.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(settings.device, non_blocking=True), y.to(settings.device, non_blocking=True)
    # One conversion: float16 -> float32 straight into the memory format the model uses.
    x = x.to(torch.float32, memory_format=torch.channels_last if settings.channels_last else torch.contiguous_format)
    return x, y


def _autocast(settings: StepSettings):
    return torch.autocast("cuda", dtype=torch.bfloat16) if settings.bf16 else contextlib.nullcontext()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: list[int],
    batch_size: int,
    strategy: Strategy,
    settings: StepSettings,
    augment: Augment | None = None,
) -> EpochStats:
    """Optimizer steps over `order` (this process's indices) in batches of `batch_size`; a last
    incomplete batch is dropped so every step averages the same number of images. `augment`
    changes each batch on its device, given the images' indices."""
    model.train()
    index_device = images.device
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)  # loss sum, correct, count
    data_wait = 0.0
    started = time.perf_counter()
    for start in range(0, len(order) - batch_size + 1, batch_size):
        fetch_started = time.perf_counter()
        index = torch.tensor(order[start : start + batch_size], device=index_device)
        x, y = _batch(images, labels, index, settings)
        data_wait += time.perf_counter() - fetch_started
        if augment is not None:
            x = augment(x, index)
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
    return EpochStats(loss_sum / max(count, 1), correct / max(count, 1), int(count), seconds, data_wait)


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, strategy: Strategy, settings: StepSettings
) -> tuple[float, float]:
    """(mean loss, accuracy) over every item exactly once, shared out over the processes."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=settings.device)
    mine = torch.tensor(list(strategy.eval_indices(len(labels))), dtype=torch.long, device=images.device)
    for start in range(0, len(mine), batch_size):
        x, y = _batch(images, labels, mine[start : start + batch_size], settings)
        with _autocast(settings):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        totals += torch.stack([loss.double(), (logits.argmax(1) == y).sum().double(), torch.tensor(len(y), dtype=torch.float64, device=y.device)])
    loss_sum, correct, count = strategy.all_reduce_sum(totals).tolist()
    return loss_sum / max(count, 1), correct / max(count, 1)
