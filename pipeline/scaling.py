"""`python -m pipeline scaling`: training time against the number of GPUs, for dp and ddp.

Every count in `scaling.gpu_counts` is a real `python -m pipeline train` on one fixed sample, in its
own workspace under `reports/scaling/work/`; one parent MLflow run holds the figure and the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.config import Params, to_flat_dict, to_yaml_dict
from pipeline.devices import device_label
from pipeline.errors import UserError
from pipeline.paths import Paths
from pipeline.preprocess import build_shards

COLUMNS = [
    "strategy",
    "gpus",
    "world_size",
    "device",
    "train_seconds",
    "images_per_second",
    "speedup",
    "efficiency",
    "val_accuracy",
    "run_id",
]


def study_params(params: Params, strategy_gpus: int) -> Params:
    """The pipeline's params with the study's fixed sample, epochs and this GPU count."""
    study = params.scaling
    data = dataclasses.replace(params.data, max_images=study.max_images, image_size=study.image_size)
    train = dataclasses.replace(params.train, epochs=study.epochs, resume=False)
    return dataclasses.replace(params, gpus=strategy_gpus, data=data, train=train)


def train_configuration(params: Params, strategy: str, gpus: int, work: Path) -> dict:
    """Run one real training in the study's workspace; returns its figures and run id."""
    from pipeline.tracking import tracking_uri

    run_params = study_params(params, gpus)
    params_file = work / f"params-{strategy}-{gpus}.yaml"
    params_file.write_text(yaml.safe_dump(to_yaml_dict(run_params), sort_keys=False))
    # The child runs must land in this store whatever directory they run in.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    command = [
        sys.executable,
        "-m",
        "pipeline",
        "train",
        strategy,
        "--params",
        str(params_file),
        "--workspace",
        str(work),
    ]
    result = subprocess.run(command, cwd=work, env=env)
    if result.returncode != 0:
        raise UserError(
            f"scaling: training {strategy} on {gpus} GPU(s) failed (exit {result.returncode}); "
            "its output is above"
        )
    paths = Paths(work)
    figures = json.loads(paths.train_metrics(strategy).read_text())
    figures["run_id"] = json.loads((paths.model_dir(strategy) / "run.json").read_text())["run_id"]
    return figures


def add_efficiency(rows: list[dict]) -> list[dict]:
    """Speed-up over the same strategy's smallest GPU count, and that speed-up per added GPU."""
    for strategy in {r["strategy"] for r in rows}:
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["gpus"])
        base = mine[0]
        for row in mine:
            row["speedup"] = base["train_seconds"] / row["train_seconds"]
            row["efficiency"] = row["speedup"] * base["gpus"] / row["gpus"]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("train_seconds", "total training time (s)"),
        ("images_per_second", "images per second"),
        ("efficiency", "scaling efficiency"),
    ]
    for axis, (key, label) in zip(axes, panels, strict=True):
        for strategy, marker in (("dp", "o"), ("ddp", "s")):
            mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["gpus"])
            if mine:
                axis.plot(
                    [r["gpus"] for r in mine], [r[key] for r in mine], marker=marker, label=strategy.upper()
                )
        # Without CUDA, `gpus` is what was asked for, not what ran: ddp ran that many CPU processes, dp one.
        axis.set_xlabel(
            "GPUs"
            if torch.cuda.is_available()
            else "gpus param (no CUDA: ddp = that many CPU processes, dp = 1 process)"
        )
        axis.set_ylabel(label)
        axis.set_xticks(sorted({r["gpus"] for r in rows}))
        axis.grid(alpha=0.3)
        axis.legend()
    axes[2].axhline(1.0, color="grey", linestyle=":", linewidth=1)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_scaling(params: Params, paths: Paths) -> list[dict]:
    """The whole study under one parent MLflow run; returns one row per configuration."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracked_run

    study = params.scaling
    work = paths.scaling / "work"
    work.mkdir(parents=True, exist_ok=True)
    sample = study_params(params, study.gpu_counts[0]).data
    manifest = build_shards(
        sample, params.seed, paths.raw, paths.raw_train, paths.raw_test, Paths(work).shards
    )
    images = manifest["splits"]["train"]["count"]
    device = device_label()
    flat = {
        k: v
        for k, v in to_flat_dict(params).items()
        if k.startswith(("scaling.", "model.", "train.batch_size", "train.lr", "seed"))
    }
    with tracked_run(
        params.mlflow.experiment, "scaling", params=flat, tags={"device": device}, run_name="scaling-study"
    ) as parent:
        rows = []
        for strategy in study.strategies:
            for gpus in study.gpu_counts:
                figures = train_configuration(params, strategy, gpus, work)
                MlflowClient().set_tag(figures["run_id"], "mlflow.parentRunId", parent.info.run_id)
                rows.append({**figures, "strategy": strategy, "gpus": gpus})
        add_efficiency(rows)
        for row in rows:
            prefix = f"{row['strategy']}_{row['gpus']}gpu_"
            mlflow.log_metrics(
                {
                    prefix + k: float(row[k])
                    for k in ("train_seconds", "images_per_second", "speedup", "efficiency")
                }
            )
        write_csv(paths.scaling / "scaling.csv", rows)
        title = (
            f"{params.model.name}, {images} images at {study.image_size}px, {study.epochs} epochs on {device}"
        )
        plot(paths.scaling / "scaling.png", rows, title)
        mlflow.log_artifact(str(paths.scaling / "scaling.csv"))
        mlflow.log_artifact(str(paths.scaling / "scaling.png"))
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "strategy",
        "GPUs",
        "processes",
        "train s",
        "images/s",
        "speed-up",
        "efficiency",
        "val acc",
        title="scaling study",
    )
    for r in rows:
        table.add_row(
            r["strategy"],
            str(r["gpus"]),
            str(r["world_size"]),
            f"{r['train_seconds']:.1f}",
            f"{r['images_per_second']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['efficiency']:.0%}",
            f"{r['val_accuracy']:.3f}",
        )
    Console().print(table)
