"""Run under torchrun by tests/test_distributed.py: the shared-memory gradient average against gloo's.

Each rank feeds its own data through a small DDP model with odd layer sizes and a bucket cap small
enough to give several buckets, for three steps (DDP rebuilds its buckets after the first). It
saves, per rank, the gradients the shared-memory hook produced, the same gradients averaged by a
plain gloo all-reduce, how many buckets each step had, and what `attach` answers for a directory
it cannot use.

    torchrun --standalone --nproc-per-node=3 tests/allreduce_probe.py OUT_DIR
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.shared_memory_allreduce import SharedMemoryGradientAverage

STEPS = 3


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(37, 53), nn.Tanh(), nn.Linear(53, 29), nn.Tanh(), nn.Linear(29, 7))
        reference = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0005)
        hook, why = SharedMemoryGradientAverage.attach(ddp.module)
        assert hook is not None, why
        bucket_counts: list[int] = []

        def counting_hook(state, bucket):
            if bucket.index() == 0:
                bucket_counts.append(0)
            bucket_counts[-1] += 1
            return hook.average(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        over_shared_memory, over_gloo = {}, {}
        data = torch.Generator().manual_seed(100 + rank)
        for step in range(STEPS):
            inputs = torch.randn(11, 37, generator=data)
            ddp.zero_grad(set_to_none=True)
            reference.zero_grad(set_to_none=True)
            ddp(inputs).square().sum().backward()
            reference(inputs).square().sum().backward()
            for name, parameter in ddp.module.named_parameters():
                over_shared_memory[f"{step}.{name}"] = parameter.grad.clone()
            for name, parameter in reference.named_parameters():
                averaged = parameter.grad.clone()
                dist.all_reduce(averaged)
                over_gloo[f"{step}.{name}"] = averaged / world_size

        fallback, no_room_reason = SharedMemoryGradientAverage.attach(ddp.module, directory=out_dir / "missing")
        torch.save(
            {"shared_memory": over_shared_memory, "gloo": over_gloo, "bucket_counts": bucket_counts, "fallback": fallback, "no_room_reason": no_room_reason},
            out_dir / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
