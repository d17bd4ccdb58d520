"""Gradient averaging through shared memory, for DDP on CPU when every rank is on one machine.

Under gloo, DDP's all-reduce sends every gradient over TCP on loopback: for resnet18 that is
43 MiB per step, and on CPU it runs on the same cores that compute, so it costs 13-24% of a step
on two cores. Processes on one machine can read each other's memory instead. Each rank publishes
its gradients in one shared buffer, sums one slice of the bucket over all ranks, and then every
rank copies every slice's sum back into its gradients.

It is a DDP communication hook (`DistributedDataParallel.register_comm_hook`), so DDP still does
the bucketing, the hook order and the gradients' bookkeeping; only the transport changes. Each
element is summed in rank order by exactly one rank and divided by the world size, so every rank
ends with the same bits. With 2 ranks that is also exactly what gloo gives (DDP's default hook
halves each gradient before gloo sums them, and halving is exact); with more, the two can differ
in the last bit, as any two summation orders do.

The buffer is an anonymous memory file (`memfd_create`) of rank 0 that the other ranks open
through /proc: it has no name anywhere, so nothing is left behind however the processes end.

The hook is synchronous: it runs inside the backward pass and returns a finished future, so the
ranks meet at every bucket. On CPU there is no idle device for an asynchronous all-reduce to run
on; its work would take the same cores from the backward pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

_ALIGN = 64  # bytes: every bucket's columns start on their own cache line


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def gradient_bytes(module: nn.Module) -> int:
    """Room for every gradient DDP can put in a bucket, each bucket aligned."""
    return sum(_aligned(p.numel() * p.element_size()) for p in module.parameters() if p.requires_grad)


def slice_bounds(numel: int, world_size: int) -> list[tuple[int, int]]:
    """The slice of a bucket that each rank sums: contiguous, sizes differing by at most one."""
    return [(rank * numel // world_size, (rank + 1) * numel // world_size) for rank in range(world_size)]


def reserve_shared_memory(nbytes: int) -> tuple[int | None, str]:
    """Rank 0's part: an anonymous memory file of `nbytes` whose pages are reserved now, so that
    running out of memory is an answer here, not a SIGBUS in the middle of a backward pass.
    Returns its descriptor, or None and why."""
    if not hasattr(os, "memfd_create"):
        return None, "this system has no memfd_create (Linux only)"
    try:
        fd = os.memfd_create("asl-ddp-gradients", os.MFD_CLOEXEC)
    except OSError as error:
        return None, f"cannot create an anonymous memory file ({error.strerror}); set distributed.cpu_allreduce: gloo"
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        os.close(fd)
        return None, f"cannot reserve {nbytes / 2**20:.0f} MiB of shared memory for the gradients ({error.strerror}); free memory or set distributed.cpu_allreduce: gloo"
    return fd, ""


class SharedMemoryGradientAverage:
    """The communication hook (`average`); build it with `attach`, which every rank must call together.

    Memory layout: one row per rank, each as long as all the gradients together. Within a step,
    DDP hands the buckets over in index order (checked), and bucket k takes the columns after
    bucket k-1, so a rank can publish the next bucket while a slower one still reads the last one's
    sums.

    One call, for a bucket of n elements on rank r of W:
      1. publish: copy the gradients outside r's slice into row r (the other ranks sum those);
      2. barrier; sum r's slice over the rows (r's own gradients for row r) into row r;
      3. barrier; copy every rank's sums into the bucket, dividing by W on the way.
    Step 1 of the first bucket waits for the previous step's last bucket to be read everywhere:
    when the layout changes (DDP rebuilds its buckets after the first step), the new bucket 0 can
    overlap the sums a slower rank is still reading. DDP's rebuild happens to synchronize the
    ranks as well; the hook does not rely on that.
    """

    def __init__(self, rows: torch.Tensor, group: dist.ProcessGroup, rank: int, world_size: int):
        self.rows = rows  # uint8 [world_size, row_bytes], mapped from rank 0's buffer
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self._next_column = 0
        self._next_bucket = 0

    @classmethod
    def attach(
        cls,
        module: nn.Module,
        timeout: timedelta = timedelta(minutes=10),
        reserve: Callable[[int], tuple[int | None, str]] = reserve_shared_memory,
    ) -> tuple[SharedMemoryGradientAverage | None, str]:
        """Map rank 0's buffer on every rank; `(None, why)` on every rank if any rank cannot."""
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if world_size < 2:
            return None, "one process has nothing to average"
        row_bytes = gradient_bytes(module)
        fd, why = reserve(world_size * row_bytes) if rank == 0 else (None, "")
        source = [f"/proc/{os.getpid()}/fd/{fd}" if fd is not None else None, why]
        dist.broadcast_object_list(source, src=0)
        path, why = source
        flat = None
        if path is not None:
            try:
                flat = torch.from_file(path, shared=True, size=world_size * row_bytes, dtype=torch.uint8)
            except (OSError, RuntimeError) as error:
                why = f"rank {rank} cannot map rank 0's shared memory at {path} ({error})"
        answers: list = [None] * world_size
        dist.all_gather_object(answers, why)  # also: every rank has mapped the buffer by now
        if fd is not None:
            os.close(fd)  # the mappings keep the memory; it is freed with the last of them
        failures = [answer for answer in answers if answer]
        if failures or flat is None:
            return None, failures[0] if failures else why
        # The hook's barriers have a group of their own, so they never interleave with DDP's collectives.
        group = dist.new_group(backend="gloo", timeout=timeout)
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
        if bucket.index() != self._next_bucket:
            raise RuntimeError(
                f"DDP handed over gradient bucket {bucket.index()} where bucket {self._next_bucket} was due: the shared-memory "
                "average lays buckets out in order (DDP's skip_all_reduce_unused_params breaks that; set distributed.cpu_allreduce: gloo)"
            )
        self._next_bucket = 0 if bucket.is_last() else bucket.index() + 1
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
