"""One training run, from shards to a logged model: what every rank executes.

`fit` receives a ready strategy and never asks which one it is; only the main process logs to
MLflow and writes files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import resource
from dataclasses import asdict
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from pipeline.augment import BatchAugment
from pipeline.checkpoint import checkpoint_path, fingerprint, load_checkpoint, save_checkpoint
from pipeline.config import Params, to_flat_dict
from pipeline.errors import UserError
from pipeline.feed import TrainingData, open_training_data
from pipeline.fileio import atomic_write_bytes, atomic_write_json
from pipeline.lineage import log_training_data
from pipeline.loop import EpochStats, NonFiniteLoss, StepSettings, evaluate, train_one_epoch
from pipeline.paths import Paths
from pipeline.serving.networks import build_model
from pipeline.serving.precision import precision
from pipeline.shards import read_manifest
from pipeline.strategy import Strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def step_settings(params: Params, strategy: Strategy) -> StepSettings:
    """bf16 where asked for and native on the device (CUDA, or a CPU with AMX or AVX512-BF16), else fp32."""
    bf16 = precision(strategy.device, params.train.bf16) == "bf16"
    return StepSettings(device=strategy.device, channels_last=params.train.channels_last, bf16=bf16)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrainingState:
    """Model, optimizer and schedule of one training, plus how far it got."""

    def __init__(self, params: Params, strategy: Strategy, num_classes: int, steps_per_epoch: int):
        model = build_model(
            params.model.name,
            num_classes,
            pretrained=params.model.pretrained,
            freeze_backbone=params.model.freeze_backbone,
        )
        if params.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        wrapped = strategy.wrap(model, precision(strategy.device, params.train.bf16))
        self.bare = strategy.unwrap(wrapped)  # what checkpoints and the exported model hold
        self.eval_model = strategy.eval_model(wrapped)
        # For a Module, torch.compile returns an OptimizedModule (a Module); torch annotates a callable.
        self.model = cast(nn.Module, torch.compile(wrapped)) if params.train.compile else wrapped
        trainable = [p for p in self.bare.parameters() if p.requires_grad]
        # The fused kernel updates every tensor in one pass; on CPU the default is a for-loop.
        self.optimizer = torch.optim.AdamW(
            trainable, lr=params.train.lr, weight_decay=params.train.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer,
            max_lr=params.train.lr,
            total_steps=max(1, steps_per_epoch * params.train.epochs),
            pct_start=0.15,
        )
        self.strategy = strategy
        self.next_epoch = 0
        self.history: list[dict] = []
        self.run_id: str | None = None
        self.resumed_from: int | None = None

    def state_dict(self, fingerprint_: str) -> dict:
        return {
            "fingerprint": fingerprint_,
            "model": self.bare.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "next_epoch": self.next_epoch,
            "history": self.history,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.bare.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.next_epoch, self.history, self.run_id = (
            state["next_epoch"],
            list(state["history"]),
            state["run_id"],
        )
        self.resumed_from = self.next_epoch


def should_resume(params: Params) -> bool:
    # torchrun restarts the whole worker group after a failure; the restarted ranks must pick up
    # from the last checkpoint whether or not the user asked for a resume.
    return params.train.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def restore(state: TrainingState, params: Params, paths: Paths, fingerprint_: str) -> None:
    """Load the last checkpoint on the main process and share it, or its error, with every rank.

    A fresh start removes any earlier checkpoint first: a worker restarted by torchrun before this
    training wrote its own checkpoint must start over, not resume someone else's."""
    strategy = state.strategy
    if not should_resume(params):
        if strategy.is_main:
            checkpoint_path(paths.root, strategy.name).unlink(missing_ok=True)
        return
    saved, error = None, None
    if strategy.is_main:
        try:
            saved = load_checkpoint(checkpoint_path(paths.root, strategy.name), fingerprint_)
        except UserError as err:
            error = str(err)
    # Every rank must raise together: one rank failing alone would leave the others in a collective.
    saved, error = strategy.broadcast_object((saved, error))
    if error:
        raise UserError(error)
    if saved is not None:
        state.load_state_dict(saved)


def epoch_record(epoch: int, stats: EpochStats, val_loss: float, val_accuracy: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": stats.loss,
        "train_accuracy": stats.accuracy,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "epoch_seconds": stats.seconds,
        "images_per_second": stats.images / stats.seconds if stats.seconds > 0 else 0.0,
        "data_wait_fraction": stats.data_wait_seconds / stats.seconds if stats.seconds > 0 else 0.0,
        "images": stats.images,
    }


@contextlib.contextmanager
def main_process_run(params: Params, strategy: Strategy, state: TrainingState):
    """The MLflow run of this training (reopened on resume); other ranks get no run at all."""
    if not strategy.is_main:
        yield None
        return
    from pipeline.tracking import tracked_run

    tags = {
        "device": strategy.device_label,
        "world_size": str(strategy.world_size),
        "gpus": str(params.gpus),
        "allreduce": strategy.allreduce,
        "precision": precision(strategy.device, params.train.bf16),  # what ran: train.bf16 is only a wish
    }
    if strategy.device.type == "cpu":
        tags["cpu_only"] = "true"  # a process stands in for each GPU: not a GPU figure
    run_name = f"train-{strategy.name}-{params.gpus}gpu" + (
        f"-{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else ""
    )
    flat = {
        k: v
        for k, v in to_flat_dict(params).items()
        if k.split(".")[0] in ("seed", "gpus", "data", "model", "train", "distributed")
    }
    with tracked_run(
        params.mlflow.experiment,
        "train",
        strategy=strategy.name,
        run_id=state.run_id,
        run_name=run_name,
        params=None,
        tags=tags,
        system_metrics=params.mlflow.system_metrics,
    ) as run:
        if state.run_id is None:
            import mlflow

            mlflow.log_params({k: str(v) for k, v in flat.items()})
        state.run_id = run.info.run_id
        yield run


def fit(params: Params, paths: Paths, strategy: Strategy) -> dict | None:
    """Train to `train.epochs`, checkpointing every epoch; returns the final figures on the main process."""
    seed_everything(params.seed)
    manifest = read_manifest(paths.shards)
    settings = step_settings(params, strategy)
    data = open_training_data(params, paths.shards, manifest, strategy, settings)
    state = TrainingState(params, strategy, len(manifest["classes"]), data.steps_per_epoch)
    fingerprint_ = fingerprint(params, manifest)
    restore(state, params, paths, fingerprint_)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.train.label_smoothing)
    augment = BatchAugment(
        params.train.augment,
        params.seed,
        manifest["splits"]["train"]["count"],
        manifest["mean"],
        manifest["std"],
    )
    with main_process_run(params, strategy, state):
        if strategy.is_main:
            log_training_data(manifest, paths.manifest)
        for epoch in range(state.next_epoch, params.train.epochs):
            try:
                # A new order every epoch, a function of the seed and the epoch: a resumed run repeats it.
                batches = data.train_batches(epoch)
                stats = train_one_epoch(
                    state.model, state.optimizer, state.scheduler, loss_fn, batches, strategy, settings,
                    augment=augment.for_epoch(epoch, data.step_indices),
                )  # fmt: skip
            except NonFiniteLoss as err:
                raise diverged(params, "training", f"by step {err.step} of epoch {epoch + 1}") from None
            report_startup(data, strategy)
            strategy.share_main_buffers(state.bare)  # every rank evaluates the model that is exported
            val_loss, val_accuracy = evaluate(state.eval_model, data.val_batches(), strategy, settings)
            if not math.isfinite(val_loss):
                raise diverged(params, "validation", f"after epoch {epoch + 1}")
            record = epoch_record(epoch, stats, val_loss, val_accuracy)
            state.history.append(record)
            state.next_epoch = epoch + 1
            if strategy.is_main:
                log_epoch(record, params)
                save_checkpoint(checkpoint_path(paths.root, strategy.name), state.state_dict(fingerprint_))
        return finish(params, paths, strategy, state, manifest) if strategy.is_main else None


def diverged(params: Params, loss: str, when: str) -> UserError:
    """The error that ends a training whose numbers blew up: no model is written or logged."""
    train = params.train
    return UserError(
        f"training diverged: the {loss} loss became NaN or infinite {when}: lower train.lr "
        f"(now {train.lr:g}) or train.weight_decay (now {train.weight_decay:g}), the usual causes"
    )


def report_startup(data: TrainingData, strategy: Strategy) -> None:
    """Once per process: seconds from its start to its first batch (imports, rendezvous, shard
    checks, model), printed and logged as `startup_seconds`; where the data is held, as a tag."""
    if data.first_batch_at is None or data.startup_reported or not strategy.is_main:
        return
    import mlflow
    import psutil

    data.startup_reported = True
    seconds = data.first_batch_at - psutil.Process().create_time()
    mlflow.log_metric("startup_seconds", seconds)
    mlflow.set_tag("data_placement", data.mode)
    print(f"train: first batch {seconds:.1f}s after the process started ({data.mode} data)", flush=True)


def log_epoch(record: dict, params: Params) -> None:
    import mlflow

    epoch = record["epoch"]
    mlflow.log_metrics({k: v for k, v in record.items() if k not in ("epoch", "images")}, step=epoch)
    print(
        f"epoch {epoch + 1}/{params.train.epochs}: "
        f"loss {record['train_loss']:.3f} acc {record['train_accuracy']:.3f} | "
        f"val loss {record['val_loss']:.3f} acc {record['val_accuracy']:.3f} | "
        f"{record['epoch_seconds']:.1f}s {record['images_per_second']:.0f} img/s, "
        f"data wait {record['data_wait_fraction']:.1%}",
        flush=True,
    )


def model_config(params: Params, manifest: dict) -> dict:
    """What the exported model needs to prepare an image exactly as training did."""
    return {
        "model": asdict(params.model),
        "classes": manifest["classes"],
        "image_size": manifest["image_size"],
        "mean": manifest["mean"],
        "std": manifest["std"],
        "max_image_pixels": params.serve.max_image_pixels,
    }


def summary(params: Params, strategy: Strategy, state: TrainingState) -> dict:
    seconds = sum(r["epoch_seconds"] for r in state.history)
    images = sum(r["images"] for r in state.history)
    last = state.history[-1]
    return {
        "strategy": strategy.name,
        "world_size": strategy.world_size,
        "gpus": params.gpus,
        "device": strategy.device_label,
        "precision": precision(strategy.device, params.train.bf16),
        "epochs": len(state.history),
        "train_seconds": seconds,
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "data_wait_fraction": sum(r["data_wait_fraction"] * r["epoch_seconds"] for r in state.history)
        / max(seconds, 1e-9),
        "peak_memory_mb": peak_memory_bytes(strategy.device) / 2**20,
        "train_accuracy": last["train_accuracy"],
        "val_accuracy": last["val_accuracy"],
        "val_loss": last["val_loss"],
        "resumed_from_epoch": state.resumed_from if state.resumed_from is not None else -1,
    }


# Already logged every epoch: the last epoch's value is the run's own, so not logged again.
_PER_EPOCH_ONLY = ("train_accuracy", "val_accuracy", "val_loss")


def log_summary(figures: dict, last_epoch: int) -> None:
    """The whole-run figures. `images_per_second` and `data_wait_fraction` also have per-epoch
    series: logged at the last epoch's step, the whole-run value becomes the one the MLflow UI
    shows, without a stray point at step 0."""
    import mlflow

    numbers = {
        k: float(v)
        for k, v in figures.items()
        if isinstance(v, (int, float)) and k not in (*_PER_EPOCH_ONLY, "gpus")
    }
    mlflow.log_metrics(numbers, step=last_epoch)


def write_curves(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(path, buffer.getvalue().encode())


def finish(params: Params, paths: Paths, strategy: Strategy, state: TrainingState, manifest: dict) -> dict:
    """Write the model folder and metrics, and log them and the servable model to the run."""
    import mlflow
    from safetensors.torch import save

    from pipeline.serving.pyfunc import log_pyfunc_model

    model_dir = paths.model_dir(strategy.name)
    model_dir.mkdir(parents=True, exist_ok=True)
    # As trained: fp32 weights and buffers, BatchNorm's integer step counter stays an integer.
    weights = {k: v.detach().contiguous().cpu() for k, v in state.bare.state_dict().items()}
    atomic_write_bytes(model_dir / "model.safetensors", save(weights))
    atomic_write_json(model_dir / "model_config.json", model_config(params, manifest))
    figures = summary(params, strategy, state)
    atomic_write_json(paths.train_metrics(strategy.name), figures)
    write_curves(paths.train_curve(strategy.name), state.history)

    log_summary(figures, last_epoch=state.history[-1]["epoch"])
    mlflow.log_artifact(str(paths.train_curve(strategy.name)))
    info = log_pyfunc_model(model_dir, name="model")
    run = mlflow.active_run()
    assert run is not None  # the training's run, opened by tracked_run
    atomic_write_json(
        model_dir / "run.json",
        {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "model_uri": info.model_uri},
    )
    # Finished: nothing left to resume, and a later `train.resume: true` must not pick this up.
    checkpoint_path(paths.root, strategy.name).unlink(missing_ok=True)
    print(
        f"train {strategy.name}: {figures['train_seconds']:.1f}s, {figures['images_per_second']:.0f} img/s, "
        f"val accuracy {figures['val_accuracy']:.3f} (run {run.info.run_id})"
    )
    return figures
