"""Gradient averaging through shared memory, for DDP on CPU when every rank is on one machine.

Under gloo, DDP's all-reduce sends every gradient over TCP on loopback: for resnet18 that is
43 MiB per step, and on CPU it runs on the same cores that compute, so it costs 13-18% of a step
on two cores. Processes on one machine can read each other's memory instead. Each rank publishes
its gradients in one shared file, sums one slice of the bucket over all ranks, and then every rank
copies every slice's sum back into its gradients.

It is a DDP communication hook (`DistributedDataParallel.register_comm_hook`), so DDP still does
the bucketing, the hook order and the copy into `.grad`; only the transport changes. The result is
the average gloo computes: each element is summed in rank order by exactly one rank and divided by
the world size, so every rank ends with the same bits.

The hook is synchronous: it runs inside the backward pass and returns a finished future. On CPU
there is no idle device to overlap with, so waiting costs nothing that an asynchronous all-reduce
would have saved.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHARED_MEMORY_DIR = Path("/dev/shm")
_ALIGN = 64  # bytes: every bucket's columns start on their own cache line


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def gradient_bytes(module: nn.Module) -> int:
    """Room for every gradient DDP can put in a bucket, each bucket aligned."""
    return sum(_aligned(p.numel() * p.element_size()) for p in module.parameters() if p.requires_grad)


def slice_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The slice of a bucket that each rank sums: contiguous, sizes differing by at most one."""
    return [(rank * numel // world_size, (rank + 1) * numel // world_size) for rank in range(world_size)]


def _create_shared_file(nbytes: int, directory: Path) -> tuple[str | None, str]:
    """Rank 0's part: a file of `nbytes` whose pages are reserved now, so that running out of room
    is an error here, not a SIGBUS in the middle of a backward pass."""
    try:
        fd, path = tempfile.mkstemp(prefix="asl-ddp-gradients-", dir=directory)
    except OSError as error:
        return None, f"cannot create a file in {directory} ({error.strerror})"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        os.unlink(path)
        return None, f"{directory} has no room for {nbytes / 2**20:.0f} MiB of gradients ({error.strerror}); enlarge it (docker: --shm-size) or set distributed.cpu_allreduce: gloo"
    finally:
        os.close(fd)
    return path, ""


class SharedMemoryGradientAverage:
    """The communication hook (`average`); build it with `attach`, which every rank must call together.

    Memory layout: one row per rank, each as long as all the gradients together. Within a step,
    DDP hands the buckets over in index order, and bucket k takes the columns after bucket k-1,
    so a rank can publish the next bucket while a slower one still reads the last one's sums.

    One call, for a bucket of n elements on rank r of W:
      1. publish: copy the gradients outside r's slice into row r (the other ranks sum those);
      2. barrier; sum r's slice over the rows (r's own gradients for row r) into row r;
      3. barrier; copy every rank's sums into the bucket, dividing by W on the way.
    Step 1 of the first bucket waits for the previous step's last bucket to be read everywhere.
    """

    def __init__(self, rows: torch.Tensor, group: dist.ProcessGroup, rank: int, world_size: int):
        self.rows = rows  # uint8 [world_size, row_bytes], mapped from the shared file
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self._next_column = 0

    @classmethod
    def attach(cls, module: nn.Module, directory: Path = SHARED_MEMORY_DIR) -> tuple[SharedMemoryGradientAverage | None, str]:
        """Map one shared file on every rank; `(None, why)` on every rank if it cannot be had."""
        rank, world_size = dist.get_rank(), dist.get_world_size()
        row_bytes = gradient_bytes(module)
        decision: list = [None, ""]
        if rank == 0:
            decision = list(_create_shared_file(world_size * row_bytes, directory))
        dist.broadcast_object_list(decision, src=0)
        path, why = decision
        if path is None:
            return None, why
        try:
            flat = torch.from_file(path, shared=True, size=world_size * row_bytes, dtype=torch.uint8)
        finally:
            # Once every rank has mapped it, the name can go: the memory lives while a mapping does,
            # and is freed by the kernel however the processes end.
            dist.barrier()
            if rank == 0:
                os.unlink(path)
        # The hook's barriers have a group of their own, so they never interleave with DDP's collectives.
        group = dist.new_group(backend="gloo")
        return cls(flat.view(world_size, row_bytes), group, rank, world_size), ""

    def _columns(self, grads: torch.Tensor) -> torch.Tensor:
        """This bucket's [world_size, n] view of the rows, in the bucket's dtype."""
        start = self._next_column
        nbytes = grads.numel() * grads.element_size()
        if start + nbytes > self.rows.shape[1]:
            raise RuntimeError(f"gradient bucket of {nbytes} bytes at column {start} does not fit rows of {self.rows.shape[1]} bytes: the model's parameters changed after DDP wrapped it")
        self._next_column = start + _aligned(nbytes)
        return self.rows[:, start : start + nbytes].view(grads.dtype)

    # Unannotated on purpose: DDP compares the hook's annotations with the real types and would
    # reject the strings that `from __future__ import annotations` turns them into.
    def average(self, _state, bucket):  # (None, dist.GradBucket) -> torch.futures.Future[torch.Tensor]
        """The hook: `ddp.register_comm_hook(None, hook.average)`."""
        grads = bucket.buffer()
        if bucket.index() == 0:
            self._next_column = 0
            dist.barrier(group=self.group)
        columns = self._columns(grads)
        bounds = slice_bounds(grads.numel(), self.world_size)
        lo, hi = bounds[self.rank]
        own_row = columns[self.rank]

        own_row[:lo].copy_(grads[:lo])
        own_row[hi:].copy_(grads[hi:])
        dist.barrier(group=self.group)

        parts = [grads[lo:hi] if source == self.rank else columns[source, lo:hi] for source in range(self.world_size)]
        total = own_row[lo:hi]
        torch.add(parts[0], parts[1], out=total)
        for part in parts[2:]:
            total.add_(part)
        dist.barrier(group=self.group)

        for source, (start, end) in enumerate(bounds):
            torch.div(columns[source, start:end], self.world_size, out=grads[start:end])
        future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        future.set_result(grads)
        return future
