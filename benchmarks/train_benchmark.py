"""How close does training get to this machine's compute ceiling, and how do dp, ddp and the
original study's loop compare on the same images?

    python benchmarks/train_benchmark.py            # ~5 minutes on 2 quiet cores
    python benchmarks/train_benchmark.py --quick    # ~2 minutes: fewer images, epochs and rounds
    python benchmarks/train_benchmark.py --precision  # ~3 minutes: bf16 against fp32, see below
    python benchmarks/train_benchmark.py --precision --seeds 3  # and two more seeds each: ~6 minutes

Measures, in one run, for resnet18 at 64 px (29 classes, global batch 64):

  (a) the compute ceiling: the fp32 matrix-multiply rate (torch.mm of 2048x2048, best of N) with
      the threads training uses, and the FLOPs of one training image (forward + backward, counted
      by torch.utils.flop_counter.FlopCounterMode over a batch); ceiling images/s = rate / FLOPs;
  (b) our loop: `pipeline.loop.train_one_epoch` with the model, optimizer, schedule and StepSettings
      that `pipeline.trainer.TrainingState` builds, on in-memory float16 images, with channels_last on
      and off, and with the plain for-loop AdamW (what the pipeline used before it asked for the fused
      kernel); its images/s as a fraction of the ceiling; where a step's time goes (forward,
      backward, optimizer; the profiler's share of convolution, batch-norm and the rest); and our
      DDP step under torchrun (2 processes), with the gradients averaged over gloo and not at all;
  (c) epoch time end to end on the same synthetic 200x200 JPEGs, preprocessed by `build_shards`:
      the real `python -m pipeline train dp` and `python -m pipeline train ddp` (gpus=2: two
      processes) in a temporary workspace (steady state: the fastest epoch after the first, from
      metrics/curves_<strategy>.csv), against the original study's loop: torchvision ImageFolder +
      Resize/ToTensor/Normalize, DataLoader(batch_size=64, shuffle=True, num_workers=0), the same
      resnet18 with a 29-class head, Adam, over the same training files (fastest of its epochs);
      and `train dp` / `train ddp` again with `model.freeze_backbone: true` (the original study's
      mode, where only the head learns and DDP's all-reduce is tiny), for context.

(a), (b) and (c) run in fp32 (`train.bf16: false`), so that their figures compare with the fp32
ceiling and with earlier runs. `--precision` compares bf16 autocast with fp32 in one run instead,
where the processor computes bf16 natively (AMX, AVX512-BF16; elsewhere both rows are fp32):
the 2048x2048 matmul rate in fp32 and in bf16; our loop's images/s in each precision and its
effective GFLOP/s (images/s x counted FLOPs per image) against both matmul rates; and the real
`python -m pipeline train dp` on the default data (the shipped params.yaml: fetch, preprocess, then
train with `train.bf16` true and false, same seed), its images/s and validation accuracy. Target:
bf16 at least 1.5x fp32 end to end on a processor with AMX, validation accuracy within one point.

Targets: (b) >= 80% of the ceiling; (c) ddp with 2 processes at least as fast as dp in one.
Prints PASS/FAIL beside each; always exits 0 (it is a measurement, not a test).

The machine may be shared. A process with 2 OpenMP threads on 2 busy cores slows down far more
than 2x (each parallel region waits for its descheduled thread), so every figure is a best-of:
(b) runs many short rounds, interleaved and rotated, re-measuring the matmul beside them, and keeps
each one's best; (c) keeps each training's fastest steady epoch (whole-epoch means, so a little
below (b)'s best rounds). Compare ratios within one run; the load average is printed before and
after: well above the core count, the figures are low.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere without installing
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import torch
import yaml
from torch import nn

from pipeline.config import params_from_dict
from pipeline.feed import tensor_batches
from pipeline.loop import train_one_epoch
from pipeline.prefetch import model_input
from pipeline.serving.imaging import IMAGENET_MEAN, IMAGENET_STD
from pipeline.serving.networks import build_model
from pipeline.strategy import make_strategy
from pipeline.trainer import TrainingState, step_settings
from pipeline.workers import usable_cores

MODEL = "resnet18"
SIZE = 64
BATCH = 64
CLASSES = 29
TARGET_CEILING = 0.80
TARGET_DDP = 1.0


# --- (a) the ceiling -------------------------------------------------------------------------------


def matmul_gflops(repeat: int, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def flops_per_image() -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(MODEL, CLASSES)
    x, y = torch.randn(BATCH, 3, SIZE, SIZE), torch.randint(0, CLASSES, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / BATCH


# --- (b) our loop ----------------------------------------------------------------------------------


def batches_of(images: torch.Tensor, labels: torch.Tensor, order: list[int], batch: int, settings):
    """The loop's input: `order` in batches of `batch` (a last incomplete one dropped), fed as
    pipeline.feed feeds training."""
    import numpy as np

    steps = [
        np.sort(np.asarray(order[i : i + batch], dtype=np.int64))
        for i in range(0, len(order) - batch + 1, batch)
    ]
    return tensor_batches(images, labels, steps, settings)


class LoopConfig:
    """One configuration of the training step, built the way pipeline.trainer builds it."""

    def __init__(self, label: str, channels_last: bool, loop_adamw: bool, steps: int, bf16: bool = False):
        self.label = label
        train = {"epochs": 1, "batch_size": BATCH, "channels_last": channels_last, "bf16": bf16}
        params = params_from_dict({"model": {"name": MODEL}, "gpus": 1, "train": train})
        self.strategy = make_strategy("dp", 1)
        torch.manual_seed(0)
        self.state = TrainingState(params, self.strategy, CLASSES, steps_per_epoch=1000)
        if loop_adamw:  # what torch.optim.AdamW does on CPU unless asked for the fused kernel
            self.state.optimizer = torch.optim.AdamW(
                self.state.bare.parameters(),
                lr=params.train.lr,
                weight_decay=params.train.weight_decay,
                foreach=False,
            )
            self.state.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.state.optimizer, max_lr=params.train.lr, total_steps=1000, pct_start=0.15
            )
        self.settings = step_settings(params, self.strategy)
        self.optimizer_name = describe_optimizer(self.state.optimizer)
        self.steps = steps
        self.rates: list[float] = []
        self.waits: list[float] = []

    def epoch(
        self, images: torch.Tensor, labels: torch.Tensor, steps: int, generator: torch.Generator
    ) -> None:
        order = torch.randperm(len(labels), generator=generator)[: steps * BATCH].tolist()
        stats = train_one_epoch(
            self.state.model,
            self.state.optimizer,
            self.state.scheduler,
            nn.CrossEntropyLoss(),
            batches_of(images, labels, order, BATCH, self.settings),
            self.strategy,
            self.settings,
        )
        self.rates.append(stats.images / stats.seconds)
        self.waits.append(stats.data_wait_seconds / stats.seconds)

    @property
    def best(self) -> float:
        return max(self.rates)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    kind = (
        "fused"
        if group.get("fused")
        else "foreach"
        if group.get("foreach")
        else "for-loop"
        if group.get("foreach") is False
        else "default"
    )
    return f"{type(optimizer).__name__} ({kind})"


def step_phases(
    config: LoopConfig, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> dict[str, float]:
    """Milliseconds per step of each phase of the loop's step, timed one by one (CPU: synchronous)."""
    state, settings = config.state, config.settings
    loss_fn = nn.CrossEntropyLoss()
    totals = dict.fromkeys(("gather", "forward", "backward", "optimizer"), float("inf"))
    for step in range(steps + 1):  # the first is a warm-up
        index = torch.randint(0, len(labels), (BATCH,))
        t0 = time.perf_counter()
        x, y = model_input(images[index], settings), labels[index]
        t1 = time.perf_counter()
        loss = loss_fn(state.model(x), y)
        t2 = time.perf_counter()
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        state.optimizer.step()
        state.scheduler.step()
        t4 = time.perf_counter()
        if step:
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                totals[key] = min(totals[key], seconds * 1e3)  # best step of each phase
    return totals


def profile_ops(
    config: LoopConfig, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Self-CPU milliseconds per step by kind of op, and the top ops, over `steps` loop steps."""
    from torch.profiler import ProfilerActivity, profile

    order = list(range(steps * BATCH))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_one_epoch(
            config.state.model,
            config.state.optimizer,
            config.state.scheduler,
            nn.CrossEntropyLoss(),
            batches_of(images, labels, order, BATCH, config.settings),
            config.strategy,
            config.settings,
        )
    groups = {"convolution": 0.0, "batch-norm": 0.0, "relu/add/pool": 0.0, "optimizer": 0.0, "other": 0.0}
    ops = []
    for event in prof.key_averages():
        if event.key.startswith(("ProfilerStep", "Optimizer.", "## ")):
            continue
        ms = event.self_cpu_time_total / 1e3 / steps
        if ms <= 0:
            continue
        ops.append((event.key, ms))
        name = event.key
        if "convolution" in name:
            groups["convolution"] += ms
        elif "batch_norm" in name:
            groups["batch-norm"] += ms
        elif "adam" in name or name in (
            "aten::lerp_",
            "aten::addcdiv_",
            "aten::addcmul_",
            "aten::sqrt",
            "aten::_foreach_sqrt",
        ):
            groups["optimizer"] += ms
        elif any(
            k in name for k in ("clamp_min", "threshold_backward", "relu", "aten::add", "max_pool", "mul_")
        ):
            groups["relu/add/pool"] += ms
        else:
            groups["other"] += ms
    ops.sort(key=lambda item: -item[1])
    return groups, ops[:10]


def ddp_worker(out: Path, steps: int, rounds: int) -> None:
    """Under torchrun: our DDP step (TrainingState wraps the model as pipeline.trainer does), timed
    with the gradients averaged over gloo and not at all (DDP's no_sync), plus gloo's all-reduce of
    all the gradients alone."""
    import contextlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.strategy import DistributedStrategy

    strategy = DistributedStrategy()
    try:
        train = {"epochs": 1, "batch_size": BATCH, "bf16": False}
        params = params_from_dict({"model": {"name": MODEL}, "gpus": strategy.world_size, "train": train})
        torch.manual_seed(0)
        state = TrainingState(params, strategy, CLASSES, steps_per_epoch=1000)
        settings = step_settings(params, strategy)
        batch = strategy.per_process_batch(BATCH)
        generator = torch.Generator().manual_seed(strategy.rank)
        images = torch.randn(steps * batch, 3, SIZE, SIZE, generator=generator).half()
        labels = torch.randint(0, CLASSES, (steps * batch,), generator=generator)
        order = list(range(steps * batch))
        modes = {"gloo": False, "no_sync": True}
        best = dict.fromkeys(modes, 0.0)
        assert isinstance(state.model, DistributedDataParallel)  # as DistributedStrategy wraps it
        for round_ in range(rounds + 1):  # the first is a warm-up
            for mode, skip_allreduce in modes.items():
                context = state.model.no_sync() if skip_allreduce else contextlib.nullcontext()
                strategy.barrier()
                with context:
                    stats = train_one_epoch(
                        state.model,
                        state.optimizer,
                        state.scheduler,
                        nn.CrossEntropyLoss(),
                        batches_of(images, labels, order, batch, settings),
                        strategy,
                        settings,
                    )
                if round_:
                    best[mode] = max(best[mode], stats.images / stats.seconds)
        gradients = torch.zeros(sum(p.numel() for p in state.bare.parameters()))
        allreduce = float("inf")
        for _ in range(5):
            strategy.barrier()
            started = time.perf_counter()
            dist.all_reduce(gradients)
            allreduce = min(allreduce, time.perf_counter() - started)
        if strategy.is_main:
            out.write_text(json.dumps({
                "world_size": strategy.world_size,
                "threads_per_rank": torch.get_num_threads(),
                "images_per_second": best,
                "gloo_allreduce_ms": allreduce * 1e3,
                "gradient_mb": gradients.numel() * 4 / 2**20,
            }))  # fmt: skip
    finally:
        strategy.close()


def ddp_steps(steps: int, rounds: int, processes: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="train-bench-ddp-") as tmp:
        out = Path(tmp) / "ddp.json"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            __file__,
            "--ddp-worker",
            str(out),
            "--steps",
            str(steps),
            "--repeat",
            str(rounds),
        ]
        result = subprocess.run(
            command,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode:
            raise RuntimeError(f"ddp step worker failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return json.loads(out.read_text())


# --- (c) end to end --------------------------------------------------------------------------------


def make_workspace(work: Path, images_per_class: int, epochs: int) -> tuple[Path, dict, float, float]:
    """A workspace with data/raw, data/shards, dvc.yaml and params.yaml; returns it, the manifest
    and the seconds spent generating and preprocessing."""
    from pipeline.paths import Paths
    from pipeline.preprocess import shard_workspace
    from pipeline.synthetic import generate_synthetic_dataset

    workspace = work / "ws"
    paths = Paths(workspace)
    workspace.mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", workspace / "dvc.yaml")
    params = params_from_dict(write_params(workspace, images_per_class, epochs, freeze_backbone=False))
    started = time.perf_counter()
    generate_synthetic_dataset(
        paths.raw, images_per_class=images_per_class, frames_per_run=10, seed=0, size=200
    )
    generated = time.perf_counter() - started
    started = time.perf_counter()
    manifest = shard_workspace(params, paths)
    return workspace, manifest, generated, time.perf_counter() - started


def write_params(workspace: Path, images_per_class: int, epochs: int, freeze_backbone: bool) -> dict:
    values = {
        "seed": 0,
        "gpus": 2,
        "data": {
            "source": "synthetic",
            "synthetic": {"images_per_class": images_per_class, "frames_per_run": 10},
            "image_size": SIZE,
        },
        "model": {"name": MODEL, "freeze_backbone": freeze_backbone},
        "train": {"epochs": epochs, "batch_size": BATCH, "bf16": False},
    }
    (workspace / "params.yaml").write_text(yaml.safe_dump(values))
    return values


def run_stage(workspace: Path, strategy: str, timeout: float) -> dict:
    """`python -m pipeline train <strategy>` in the workspace; its fastest epoch's figures after the first."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DVC_ROOT", "DVC_EXP_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    env.update(
        PYTHONPATH=str(REPO),
        MLFLOW_DISABLE_TELEMETRY="true",
        MLFLOW_TRACKING_URI=f"sqlite:///{workspace / 'mlruns' / 'mlflow.db'}",
    )
    (workspace / "mlruns").mkdir(exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", strategy],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(
            f"train {strategy} failed ({result.returncode}):"
            f"\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
    with open(workspace / "metrics" / f"curves_{strategy}.csv") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((workspace / "metrics" / f"train_{strategy}.json").read_text())
    steady = min(
        rows[1:] or rows, key=lambda r: float(r["epoch_seconds"])
    )  # the fastest epoch after the first
    return {
        "val_accuracy": summary["val_accuracy"],
        "precision": summary.get("precision", "fp32"),
        "train_seconds": summary["train_seconds"],
        "epoch_seconds": float(steady["epoch_seconds"]),
        "images": int(steady["images"]),
        "images_per_second": float(steady["images_per_second"]),
        "data_wait_fraction": float(steady["data_wait_fraction"]),
        "epochs": [round(float(r["epoch_seconds"]), 2) for r in rows],
        "world_size": summary["world_size"],
        "wall_seconds": wall,
    }


def original_epoch(train_dir: Path, files: list[str], raw_root: Path, epochs: int) -> dict:
    """The original study's loop over the same training files (after a 2-batch warm-up): the
    fastest of `epochs` epochs."""
    import torchvision
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize((SIZE, SIZE)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(train_dir), transform=transform)
    wanted = {str((raw_root / name).resolve()) for name in files}
    chosen = [i for i, (path, _) in enumerate(dataset.samples) if str(Path(path).resolve()) in wanted]
    if len(chosen) != len(files):
        raise RuntimeError(f"found {len(chosen)} of the {len(files)} training files in {train_dir}")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Linear(model.fc.in_features, CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(
        Subset(dataset, chosen),
        batch_size=BATCH,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(0),
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    model.train()
    for i, (x, y) in enumerate(loader):  # warm-up, as our steady-state epoch is warm
        step(x, y)
        if i == 1:
            break
    results: list[dict[str, Any]] = []
    for _ in range(epochs):
        images, waited = 0, 0.0
        started = time.perf_counter()
        fetched = time.perf_counter()
        for x, y in loader:
            waited += time.perf_counter() - fetched
            step(x, y)
            images += len(y)
            fetched = time.perf_counter()
        seconds = time.perf_counter() - started
        results.append(
            {
                "epoch_seconds": seconds,
                "images": images,
                "images_per_second": images / seconds,
                "data_wait_fraction": waited / seconds,
            }
        )
    best = min(results, key=lambda r: r["epoch_seconds"])
    best["epochs"] = [round(r["epoch_seconds"], 2) for r in results]
    return best


# --- the report -------------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return f"{'PASS' if value >= target else 'FAIL'} (target >= {target:g})"


def print_table(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'measurement':<{width}}  {'figure':>16}  result")
    print(f"{'-' * width}  {'-' * 16}  {'-' * 44}")
    for name, figure, result in rows:
        print(f"{name:<{width}}  {figure:>16}  {result}")
    print()


# --- --precision: bf16 against fp32 ------------------------------------------------------------------


def processor_name() -> str:
    """lscpu's "Model name" (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_data_workspace(work: Path) -> Path:
    """The shipped params.yaml's data fetched and preprocessed in a workspace, as `dvc repro` makes it."""
    from pipeline.config import load_params
    from pipeline.fetch import fetch_raw
    from pipeline.paths import Paths
    from pipeline.preprocess import shard_workspace

    workspace = work / "default"
    workspace.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, workspace / name)
    params, paths = load_params(workspace / "params.yaml"), Paths(workspace)
    fetch_raw(params, paths)
    shard_workspace(params, paths)
    return workspace


def write_bf16(workspace: Path, bf16: bool, seed: int = 0) -> None:
    values = yaml.safe_load((REPO / "params.yaml").read_text())
    values["train"]["bf16"] = bf16
    values["seed"] = seed  # the data stays as made (seed 0): only the training's own draws change
    (workspace / "params.yaml").write_text(yaml.safe_dump(values))


def precision_comparison(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(a) matmul rates, (b) our loop and (c) `train dp` on the default data, in fp32 and in bf16."""
    from pipeline.serving.precision import native_bf16

    native = native_bf16(torch.device("cpu"))
    print(f"bf16 native on this processor (AMX or AVX512-BF16): {native}", flush=True)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rates = {name: matmul_gflops(repeat=10, dtype=dtype) for name, dtype in dtypes.items()}
    per_image = flops_per_image()
    generator = torch.Generator().manual_seed(0)
    pool = max(args.steps * BATCH, 512)
    images = torch.randn(pool, 3, SIZE, SIZE, generator=generator).half()
    labels = torch.randint(0, CLASSES, (pool,), generator=generator)
    loops = [LoopConfig(name, True, False, args.steps, bf16=name == "bf16") for name in dtypes]
    for loop in loops:  # warm-up: first-call allocations and oneDNN primitive creation
        loop.epoch(images, labels, 2, generator)
        loop.rates.clear()
    for round_ in range(args.repeat):  # interleaved and rotated, the matmuls re-measured beside them
        for name, dtype in dtypes.items():
            rates[name] = max(rates[name], matmul_gflops(repeat=2, dtype=dtype))
        for loop in loops[round_ % 2 :] + loops[: round_ % 2]:
            loop.epoch(images, labels, args.steps, generator)
    fp32, bf16 = rates["fp32"], rates["bf16"]
    rows = [
        ("(a) fp32 matmul rate", f"{fp32:.0f} GFLOP/s", "2048x2048 torch.mm, best of rounds"),
        ("(a) bf16 matmul rate", f"{bf16:.0f} GFLOP/s", f"{bf16 / fp32:.2f}x fp32 (bf16 tensors)"),
        ("(a) training FLOPs per image", f"{per_image / 1e9:.3f} GFLOP", "FlopCounterMode, fwd + bwd"),
    ]
    for loop in loops:
        effective = loop.best * per_image / 1e9
        shares = f"{effective / fp32:.0%} of fp32 matmul, {effective / bf16:.0%} of bf16 matmul"
        name = f"(b) loop, train.bf16={loop.label == 'bf16'} (ran {loop.settings.precision})"
        rows.append((name, f"{loop.best:.1f} img/s", f"{effective:.0f} GFLOP/s effective = {shares}"))
    rows.append(("(b) loop bf16 vs fp32 (images/s)", f"{loops[1].best / loops[0].best:.2f}x", ""))
    if not args.skip_end_to_end:
        rows += precision_end_to_end(args, native)
    return rows


def precision_end_to_end(args: argparse.Namespace, native: bool) -> list[tuple[str, str, str]]:
    """`train dp` on the default data with train.bf16 false and true, `--rounds` times each in turn."""
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="train-bench-precision-") as tmp:
        started = time.perf_counter()
        workspace = default_data_workspace(args.workdir or Path(tmp))
        print(f"(c) default data made in {time.perf_counter() - started:.0f}s", flush=True)
        for _ in range(args.rounds):
            for name in ("fp32", "bf16"):
                write_bf16(workspace, name == "bf16")
                run = run_stage(workspace, "dp", timeout=1200)
                print(
                    f"(c) train dp, train.bf16={name == 'bf16'}: ran {run['precision']}, "
                    f"epochs {run['epochs']} s, {run['images_per_second']:.1f} img/s, "
                    f"val accuracy {run['val_accuracy']:.4f}",
                    flush=True,
                )
                if name not in best or run["images_per_second"] > best[name]["images_per_second"]:
                    best[name] = run
        seed_0 = {name: run["val_accuracy"] for name, run in best.items()}
        seed_rows = seed_spread(workspace, args.seeds, seed_0) if args.seeds > 1 else []
    rows = []
    for name, run in best.items():
        wanted = f"train.bf16={name == 'bf16'}"
        result = f"ran {run['precision']}; {run['images']} images in {run['epoch_seconds']:.1f}s"
        rows.append((f"(c) train dp, {wanted}", f"{run['images_per_second']:.1f} img/s", result))
        result = f"default data, seed 0; whole training {run['train_seconds']:.0f}s"
        rows.append((f"(c)   validation accuracy, {wanted}", f"{run['val_accuracy']:.4f}", result))
    speedup = best["bf16"]["images_per_second"] / best["fp32"]["images_per_second"]
    result = verdict(speedup, 1.5) if native else "bf16 not native here: both ran fp32"
    rows.append(("(c) train dp, bf16 vs fp32 (images/s)", f"{speedup:.2f}x", result))
    gap = abs(best["bf16"]["val_accuracy"] - best["fp32"]["val_accuracy"]) * 100
    result = f"{'PASS' if gap <= 1 else 'FAIL'} (target <= 1)"
    rows.append(("(c) validation accuracy, |bf16 - fp32|", f"{gap:.2f} points", result))
    return rows + seed_rows


def seed_spread(workspace: Path, seeds: int, seed_0: dict[str, float]) -> list[tuple[str, str, str]]:
    """Validation accuracy of each precision over training seeds 0..seeds-1: how far apart two
    fp32 trainings land is the yardstick for the bf16 - fp32 gap of one seed."""
    accuracy = {name: [value] for name, value in seed_0.items()}
    for seed in range(1, seeds):
        for name in ("fp32", "bf16"):
            write_bf16(workspace, name == "bf16", seed)
            accuracy[name].append(run_stage(workspace, "dp", timeout=1200)["val_accuracy"])
            print(f"(d) seed {seed}, {name}: val accuracy {accuracy[name][-1]:.4f}", flush=True)
    rows = []
    for name, values in accuracy.items():
        figures = ", ".join(f"{v:.4f}" for v in values)
        mean = f"{statistics.mean(values):.4f}"
        rows.append((f"(d) val accuracy, {name}, seeds 0-{seeds - 1}", mean, figures))
    gap = (statistics.mean(accuracy["bf16"]) - statistics.mean(accuracy["fp32"])) * 100
    spread = (max(accuracy["fp32"]) - min(accuracy["fp32"])) * 100
    rows.append(("(d) mean bf16 - mean fp32", f"{gap:+.2f} points", f"fp32 alone spans {spread:.2f} points"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--images-per-class",
        type=int,
        default=100,
        help="synthetic 200x200 JPEGs per class for (c) (default 100: 2,900 images)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=3,
        help="epochs of each training in (c); the fastest after the first counts (default 3)",
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="optimizer steps per timed round in (b) (default 2)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=10,
        help="rounds in (b); each configuration's best round counts (default 10)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="times (c) runs dp, ddp and the original in turn; each keeps its best (default 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a fast, rougher run: 40 images per class, 2 epochs, 5 rounds"
    )
    parser.add_argument("--skip-end-to-end", action="store_true", help="only (a) and (b)")
    parser.add_argument("--precision", action="store_true", help="compare bf16 with fp32 instead (see above)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="--precision: also train seeds 1..N-1 in each precision (d)"
    )
    parser.add_argument("--workdir", type=Path, help="where to put data and workspace (default: a temp dir)")
    parser.add_argument(
        "--ddp-worker", type=Path, help=argparse.SUPPRESS
    )  # internal: one torchrun rank of the DDP step timing
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args.ddp_worker, args.steps, args.repeat)
        return
    if args.quick:
        args.images_per_class, args.epochs, args.repeat = (
            min(args.images_per_class, 40),
            min(args.epochs, 2),
            min(args.repeat, 5),
        )

    n_cores = usable_cores()
    threads = torch.get_num_threads()
    print(
        f"machine: {processor_name()}, {n_cores} usable CPU cores; torch {torch.__version__}, "
        f"{threads} intra-op threads (as training uses)"
    )
    if args.precision:
        load_before, begun = os.getloadavg()[0], time.perf_counter()
        print_table(precision_comparison(args))
        load = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {n_cores} cores"
        print(f"total {time.perf_counter() - begun:.0f}s; load average (1 min, with this benchmark): {load}")
        return
    print(
        f"model {MODEL} at {SIZE} px, {CLASSES} classes, global batch {BATCH}; "
        f"(b) best of {args.repeat} rounds of {args.steps} steps per configuration"
    )
    load_before = os.getloadavg()[0]
    begun = time.perf_counter()

    # (a)
    gflops = matmul_gflops(repeat=10)
    per_image = flops_per_image()
    print(
        f"(a) fp32 matmul {gflops:.1f} GFLOP/s; "
        f"{MODEL} forward+backward {per_image / 1e9:.3f} GFLOP per image",
        flush=True,
    )

    # (b)
    generator = torch.Generator().manual_seed(0)
    pool = max(args.steps * BATCH, 512)
    images = torch.randn(pool, 3, SIZE, SIZE, generator=generator).half()
    labels = torch.randint(0, CLASSES, (pool,), generator=generator)
    configs = [
        LoopConfig("ours, channels_last", channels_last=True, loop_adamw=False, steps=args.steps),
        LoopConfig("ours, contiguous (NCHW)", channels_last=False, loop_adamw=False, steps=args.steps),
        LoopConfig(
            "before: for-loop AdamW, channels_last", channels_last=True, loop_adamw=True, steps=args.steps
        ),
    ]
    for config in configs:  # warm-up: first-call allocations and oneDNN primitive creation
        config.epoch(images, labels, 2, generator)
        config.rates.clear()
        config.waits.clear()
    for round_ in range(args.repeat):
        # The ceiling is re-measured beside every round: on a shared machine both sides of the
        # ratio get the same chances of a quiet moment, and each keeps its best. The order of the
        # configurations rotates, so none always follows the matmul.
        gflops = max(gflops, matmul_gflops(repeat=2))
        for config in configs[round_ % 3 :] + configs[: round_ % 3]:
            config.epoch(images, labels, args.steps, generator)
    ceiling = gflops * 1e9 / per_image
    print(
        f"(a) fp32 matmul, best over (a) and (b): {gflops:.1f} GFLOP/s -> ceiling {ceiling:.0f} images/s",
        flush=True,
    )
    for config in configs:
        rates = ", ".join(f"{r:.0f}" for r in config.rates)
        print(
            f"(b) {config.label:<40} {config.optimizer_name:<18} "
            f"best {config.best:6.1f} images/s (rounds: {rates})",
            flush=True,
        )
    ours, nchw, before = configs
    phases = step_phases(ours, images, labels, steps=5)
    phases_before = step_phases(before, images, labels, steps=5)
    groups, top = profile_ops(ours, images, labels, steps=3)
    step_ms = sum(phases.values())
    print(
        f"(b) one step of '{ours.label}' (best of 5 per phase): "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in phases.items())
        + f" = {step_ms:.0f} ms ({BATCH / step_ms * 1e3:.0f} images/s)"
    )
    print(
        f"(b) optimizer step: {ours.optimizer_name} {phases['optimizer']:.1f} ms, "
        f"{before.optimizer_name} {phases_before['optimizer']:.1f} ms (best of 5)"
    )
    profiled = sum(groups.values())
    conv_rate = per_image * BATCH / (groups["convolution"] / 1e3) / 1e9 if groups["convolution"] else 0.0
    print(
        "(b) profiler, self CPU per step: "
        + ", ".join(f"{k} {v:.0f} ms ({v / profiled:.0%})" for k, v in groups.items())
    )
    print(
        f"(b) convolutions alone run at {conv_rate:.0f} GFLOP/s = {conv_rate / gflops:.0%} "
        "of the matmul rate (counted FLOPs: conv + fc)"
    )
    print("(b) top ops (ms per step): " + ", ".join(f"{name} {ms:.0f}" for name, ms in top), flush=True)
    ddp = ddp_steps(
        args.steps + 1, max(4, args.repeat // 2), processes=2
    )  # as `train ddp` with gpus=2 in (c)
    ddp_rates = ddp["images_per_second"]
    print(
        f"(b) our DDP step, {ddp['world_size']} processes x {ddp['threads_per_rank']} thread(s), images/s: "
        "gradients averaged "
        f"over gloo {ddp_rates['gloo']:.1f}, not at all (no_sync) {ddp_rates['no_sync']:.1f}; "
        f"gloo all-reduce of {ddp['gradient_mb']:.0f} MiB alone {ddp['gloo_allreduce_ms']:.0f} ms",
        flush=True,
    )

    rows = [
        (
            "(a) fp32 matmul rate",
            f"{gflops:.1f} GFLOP/s",
            f"2048x2048 torch.mm, {threads} threads, best of {10 + 2 * args.repeat}",
        ),
        (
            "(a) training FLOPs per image",
            f"{per_image / 1e9:.3f} GFLOP",
            "FlopCounterMode, forward + backward",
        ),
        ("(a) compute ceiling", f"{ceiling:.0f} img/s", "matmul rate / FLOPs per image"),
    ]
    for config in configs:
        fraction = config.best / ceiling
        result = f"{fraction:.0%} of ceiling  " + (
            verdict(fraction, TARGET_CEILING) if config is ours else ""
        )
        if config is nchw:
            result += f"channels_last is {ours.best / nchw.best:.2f}x contiguous"
        if config is before:
            result += f"fused AdamW is {ours.best / before.best:.2f}x for-loop"
        rows.append((f"(b) loop: {config.label}", f"{config.best:.1f} img/s", result))
    rows.append(
        (
            "(b) optimizer step, fused vs for-loop AdamW",
            f"{phases['optimizer']:.1f} ms",
            f"for-loop {phases_before['optimizer']:.1f} ms (best step of 5 each)",
        )
    )
    for mode, label in (("no_sync", "no_sync (compute only)"), ("gloo", "gloo all-reduce")):
        rate = ddp_rates[mode]
        cost = "" if mode == "no_sync" else f"; averaging costs {1 - rate / ddp_rates['no_sync']:.0%}"
        rows.append(
            (
                f"(b) DDP step, {ddp['world_size']} procs, {label}",
                f"{rate:.1f} img/s",
                f"{rate / ours.best:.2f}x the one-process loop{cost}",
            )
        )

    # (c)
    if not args.skip_end_to_end:
        with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
            work = args.workdir or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            if (work / "ws").exists():
                shutil.rmtree(work / "ws")
            workspace, manifest, generated, preprocessed = make_workspace(
                work, args.images_per_class, args.epochs
            )
            train_files = [
                name for shard in manifest["shards"] if shard["split"] == "train" for name in shard["files"]
            ]
            print(
                f"(c) {args.images_per_class * CLASSES} synthetic JPEGs generated in {generated:.1f}s, "
                f"preprocessed in {preprocessed:.1f}s; "
                f"training split {len(train_files)} images",
                flush=True,
            )
            raw = workspace / "data" / "raw"
            best_of: dict[str, dict] = {}
            # The frozen backbone is the original study's mode: only the head learns, so the
            # all-reduce carries 60 KB instead of 43 MiB; it shows what DDP costs without it.
            runs = {
                "dp": ("dp", False),
                "ddp": ("ddp", False),
                "original": None,
                "dp frozen": ("dp", True),
                "ddp frozen": ("ddp", True),
            }
            for _ in range(args.rounds):  # each in turn; each keeps its best round
                for name, stage in runs.items():
                    if stage is None:
                        figures = original_epoch(
                            raw / "asl_alphabet_train" / "asl_alphabet_train",
                            train_files,
                            raw,
                            epochs=max(1, args.epochs - 1),
                        )
                        print(
                            f"(c) original loop: epochs {figures['epochs']} s, "
                            f"best {figures['images_per_second']:.1f} img/s, "
                            f"data wait {figures['data_wait_fraction']:.0%}",
                            flush=True,
                        )
                    else:
                        strategy, frozen = stage
                        write_params(workspace, args.images_per_class, args.epochs, freeze_backbone=frozen)
                        figures = run_stage(workspace, strategy, timeout=900)
                        print(
                            f"(c) train {name}: epochs {figures['epochs']} s, "
                            f"best after the first {figures['images_per_second']:.1f} img/s, "
                            f"command wall {figures['wall_seconds']:.0f}s",
                            flush=True,
                        )
                    if (
                        name not in best_of
                        or figures["images_per_second"] > best_of[name]["images_per_second"]
                    ):
                        best_of[name] = figures
            dp_run, ddp_run, original = best_of["dp"], best_of["ddp"], best_of["original"]
            dp_frozen, ddp_frozen = best_of["dp frozen"], best_of["ddp frozen"]
        for label, figures in (
            ("(c) original: ImageFolder+DataLoader, 1 proc", original),
            ("(c) ours: train dp, 1 process", dp_run),
            (f"(c) ours: train ddp, {ddp_run['world_size']} procs (gloo)", ddp_run),
            ("(c) frozen backbone: train dp, 1 process", dp_frozen),
            (f"(c) frozen backbone: train ddp, {ddp_frozen['world_size']} procs", ddp_frozen),
        ):
            result = (
                f"{figures['images']} images in {figures['epoch_seconds']:.1f}s, "
                f"data wait {figures['data_wait_fraction']:.0%}"
            )
            rows.append((label, f"{figures['images_per_second']:.1f} img/s", result))
        speedup = dp_run["images_per_second"] / original["images_per_second"]
        ddp_ratio = ddp_run["images_per_second"] / dp_run["images_per_second"]
        rows.append(
            (
                "(c) ours dp vs original (images/s)",
                f"{speedup:.2f}x",
                f"epoch {original['epoch_seconds']:.1f}s -> {dp_run['epoch_seconds']:.1f}s",
            )
        )
        rows.append(
            (
                f"(c) ddp ({ddp_run['world_size']} procs) vs dp (1 proc) (images/s)",
                f"{ddp_ratio:.2f}x",
                verdict(ddp_ratio, TARGET_DDP),
            )
        )
        frozen_ratio = ddp_frozen["images_per_second"] / dp_frozen["images_per_second"]
        rows.append(
            (
                "(c) frozen backbone: ddp vs dp (images/s)",
                f"{frozen_ratio:.2f}x",
                "context: the all-reduce is 60 KB, not 43 MiB",
            )
        )

    print_table(rows)
    load_after = os.getloadavg()[0]
    # This benchmark itself keeps up to 2 processes busy, so only a load well above the core count
    # says that something else competed.
    busy = (
        " (well above the core count: other processes competed, figures are low)"
        if max(load_before, load_after) > n_cores + 1
        else ""
    )
    print(
        f"total {time.perf_counter() - begun:.0f}s; load average (1 min, includes this benchmark): "
        f"{load_before:.2f} before, "
        f"{load_after:.2f} after, on {n_cores} cores{busy}"
    )


if __name__ == "__main__":
    main()
