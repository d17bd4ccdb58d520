"""Stage `train@<strategy>`: train the classifier, track it in MLflow, keep checkpoints.

    python -m pipeline train dp     # one process: DataParallel over `gpus` devices (plain CPU without CUDA)
    python -m pipeline train ddp    # starts torchrun with `gpus` processes per node; each trains one rank
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.paths import Paths
from pipeline.shards import read_manifest, verify_shards
from pipeline.strategy import (
    SYNC_BATCHNORM_NEEDS_CUDA,
    check_batch_divides,
    check_visible_gpus,
    inside_torchrun,
    make_strategy,
)
from pipeline.trainer import fit


def torchrun_command(params: Params, params_file: Path, workspace: Path) -> list[str]:
    """The torchrun invocation that starts `gpus` copies of `train ddp` on this node."""
    dist = params.distributed
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={params.gpus}", f"--max-restarts={dist.max_restarts}"]
    if dist.nnodes == 1:
        # --standalone picks a free port: two experiments training at once do not collide.
        command.append("--standalone")
    else:
        host, port = dist.rdzv_endpoint.rsplit(":", 1)
        command += [f"--nnodes={dist.nnodes}", f"--node-rank={dist.node_rank}", f"--master-addr={host}", f"--master-port={port}"]
    return command + ["-m", "pipeline", "train", "ddp", "--params", str(params_file), "--workspace", str(workspace)]


def launch_ddp(params: Params, params_file: Path, workspace: Path) -> int:
    """Start torchrun and wait for it; returns its exit code.

    A SIGTERM to this process (`dvc queue kill`, a scheduler) is passed on to torchrun, which stops
    its workers and lets them mark the MLflow run FAILED; otherwise they would run on, orphaned.
    """
    torchrun = subprocess.Popen(torchrun_command(params, params_file, workspace))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: torchrun.send_signal(signum))
    try:
        return torchrun.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def train_worker(params: Params, paths: Paths, strategy_name: str) -> dict | None:
    """Train in this process (a torchrun rank for ddp); set-up and teardown happen only here."""
    strategy = make_strategy(strategy_name, params.gpus, params.train.sync_batchnorm)
    try:
        return fit(params, paths, strategy)
    finally:
        strategy.close()


def run_train(params: Params, paths: Paths, strategy_name: str, params_file: Path) -> int:
    """The stage's entry point: launch torchrun for ddp, or train right here."""
    if inside_torchrun():
        train_worker(params, paths, strategy_name)
        return 0
    preflight(params, paths, strategy_name)
    if strategy_name == "ddp":
        return launch_ddp(params, params_file, paths.root)
    train_worker(params, paths, strategy_name)
    return 0


def preflight(params: Params, paths: Paths, strategy_name: str) -> None:
    """Catch a user's mistakes before any process starts: one clear line, not a traceback per rank."""
    # Hashed here, once per node, before the ranks start: they then find the shards checked.
    verify_shards(paths.shards, read_manifest(paths.shards), ("train", "val"))
    check_visible_gpus(params.gpus)
    if strategy_name == "ddp":
        check_batch_divides(params.train.batch_size, params.gpus * params.distributed.nnodes)
        if params.train.sync_batchnorm and not torch.cuda.is_available():
            raise UserError(SYNC_BATCHNORM_NEEDS_CUDA)
