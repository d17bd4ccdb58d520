"""How training is spread over devices, so that the training loop does not have to know.

`dp`: one process, `nn.DataParallel` over `gpus` CUDA devices (plain CPU without CUDA).
`ddp`: one process per device started by torchrun, `DistributedDataParallel` over NCCL or gloo.
The base class is one process, rank 0 of 1, so no caller branches on "distributed".
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from pipeline.devices import device_label
from pipeline.errors import UserError
from pipeline.serving.precision import autocast


def inside_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def check_visible_gpus(requested: int) -> None:
    """On a CUDA machine, asking for more GPUs than are visible is a user error."""
    if torch.cuda.is_available() and requested > torch.cuda.device_count():
        visible = torch.cuda.device_count()
        raise UserError(
            f"gpus={requested} but only {visible} CUDA device(s) are visible: "
            f"set gpus to at most {visible} (dvc exp run -S gpus={visible})"
        )


SYNC_BATCHNORM_NEEDS_CUDA = (
    "train.sync_batchnorm needs CUDA (SyncBatchNorm does not run on CPU): set it to false, "
    "or use model.name: small_cnn, which has no batch-norm"
)


SYNC_BATCHNORM_NEEDS_DDP = (
    "train.sync_batchnorm applies only to ddp (SyncBatchNorm needs a process group, and dp has none): "
    "set it to false to train dp"
)


def check_data_parallel_options(replicas: int, sync_batchnorm: bool, compile_: bool) -> None:
    """Refuse what DataParallel cannot honour, rather than ignore it while the run logs it as applied."""
    if sync_batchnorm:
        raise UserError(SYNC_BATCHNORM_NEEDS_DDP)
    if compile_ and replicas > 1:
        raise UserError(
            f"train.compile does not reach DataParallel's {replicas} replicas (they run the uncompiled "
            "module in threads: the compile time buys nothing): set train.compile: false for dp, or use ddp"
        )


def check_batch_divides(global_batch: int, world_size: int) -> None:
    if global_batch % world_size:
        raise UserError(
            f"train.batch_size={global_batch} does not split evenly over {world_size} processes: "
            f"use a multiple of {world_size} so every optimizer step sees the same number of images"
        )


class Strategy:
    """One process, one device: the base every strategy refines."""

    name = "single"
    allreduce = "none"  # how gradients are averaged across processes: none, nccl or gloo
    rank = 0
    local_rank = 0
    world_size = 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_label(self) -> str:
        return device_label(self.device)

    def per_process_batch(self, global_batch: int) -> int:
        return global_batch

    def sampler(self, dataset_size: int, seed: int) -> DistributedSampler:
        # The same sampler class everywhere: with one replica it is a seeded permutation per epoch,
        # with N replicas each rank takes every N-th index of that same permutation. So the union
        # of the ranks' k-th batches is exactly the one-process k-th batch.
        return DistributedSampler(
            range(dataset_size),  # type: ignore[arg-type]  # torch says Dataset; it needs only len()
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )

    def eval_indices(self, dataset_size: int) -> range:
        """This process's share of an exact evaluation: every item exactly once over all ranks."""
        return range(self.rank, dataset_size, self.world_size)

    def wrap(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        """The model as this strategy trains it; `precision` is the run's (`bf16` or `fp32`)."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel, AutocastForward)):
            model = model.module
        return model

    def eval_model(self, wrapped: nn.Module) -> nn.Module:
        return wrapped

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def broadcast_object(self, value: Any) -> Any:
        return value

    def share_main_buffers(self, module: nn.Module) -> None:
        """Give every process rank 0's buffers (BatchNorm's running statistics)."""

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class AutocastForward(nn.Module):
    """`module`, whose forward enters the run's autocast itself, in whichever thread calls it.

    Autocast state is per thread, and DataParallel's replica threads re-enter it with `enabled=` only,
    which on CUDA means float16: PyTorch's AMP notes put autocast inside forward for DataParallel.
    """

    def __init__(self, module: nn.Module, device: torch.device, precision: str):
        super().__init__()
        self.module = module
        self.autocast_device = torch.device(device.type)
        self.precision = precision

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.autocast_device, self.precision):
            return self.module(*args, **kwargs)


class DataParallelStrategy(Strategy):
    name = "dp"

    def __init__(self, gpus: int, sync_batchnorm: bool = False, compile_: bool = False):
        check_visible_gpus(gpus)
        self.gpus = gpus if torch.cuda.is_available() else 0
        check_data_parallel_options(max(self.gpus, 1), sync_batchnorm, compile_)
        super().__init__(torch.device("cuda:0") if self.gpus else torch.device("cpu"))

    def wrap(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        model = model.to(self.device)
        # DataParallel scatters each batch over the devices and gathers the outputs on cuda:0;
        # on one GPU or on CPU the wrapper would only add overhead.
        if self.gpus <= 1:
            return model
        return nn.DataParallel(
            AutocastForward(model, self.device, precision), device_ids=list(range(self.gpus))
        )


_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def attempt_store(world_size: int) -> dist.Store:
    """The rendezvous store of this torchrun attempt.

    torchrun's agent keeps one store for the whole job, across worker restarts, so the addresses
    that the killed workers published are still in it; a restarted group that reads them tries to
    connect to dead ports and fails. Every attempt therefore gets its own key prefix.
    """
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and int(os.environ["RANK"]) == 0,
        timeout=_COLLECTIVE_TIMEOUT,
    )
    return dist.PrefixStore(f"/pipeline/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


class DistributedStrategy(Strategy):
    name = "ddp"

    def __init__(self, sync_batchnorm: bool = False):
        if not inside_torchrun():
            raise RuntimeError(
                "DistributedStrategy must run under torchrun (use `python -m pipeline train ddp`)"
            )
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ["LOCAL_WORLD_SIZE"])
        if torch.cuda.is_available():
            check_visible_gpus(local_world)
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            backend = "nccl"
        else:
            if sync_batchnorm:
                raise UserError(SYNC_BATCHNORM_NEEDS_CUDA)
            device = torch.device("cpu")
            backend = "gloo"
            # The processes share the machine's cores; oversubscribing them makes every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.sync_batchnorm = sync_batchnorm
        super().__init__(device)
        dist.init_process_group(
            backend,
            store=attempt_store(self.world_size),
            rank=self.rank,
            world_size=self.world_size,
            timeout=_COLLECTIVE_TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )

    def per_process_batch(self, global_batch: int) -> int:
        check_batch_divides(global_batch, self.world_size)
        return global_batch // self.world_size

    def wrap(self, model: nn.Module, precision: str = "fp32") -> nn.Module:
        if self.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        device_ids = [self.local_rank] if self.device.type == "cuda" else None
        self.allreduce = dist.get_backend()
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def eval_model(self, wrapped: nn.Module) -> nn.Module:
        # Ranks evaluate different numbers of batches; DDP's forward broadcasts buffers (a
        # collective), which would deadlock on the rank with one batch more. The bare module has none.
        return self.unwrap(wrapped)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share_main_buffers(self, module: nn.Module) -> None:
        # Each rank's BatchNorm statistics come from its own last batch: evaluated as they are, the
        # ranks would blend slightly different models, none of them the one exported (rank 0's).
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_strategy(name: str, gpus: int, sync_batchnorm: bool = False, compile_: bool = False) -> Strategy:
    if name == "dp":
        return DataParallelStrategy(gpus, sync_batchnorm, compile_)
    if name == "ddp":
        return DistributedStrategy(sync_batchnorm)
    raise ValueError(f"unknown strategy {name!r}")
