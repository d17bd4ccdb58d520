"""What does `train.augment` cost per training step?

    python benchmarks/augment_benchmark.py                  # resnet18, 64 px, batch 64, on CUDA if present
    python benchmarks/augment_benchmark.py --device cpu --rounds 8

The real step (`pipeline.loop.train_one_epoch`, the model, optimizer and settings that
`pipeline.trainer.TrainingState` builds, the default params) over in-memory float16 images, with
the default augmentation and without, in alternating rounds of `--steps` steps; every round's time
per step, best and median of each. Also times the augmentation alone on one batch. Target: the
augmented step costs under 5% more. Prints PASS/FAIL; always exits 0 (a measurement, not a test).
On a shared machine compare the two rows of one run, and read the best rather than the median.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np
import torch
from torch import nn

from pipeline.augment import BatchAugment
from pipeline.config import params_from_dict
from pipeline.feed import tensor_batches
from pipeline.loop import train_one_epoch
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD
from pipeline.strategy import Strategy
from pipeline.trainer import TrainingState, step_settings

TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per round")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each, alternating")
    args = parser.parse_args()

    device = torch.device(args.device)
    params = params_from_dict({"model": {"name": args.model}, "gpus": 1, "train": {"batch_size": args.batch}})
    strategy = Strategy(device)
    torch.manual_seed(0)
    state = TrainingState(params, strategy, 29, steps_per_epoch=10_000)
    settings = step_settings(params, strategy)
    images_count = args.batch * args.steps
    size = args.image_size
    images = torch.randn(images_count, 3, size, size).half().to(device)
    labels = torch.randint(0, 29, (images_count,)).to(device)
    augment = BatchAugment(params.train.augment, params.seed, images_count, IMAGENET_MEAN, IMAGENET_STD)

    def round_(augmented: bool, epoch: int) -> float:
        steps = np.sort(
            np.random.default_rng(epoch).permutation(images_count).reshape(args.steps, args.batch), axis=1
        )
        batches = tensor_batches(images, labels, list(steps), settings)
        step_augment = augment.for_epoch(epoch, steps) if augmented else None
        stats = train_one_epoch(
            state.model, state.optimizer, state.scheduler, nn.CrossEntropyLoss(), batches, strategy, settings,
            augment=step_augment,
        )  # fmt: skip
        return stats.seconds / args.steps

    round_(False, 0), round_(True, 0)  # warm-up: allocator, kernels, the per-device table
    times: dict[bool, list[float]] = {False: [], True: []}
    for number in range(args.rounds):
        for augmented in (False, True) if number % 2 == 0 else (True, False):
            times[augmented].append(round_(augmented, number + 1))

    alone = augment.for_epoch(0, np.arange(args.batch)[None, :])
    assert alone is not None  # augmentation is on
    x = images[: args.batch].float().contiguous(memory_format=torch.channels_last)
    alone(x, 0)
    alone_times = []
    for _ in range(20):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        alone(x, 0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        alone_times.append(time.perf_counter() - started)

    processor = platform.processor() or platform.machine()
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{processor}, {torch.get_num_threads()} threads"
    )
    print(
        f"device: {device} ({name}); {args.model} at {size} px, batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds"
    )
    print(f"load average before the summary: {os.getloadavg()[0]:.2f}")
    print(f"{'step':<22}{'best ms':>10}{'median ms':>12}")
    for augmented, label in ((False, "without augmentation"), (True, "with augmentation")):
        print(
            f"{label:<22}{1000 * min(times[augmented]):>10.1f}"
            f"{1000 * statistics.median(times[augmented]):>12.1f}"
        )
    best = min(times[True]) / min(times[False]) - 1
    median = statistics.median(times[True]) / statistics.median(times[False]) - 1
    verdict = "PASS" if best < TARGET else "FAIL"
    print(
        f"augmentation alone, one batch: best {1000 * min(alone_times):.2f} ms, "
        f"median {1000 * statistics.median(alone_times):.2f} ms"
    )
    print(
        f"cost per step: {100 * best:+.1f}% (best), {100 * median:+.1f}% (median); "
        f"target < {100 * TARGET:.0f}%: {verdict}"
    )
    share = min(alone_times) / min(times[False])
    print(f"augmentation alone / plain step (best): {100 * share:.1f}%")


if __name__ == "__main__":
    main()
