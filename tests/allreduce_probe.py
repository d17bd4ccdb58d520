"""Run under torchrun by tests/test_distributed.py: the shared-memory gradient average against gloo's.

Each rank feeds its own data through a small DDP model with odd layer sizes, one parameter of a
single element and a bucket cap of zero (one bucket per parameter after DDP's rebuild, so some
buckets are smaller than the number of ranks), for three steps. Rank 1 is made slow where it
reads the sums back, and nothing synchronizes the ranks between steps, so a rank that published
the next step's gradients over sums another rank had not yet read would show up as a wrong
average. The gloo reference is computed after training, from each rank's own gradients.

DDP itself synchronizes the ranks when it rebuilds its buckets, which would hide a missing guard
for a changed bucket layout; so the hook is also driven directly, with one bucket of every
gradient followed by a step of two smaller buckets and no synchronization in between.

Saves, per rank: the gradients the hook produced, the gloo averages of the raw gradients, the
size of every bucket the hook saw, the same for the directly driven buckets, and what `attach`
answers when rank 0 cannot reserve memory.

    torchrun --standalone --nproc-per-node=3 tests/allreduce_probe.py OUT_DIR
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.shared_memory_allreduce import SharedMemoryGradientAverage

STEPS = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(37, 53), nn.Tanh(), nn.Linear(53, 29), nn.Tanh(), nn.Linear(29, 7))
        self.gain = nn.Parameter(torch.ones(1))  # a one-element bucket: two of three ranks sum nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * self.gain


class Bucket:
    """What the hook uses of DDP's GradBucket."""

    def __init__(self, index: int, last: bool, values: torch.Tensor):
        self._index, self._last, self._values = index, last, values

    def index(self) -> int:
        return self._index

    def is_last(self) -> bool:
        return self._last

    def buffer(self) -> torch.Tensor:
        return self._values


def changed_layout(hook: SharedMemoryGradientAverage, rank: int) -> tuple[dict, dict]:
    """One bucket of 3,000 elements, then buckets of 5 and 2,995: the new bucket 0 lands on columns
    that the old bucket's sums occupied, while a slow rank may still be reading them."""
    data = torch.Generator().manual_seed(200 + rank)
    averaged, local = {}, {}
    for step, sizes in enumerate([[3000], [5, 2995]]):
        for index, size in enumerate(sizes):
            values = torch.randn(size, generator=data)
            local[f"{step}.{index}"] = values.clone()
            averaged[f"{step}.{index}"] = hook.average(None, Bucket(index, index == len(sizes) - 1, values)).wait().clone()
    return averaged, local


def slow_reader(divide):
    """torch.div as the hook calls it to read the sums back, 20 ms late."""

    def div(*args, **kwargs):
        time.sleep(0.02)
        return divide(*args, **kwargs)

    return div


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)
        model = Net()
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0)
        hook, why = SharedMemoryGradientAverage.attach(ddp.module)
        assert hook is not None, why
        bucket_sizes: list[list[int]] = []

        def recording_hook(state, bucket):
            if bucket.index() == 0:
                bucket_sizes.append([])
            bucket_sizes[-1].append(bucket.buffer().numel())
            return hook.average(state, bucket)

        ddp.register_comm_hook(None, recording_hook)
        real_div = torch.div
        if rank == 1:
            torch.div = slow_reader(real_div)
        averaged, local = {}, {}
        data = torch.Generator().manual_seed(100 + rank)
        for step in range(STEPS):
            inputs = torch.randn(11, 37, generator=data)
            ddp.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            ddp(inputs).square().sum().backward()
            reference(inputs).square().sum().backward()
            for name, parameter in ddp.module.named_parameters():
                averaged[f"{step}.{name}"] = parameter.grad.clone()
            for name, parameter in reference.named_parameters():
                local[f"{step}.{name}"] = parameter.grad.clone()
        direct_averaged, direct_local = changed_layout(hook, rank)
        torch.div = real_div
        over_gloo, direct_over_gloo = {}, {}
        for gradients, averages in ((local, over_gloo), (direct_local, direct_over_gloo)):
            for key, gradient in gradients.items():
                dist.all_reduce(gradient)
                averages[key] = gradient / world_size

        fallback, no_memory_reason = SharedMemoryGradientAverage.attach(ddp.module, reserve=lambda nbytes: (None, f"no memory for {nbytes} bytes (probe)"))
        torch.save(
            {
                "shared_memory": averaged,
                "gloo": over_gloo,
                "bucket_sizes": bucket_sizes,
                "direct_shared_memory": direct_averaged,
                "direct_gloo": direct_over_gloo,
                "fallback": fallback,
                "no_memory_reason": no_memory_reason,
            },
            out_dir / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
