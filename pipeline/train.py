"""Stage `train@<strategy>`: train the classifier, track it in MLflow, keep checkpoints.

    python -m pipeline train dp     # one process: DataParallel over `gpus` devices (plain CPU without CUDA)
    python -m pipeline train ddp    # starts torchrun with `gpus` processes per node; each trains one rank

`train ddp` runs torchrun as `python -m pipeline.train <torchrun arguments>`: torchrun itself, except
that ranks failing with a user error end it with their one line and exit code 2, not a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.checkpoint import checkpoint_path, fingerprint, load_checkpoint
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

RANK_ERRORS = "PIPELINE_RANK_ERRORS"
"""Set by the launcher: a folder where a rank leaves its user error's line instead of printing it."""


def torchrun_command(params: Params, params_file: Path, workspace: Path) -> list[str]:
    """The torchrun invocation that starts `gpus` copies of `train ddp` on this node."""
    dist = params.distributed
    command = [
        sys.executable,
        "-m",
        "pipeline.train",
        f"--nproc-per-node={params.gpus}",
        f"--max-restarts={dist.max_restarts}",
    ]
    if dist.nnodes == 1:
        # --standalone picks a free port: two experiments training at once do not collide.
        command.append("--standalone")
    else:
        host, port = dist.rdzv_endpoint.rsplit(":", 1)
        command += [
            f"--nnodes={dist.nnodes}",
            f"--node-rank={dist.node_rank}",
            f"--master-addr={host}",
            f"--master-port={port}",
        ]
    return command + [
        "-m",
        "pipeline",
        "train",
        "ddp",
        "--params",
        str(params_file),
        "--workspace",
        str(workspace),
    ]


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


def run_torchrun(argv: list[str]) -> int:
    """torchrun with `argv`. When ranks failed with a user error, the lowest rank's line and exit code 2
    replace torchrun's ChildFailedError traceback (other failures keep it)."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    with tempfile.TemporaryDirectory(prefix="pipeline-rank-errors-") as folder:
        reported = Path(folder)
        os.environ[RANK_ERRORS] = folder  # the ranks inherit torchrun's environment
        # Once a rank has reported its error, the agent's notes on stopping the others say nothing more.
        agent_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
        agent_log.addFilter(lambda record: not any(reported.iterdir()))
        try:
            torchrun_main(argv)
        except ChildFailedError:
            errors = sorted(reported.glob("rank*.txt"), key=lambda path: int(path.stem.removeprefix("rank")))
            if not errors:
                raise
            print(f"error: {errors[0].read_text()}", file=sys.stderr)
            return UserError.exit_code
    return 0


def train_worker(params: Params, paths: Paths, strategy_name: str) -> dict | None:
    """Train in this process (a torchrun rank for ddp); set-up and teardown happen only here."""
    strategy = make_strategy(strategy_name, params.gpus, params.train.sync_batchnorm, params.train.compile)
    try:
        return fit(params, paths, strategy)
    finally:
        strategy.close()


def train_rank(params: Params, paths: Paths) -> int:
    """One torchrun rank of `train ddp`; a user error is left for the launcher, which prints it once."""
    try:
        train_worker(params, paths, "ddp")
    except UserError as err:
        folder = os.environ.get(RANK_ERRORS)
        if not folder:  # torchrun started by hand: the rank prints its own line
            raise
        (Path(folder) / f"rank{os.environ['RANK']}.txt").write_text(str(err))
        return err.exit_code
    return 0


def run_train(params: Params, paths: Paths, strategy_name: str, params_file: Path) -> int:
    """The stage's entry point: launch torchrun for ddp, or train right here."""
    if inside_torchrun():
        return train_rank(params, paths)
    preflight(params, paths, strategy_name)
    if strategy_name == "ddp":
        return launch_ddp(params, params_file, paths.root)
    train_worker(params, paths, strategy_name)
    return 0


def preflight(params: Params, paths: Paths, strategy_name: str) -> None:
    """Catch a user's mistakes before any process starts: one clear line, not a traceback per rank."""
    manifest = read_manifest(paths.shards)
    # Hashed here, once per node, before the ranks start: they then find the shards checked.
    verify_shards(paths.shards, manifest, ("train", "val"))
    check_visible_gpus(params.gpus)
    if strategy_name != "ddp":
        return
    check_batch_divides(params.train.batch_size, params.gpus * params.distributed.nnodes)
    if params.train.sync_batchnorm and not torch.cuda.is_available():
        raise UserError(SYNC_BATCHNORM_NEEDS_CUDA)
    if params.train.resume:
        load_checkpoint(checkpoint_path(paths.root, strategy_name), fingerprint(params, manifest))


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
