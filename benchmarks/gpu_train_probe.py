r"""Training throughput of the pipeline's own loop under dp or ddp, without MLflow: the driver that
benchmarks/gpu_check.sh runs on a lent GPU machine (and, tiny, on CPU to test its logic).

    python benchmarks/gpu_train_probe.py --prepare DIR [--images-per-class N] [--size S]
        make DIR/shards: synthetic JPEGs + build_shards (falls back to random tensors, recorded in
        DIR/data.json, when PIL/yaml/tqdm are missing on the machine)
    python benchmarks/gpu_train_probe.py --strategy dp --gpus N --data DIR --json OUT.json
        [--data-on-device false] [--memory-budget-gb G]   (data kept on the host / streamed, forced)
    torchrun --standalone --nproc-per-node=N benchmarks/gpu_train_probe.py --strategy ddp --data DIR \
        --json OUT.json
    python benchmarks/gpu_train_probe.py --table OUT1.json OUT2.json ...
    options: --batch-size B (global), --min-steps N (an epoch passes over the training split until it
    has N steps: large batches on many GPUs), --sync-debug (epochs after the first under
    torch.cuda.set_sync_debug_mode("error"): any host-device sync in a step fails the run)

The step is the real one: `pipeline.loop.train_one_epoch` and `evaluate` with `pipeline.strategy`
(DataParallel over N devices, or DDP over NCCL/gloo under torchrun), and, where pipeline.config can
be imported (it needs PyYAML), the optimizer, schedule and StepSettings of `pipeline.trainer`
(`TrainingState`, `step_settings`) and the data path of `pipeline.feed` (`open_training_data`): on
CUDA that is bf16 autocast, channels_last and the whole split on the GPU unless told otherwise.
Without PyYAML the same pieces are built here the same way. It records the dtype the first
convolution computed in on every device (DataParallel replicas included) and checks that the ranks
end with identical weights and buffers. Needs only torch, torchvision (resnet18) and numpy.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch
from torch import nn

CLASSES = 29


# --- data -------------------------------------------------------------------------------------------


def prepare(
    root: Path, images_per_class: int, size: int, seed: int = 0, shard_size: int | None = None
) -> dict:
    """Synthetic 200x200 JPEGs preprocessed into shards under root; random tensors if that cannot run here."""
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        from pipeline.config import params_from_dict
        from pipeline.paths import Paths
        from pipeline.preprocess import shard_workspace
        from pipeline.synthetic import generate_synthetic_dataset

        small = images_per_class < 50  # validation blocks of 10 frames (+1 gap) need more frames than that
        data = {
            "synthetic": {"images_per_class": images_per_class},
            "image_size": size,
            "block_size": 4 if small else 10,
            "block_gap": 0 if small else 1,
            "shard_size": shard_size,
        }
        params = params_from_dict({"seed": seed, "data": data})
        paths = Paths(root)
        generate_synthetic_dataset(
            paths.raw, images_per_class=images_per_class, frames_per_run=10, seed=seed, size=200
        )
        manifest = shard_workspace(params, paths)
        info = {
            "kind": "shards",
            "shards": str(paths.shards),
            "train": manifest["splits"]["train"]["count"],
            "val": manifest["splits"]["val"]["count"],
            "size": size,
        }
    except (
        ImportError
    ) as err:  # PIL, PyYAML or tqdm missing on this machine: throughput does not depend on pixels
        count = images_per_class * CLASSES
        info = {
            "kind": "random",
            "why": f"{type(err).__name__}: {err}",
            "train": int(count * 0.8),
            "val": count - int(count * 0.8),
            "size": size,
            "seed": seed,
        }
    info["seconds"] = round(time.perf_counter() - started, 1)
    (root / "data.json").write_text(json.dumps(info, indent=2))
    return info


def load_data(root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    info = json.loads((root / "data.json").read_text())
    if info["kind"] == "shards":
        from pipeline.shards import load_split

        shards = Path(info["shards"])
        return (*load_split(shards, "train"), *load_split(shards, "val"), "synthetic JPEGs -> shards")
    generator = torch.Generator().manual_seed(info["seed"])
    size, train, val = info["size"], info["train"], info["val"]
    images = torch.randn(train + val, 3, size, size, generator=generator).half()
    labels = torch.randint(0, CLASSES, (train + val,), generator=generator)
    return images[:train], labels[:train], images[train:], labels[train:], f"random tensors ({info['why']})"


# --- the training pieces ------------------------------------------------------------------------------


def build(strategy, args, steps_per_epoch: int):
    """Model, optimizer, schedule and StepSettings as pipeline.trainer builds them, and the params that
    place the data."""
    values = {
        "gpus": max(1, args.gpus),
        "model": {"name": args.model},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "channels_last": True,
            "bf16": True,
            "data_on_device": args.data_on_device == "true",
        },
    }
    if args.memory_budget_gb is not None:
        values["train"]["memory_budget_gb"] = args.memory_budget_gb
    if args.shuffle_buffer is not None:
        values["train"]["shuffle_buffer"] = args.shuffle_buffer
    try:
        from pipeline.config import params_from_dict
        from pipeline.trainer import TrainingState, step_settings
    except ImportError as err:
        print(f"probe: pipeline.trainer not importable ({err}); building the same pieces here", flush=True)
        return _build_here(strategy, args, steps_per_epoch), "replica (no PyYAML)"
    params = params_from_dict(values)
    torch.manual_seed(0)
    state = TrainingState(params, strategy, CLASSES, steps_per_epoch)
    return SimpleNamespace(
        model=state.model,
        bare=state.bare,
        eval_model=state.eval_model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        settings=step_settings(params, strategy),
        params=params,
    ), "pipeline.trainer"


def _build_here(strategy, args, steps_per_epoch: int) -> SimpleNamespace:
    import torchvision

    from pipeline.loop import StepSettings

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, num_classes=CLASSES).to(
        memory_format=torch.channels_last
    )
    cuda = strategy.device.type == "cuda"
    wrapped = strategy.wrap(model, "bf16" if cuda else "fp32")
    bare = strategy.unwrap(wrapped)
    fused = strategy.device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(bare.parameters(), lr=0.003, weight_decay=0.05, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.003, total_steps=max(1, steps_per_epoch * args.epochs), pct_start=0.15
    )
    return SimpleNamespace(
        model=wrapped,
        bare=bare,
        eval_model=strategy.eval_model(wrapped),
        optimizer=optimizer,
        scheduler=scheduler,
        settings=StepSettings(device=strategy.device, channels_last=True, bf16=cuda),
        params=None,
    )


class TensorData:
    """The probe's random tensors (no PyYAML or PIL here), fed like pipeline.feed feeds shards: the
    pipeline's epoch order and rank share, on the GPU when asked and it fits, else prefetched."""

    def __init__(self, args, strategy, settings):
        from pipeline.feed import tensor_batches

        self.tensor_batches, self.args, self.strategy, self.settings = (
            tensor_batches,
            args,
            strategy,
            settings,
        )
        self.train_x, self.train_y, self.val_x, self.val_y, self.kind = load_data(args.data)
        cuda = settings.device.type == "cuda"
        fits = (
            cuda
            and self.train_x.nbytes + self.val_x.nbytes < 0.5 * torch.cuda.mem_get_info(settings.device)[0]
        )
        self.mode = "device" if fits and args.data_on_device == "true" else "mapped"
        if self.mode == "device":
            self.train_x, self.train_y = self.train_x.to(settings.device), self.train_y.to(settings.device)
            self.val_x, self.val_y = self.val_x.to(settings.device), self.val_y.to(settings.device)

    def train_batches(self, epoch: int):
        from pipeline.batches import epoch_order, rank_batches

        order = epoch_order([len(self.train_y)], 4096, 0, epoch).order
        mine = rank_batches(order, self.args.batch_size, self.strategy.world_size, self.strategy.rank)
        return self.tensor_batches(self.train_x, self.train_y, list(mine), self.settings)

    def val_batches(self):
        import numpy as np

        mine = np.asarray(self.strategy.eval_indices(len(self.val_y)), dtype=np.int64)
        return self.tensor_batches(
            self.val_x, self.val_y, [mine[i : i + 256] for i in range(0, len(mine), 256)], self.settings
        )


def open_data(args, strategy, parts):
    """The shards through pipeline.feed (device, memory-mapped or streamed, as the params say), or
    the random tensors; returns (data, what the data is)."""
    info = json.loads((args.data / "data.json").read_text())
    if info["kind"] == "shards" and parts.params is not None:
        from pipeline.feed import open_training_data
        from pipeline.shards import read_manifest

        shards = Path(info["shards"])
        return open_training_data(
            parts.params, shards, read_manifest(shards), strategy, parts.settings
        ), "synthetic JPEGs -> shards"
    data = TensorData(args, strategy, parts.settings)
    return data, data.kind


def peak_memory_mb(strategy, dp_devices: int) -> float:
    if strategy.device.type == "cuda":
        devices = range(dp_devices) if strategy.name == "dp" else [strategy.device.index]
        return max(torch.cuda.max_memory_allocated(d) for d in devices) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def weights_digest(module: nn.Module) -> str:
    """Hash of the parameters and buffers. The buffers agree too: before evaluating, every rank takes
    rank 0's batch-norm statistics (`share_main_buffers`, as pipeline.trainer does)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().double().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def record_compute_dtypes(bare: nn.Module) -> set[tuple[str, str]]:
    """(device, dtype) of every output of the model's first convolution, in whichever thread ran it:
    DataParallel's replicas share the module's hooks."""
    seen: set[tuple[str, str]] = set()
    first_conv = next(m for m in bare.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(
        lambda module, inputs, output: seen.add(
            (str(output.device), str(output.dtype).removeprefix("torch."))
        )
    )
    return seen


def passes_per_epoch(steps_per_pass: int, min_steps: int) -> int:
    """Passes over the training split that make one probe epoch of at least `min_steps` steps."""
    return max(1, -(-min_steps // max(steps_per_pass, 1)))  # ceiling


def card(strategy) -> str:
    if strategy.device.type != "cuda":
        return "cpu"
    return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(strategy.device)}"


def sync_debug(enabled: bool):
    """torch.cuda.set_sync_debug_mode("error") while a block runs, when enabled on CUDA."""
    import contextlib

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return mode() if enabled and torch.cuda.is_available() else contextlib.nullcontext()


def run(args) -> None:
    from pipeline.loop import evaluate, train_one_epoch
    from pipeline.strategy import DistributedStrategy, inside_torchrun, make_strategy

    if args.strategy == "ddp" and not inside_torchrun():
        raise SystemExit(
            "probe: --strategy ddp runs under torchrun (torchrun --standalone --nproc-per-node=N ...)"
        )
    strategy = DistributedStrategy() if args.strategy == "ddp" else make_strategy("dp", args.gpus)
    try:
        info = json.loads((args.data / "data.json").read_text())
        strategy.per_process_batch(args.batch_size)
        passes = passes_per_epoch(info["train"] // args.batch_size, args.min_steps)
        steps = info["train"] // args.batch_size * passes
        if steps < 1:
            raise SystemExit(
                f"probe: {info['train']} training images are fewer than one batch of {args.batch_size}"
            )
        parts, built_by = build(strategy, args, steps)
        if (
            strategy.device.type == "cuda"
        ):  # only the devices this process uses: touching others would create contexts there
            for d in range(args.gpus) if args.strategy == "dp" else [strategy.device.index]:
                torch.cuda.reset_peak_memory_stats(d)
        data, data_kind = open_data(args, strategy, parts)
        loss_fn = nn.CrossEntropyLoss()
        compute_dtypes = record_compute_dtypes(parts.bare)
        epochs = []
        for epoch in range(args.epochs):
            # --min-steps: one probe epoch may be several passes over the split, each in its own order.
            batches = itertools.chain.from_iterable(
                [data.train_batches(epoch * passes + i) for i in range(passes)]
            )
            # The first epoch warms up (allocations, cuDNN plans); a sync in any later step is a defect.
            with sync_debug(args.sync_debug and epoch > 0):
                stats = train_one_epoch(
                    parts.model, parts.optimizer, parts.scheduler, loss_fn, batches, strategy, parts.settings
                )
            epochs.append(stats)
            if strategy.is_main:
                rate = f"{stats.seconds:.2f}s {stats.images / stats.seconds:.0f} img/s loss {stats.loss:.3f}"
                print(f"probe {args.strategy}: epoch {epoch + 1}/{args.epochs} {rate}", flush=True)
        strategy.share_main_buffers(parts.bare)  # as pipeline.trainer does before every evaluation
        val_loss, val_accuracy = evaluate(parts.eval_model, data.val_batches(), strategy, parts.settings)
        # Steady state: the epochs after the first (which pays for cuDNN autotuning and allocations).
        steady = epochs[1:] or epochs
        seconds = sum(s.seconds for s in steady)
        images = sum(s.images for s in steady)
        peak = torch.tensor([peak_memory_mb(strategy, getattr(strategy, "gpus", 0))], dtype=torch.float64)
        # all_gather_object fills lists of any objects: one per rank
        digests: list[Any] = [weights_digest(parts.bare)]
        dtypes_per_rank: list[Any] = [sorted(compute_dtypes)]
        if strategy.world_size > 1:
            import torch.distributed as dist

            peak = peak.to(strategy.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            digests = [None] * strategy.world_size
            dist.all_gather_object(digests, weights_digest(parts.bare))
            dtypes_per_rank = [None] * strategy.world_size
            dist.all_gather_object(dtypes_per_rank, sorted(compute_dtypes))
        if strategy.is_main:
            cuda = strategy.device.type == "cuda"
            gpus = (
                (strategy.world_size if args.strategy == "ddp" else max(getattr(strategy, "gpus", 0), 1))
                if cuda
                else 0
            )
            result = {
                "strategy": args.strategy,
                "gpus": gpus,
                "processes": strategy.world_size,
                "device": strategy.device_label,
                "card": card(strategy),
                # ddp: how gradients were averaged (nccl, or gloo on CPU), as the run's allreduce tag says
                "backend": (
                    strategy.allreduce
                    if args.strategy == "ddp"
                    else "DataParallel"
                    if getattr(strategy, "gpus", 0) > 1
                    else "single device"
                ),
                "model": args.model,
                "image_size": info["size"],
                "global_batch": args.batch_size,
                "per_gpu_batch": args.batch_size // max(1, gpus if cuda else strategy.world_size),
                "steps_per_epoch": steps,
                "sync_debug": bool(args.sync_debug and strategy.device.type == "cuda"),
                "data": data_kind,
                "data_on_device": data.mode == "device",
                "data_placement": data.mode,
                "built_by": built_by,
                "bf16": parts.settings.bf16,
                # (device, dtype) of the first convolution's outputs, over every replica or rank
                "compute_dtypes": sorted({tuple(pair) for rank in dtypes_per_rank for pair in rank}),
                "channels_last": parts.settings.channels_last,
                "epochs": [round(s.seconds, 3) for s in epochs],
                "images_per_second": images / seconds if seconds > 0 else 0.0,
                "data_wait_fraction": sum(s.data_wait_seconds for s in steady) / seconds
                if seconds > 0
                else 0.0,
                "peak_memory_mb": float(peak.item()),
                "train_loss": epochs[-1].loss,
                "val_accuracy": val_accuracy,
                "val_loss": val_loss,
                "ranks_agree": len(set(digests)) == 1,
            }
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(result, indent=2))
            print("probe result: " + json.dumps(result), flush=True)
        if args.save_weights:  # every rank: the tests compare them
            args.save_weights.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in parts.bare.state_dict().items()}
            parameters = sorted(name for name, _ in parts.bare.named_parameters())
            torch.save(
                {
                    "state": state,
                    "parameters": parameters,
                    "world_size": strategy.world_size,
                    "rank": strategy.rank,
                },
                args.save_weights / f"rank{strategy.rank}.pt",
            )
    finally:
        strategy.close()


def table(paths: list[Path]) -> str:
    rows = []
    for path in paths:
        try:
            rows.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            rows.append({"strategy": path.stem, "error": f"no result ({type(err).__name__})"})
    cards = sorted({r["card"] for r in rows if "card" in r})
    header = (
        f"{'strategy':<8} {'GPUs':>4} {'procs':>5} {'backend':<13} {'batch':>6} {'per GPU':>7} {'steps':>5} "
        f"{'images/s':>10} {'data wait':>9} {'peak mem MiB':>12} {'ranks agree':>11} {'compute':<9}  "
        f"{'epochs (s)':<24} model / data"
    )
    lines = [f"card(s): {', '.join(cards) or 'unknown'}", header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['strategy']:<8} {r['error']}")
            continue
        dtypes = ",".join(sorted({dtype for _, dtype in r.get("compute_dtypes", [])})) or "?"
        per_gpu, steps = r.get("per_gpu_batch", "?"), r.get("steps_per_epoch", "?")
        lines.append(
            f"{r['strategy']:<8} {r['gpus']:>4} {r['processes']:>5} {r['backend']:<13} "
            f"{r['global_batch']:>6} {per_gpu:>7} {steps:>5} {r['images_per_second']:>10,.0f} "
            f"{r['data_wait_fraction']:>9.1%} {r['peak_memory_mb']:>12,.0f} {r['ranks_agree']!s:>11} "
            f"{dtypes:<9}  {r['epochs']!s:<24} "
            f"{r['model']} {r['image_size']}px, channels_last={r['channels_last']} "
            f"data={r.get('data_placement', r['data_on_device'])} sync_debug={r.get('sync_debug', False)}, "
            f"{r['data']}"
        )
    lines.append(
        "DataParallel rows: replicas compute in the run's precision (compute column) but lose channels_last "
        "(replicate() broadcasts flattened, contiguous weights), a known DataParallel cost."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", type=Path, help="make the data under this folder and exit")
    parser.add_argument("--images-per-class", type=int, default=140)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--strategy", choices=("dp", "ddp"))
    parser.add_argument(
        "--gpus", type=int, default=1, help="dp: devices for DataParallel (ignored without CUDA)"
    )
    parser.add_argument("--data", type=Path, help="a folder made by --prepare")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, as train.batch_size")
    parser.add_argument(
        "--min-steps",
        type=int,
        default=1,
        help="repeat the training split until an epoch has this many steps",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="epochs after the first under set_sync_debug_mode('error') (CUDA)",
    )
    parser.add_argument(
        "--data-on-device",
        choices=("true", "false"),
        default="true",
        help="as train.data_on_device: false keeps the data on the host",
    )
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        help="as train.memory_budget_gb: below the splits' size they are streamed",
    )
    parser.add_argument("--shuffle-buffer", type=int, help="as train.shuffle_buffer")
    parser.add_argument("--shard-size", type=int, help="--prepare: as data.shard_size (default: automatic)")
    parser.add_argument("--json", type=Path, help="write the result here (main process)")
    parser.add_argument(
        "--save-weights", type=Path, help="every rank saves its final weights here as rank<r>.pt"
    )
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print one table of these result files and exit"
    )
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
    elif args.prepare:
        prepared = prepare(args.prepare, args.images_per_class, args.size, shard_size=args.shard_size)
        print("probe data: " + json.dumps(prepared), flush=True)
    elif args.strategy and args.data:
        run(args)
    else:
        parser.error("give --prepare DIR, --table FILES, or --strategy with --data")


if __name__ == "__main__":
    main()
