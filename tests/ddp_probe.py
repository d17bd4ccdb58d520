"""Run under torchrun by tests/test_distributed.py (and directly, for the one-process reference).

Trains `small_cnn` for a few steps with the pipeline's own strategy and loop on fixed random
data, then saves, per rank, the indices the rank trained on each epoch and its final weights.

    torchrun --standalone --nproc-per-node=2 tests/ddp_probe.py OUT_DIR
    python tests/ddp_probe.py OUT_DIR          # one process, same global batch
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.batches import epoch_order, rank_batches
from pipeline.feed import tensor_batches
from pipeline.loop import StepSettings, train_one_epoch
from pipeline.serving.networks import build_model
from pipeline.strategy import DistributedStrategy, Strategy, inside_torchrun

GLOBAL_BATCH, EPOCHS, IMAGES, SEED = 16, 2, 96, 7


def main(out_dir: Path) -> None:
    strategy = DistributedStrategy() if inside_torchrun() else Strategy(torch.device("cpu"))
    try:
        data = torch.Generator().manual_seed(123)
        images = torch.randn(IMAGES, 3, 32, 32, generator=data).half()
        labels = torch.randint(0, 29, (IMAGES,), generator=data)
        torch.manual_seed(SEED)
        model = strategy.wrap(build_model("small_cnn", 29))
        initial = {k: v.detach().clone() for k, v in strategy.unwrap(model).state_dict().items()}
        # SGD, not Adam: Adam divides by sqrt(v), which turns float noise in a near-zero gradient
        # into a full-size step and would hide real agreement behind a few outlier weights.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        settings = StepSettings(device=strategy.device, channels_last=False, bf16=False)
        seen = []
        for epoch in range(EPOCHS):
            # The pipeline's own order and share: a shuffle buffer smaller than the split, three "shards".
            order = epoch_order([40, 40, 16], shuffle_buffer=24, seed=SEED, epoch=epoch).order
            mine = rank_batches(order, GLOBAL_BATCH, strategy.world_size, strategy.rank)
            seen.append(mine.ravel().tolist())
            train_one_epoch(
                model,
                optimizer,
                scheduler,
                nn.CrossEntropyLoss(),
                tensor_batches(images, labels, list(mine), settings),
                strategy,
                settings,
            )
        state = {k: v.detach().clone() for k, v in strategy.unwrap(model).state_dict().items()}
        torch.save(
            {
                "seen": seen,
                "state": state,
                "initial": initial,
                "world_size": strategy.world_size,
                "allreduce": strategy.allreduce,
            },
            out_dir / f"rank{strategy.rank}.pt",
        )
    finally:
        strategy.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
