"""The `train` stage end to end on the tiny profile: outputs, MLflow record, determinism, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.checkpoint import checkpoint_path
from pipeline.config import load_params
from pipeline.paths import Paths
from pipeline.serving.precision import native_bf16
from pipeline.train import run_train

from conftest import REPO, deep_merge, write_params


def train_here(workspace: Path, strategy: str = "dp") -> dict:
    params_file = workspace / "params.yaml"
    assert run_train(load_params(params_file), Paths(workspace), strategy, params_file) == 0
    return json.loads(Paths(workspace).train_metrics(strategy).read_text())


class CliRun:
    """`python -m pipeline ARGS` started in a workspace. Output goes to a file rather than a pipe
    that nobody reads while the test waits: a full pipe would stall the training."""

    def __init__(self, workspace: Path, *args: str):
        self.log = workspace / f"{'-'.join(args)}.log"
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", *args],
                cwd=workspace,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def finish(self, timeout: float = 300) -> str:
        self.process.wait(timeout=timeout)
        output = self.log.read_text()
        errors = "\n".join(line for line in output.splitlines() if "Error" in line)
        assert self.process.returncode == 0, errors[-3000:] + output[-1500:]
        return output


def run_of(workspace: Path, strategy: str):
    run_id = json.loads((Paths(workspace).model_dir(strategy) / "run.json").read_text())["run_id"]
    return MlflowClient().get_run(run_id)


def test_dp_writes_outputs_and_one_complete_mlflow_run(tiny_workspace):
    figures = train_here(tiny_workspace, "dp")
    paths = Paths(tiny_workspace)
    model_dir = paths.model_dir("dp")
    assert {"model.safetensors", "model_config.json", "run.json"} <= {p.name for p in model_dir.iterdir()}
    assert figures["world_size"] == 1 and figures["device"] == "cpu" and figures["epochs"] == 2
    assert figures["images_per_second"] > 0 and 0 <= figures["val_accuracy"] <= 1
    curves = paths.train_curve("dp").read_text().splitlines()
    assert curves[0].startswith("epoch,") and len(curves) == 1 + 2

    run = run_of(tiny_workspace, "dp")
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["stage"], tags["strategy"], tags["device"], tags["cpu_only"], tags["allreduce"]) == (
        "train",
        "dp",
        "cpu",
        "true",
        "none",
    )
    precision = "bf16" if native_bf16(torch.device("cpu")) else "fp32"  # train.bf16 is on: used where native
    assert tags["precision"] == figures["precision"] == precision
    assert tags["git_commit"]
    history = MlflowClient().get_metric_history(run.info.run_id, "epoch_seconds")
    assert sorted(m.step for m in history) == [0, 1]
    for name in ("train_seconds", "images_per_second", "world_size", "peak_memory_mb", "data_wait_fraction"):
        # The value the MLflow UI shows is the whole-run figure, not the last epoch's.
        assert run.data.metrics[name] == pytest.approx(figures[name]), name
    assert run.data.params["model.name"] == "small_cnn"


def test_same_seed_same_metrics(tiny_workspace):
    first = train_here(tiny_workspace, "dp")
    second = train_here(tiny_workspace, "dp")
    for key in ("train_accuracy", "val_accuracy", "val_loss"):
        assert first[key] == second[key], key


@pytest.mark.slow
def test_ddp_under_torchrun_logs_one_run_from_the_main_process(tiny_workspace):
    output = CliRun(tiny_workspace, "train", "ddp").finish()
    figures = json.loads(Paths(tiny_workspace).train_metrics("ddp").read_text())
    assert figures["world_size"] == 2, output[-2000:]
    runs = mlflow.search_runs(experiment_names=["asl-alphabet"], filter_string="tags.stage = 'train'")
    assert len(runs) == 1, "one run per training, never one per rank"
    assert runs.iloc[0]["tags.strategy"] == "ddp" and runs.iloc[0]["metrics.world_size"] == 2
    assert runs.iloc[0]["tags.allreduce"] == "gloo", "CPU ranks average gradients over gloo"


@pytest.mark.slow
def test_ddp_matches_dp_on_a_model_without_batchnorm(tiny_workspace):
    """Same seed, same global batch: DDP over 2 processes ends where one process ends."""
    dp = train_here(tiny_workspace, "dp")
    CliRun(tiny_workspace, "train", "ddp").finish()
    ddp = json.loads(Paths(tiny_workspace).train_metrics("ddp").read_text())
    assert ddp["val_loss"] == pytest.approx(dp["val_loss"], rel=1e-3)
    assert ddp["train_accuracy"] == pytest.approx(dp["train_accuracy"], abs=0.02)


def _wait_for_checkpoint(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def _interrupt_dp_training(workspace: Path, signum: int) -> int:
    """Start `train dp`, send `signum` once its first checkpoint exists; returns its exit code."""
    run = CliRun(workspace, "train", "dp")
    _wait_for_checkpoint(checkpoint_path(workspace, "dp"), run.process)
    run.process.send_signal(signum)
    return run.process.wait(timeout=60)


def _worker_with_rank(process: subprocess.Popen, rank: str) -> psutil.Process:
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "pipeline" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise AssertionError(f"no worker with RANK={rank}")


@pytest.mark.slow
def test_torchrun_restarts_a_killed_worker_and_resumes_from_the_checkpoint(tiny_workspace):
    write_params(tiny_workspace, {"train": {"epochs": 40}, "distributed": {"max_restarts": 1}})
    run = CliRun(tiny_workspace, "train", "ddp")
    _wait_for_checkpoint(checkpoint_path(tiny_workspace, "ddp"), run.process)
    _worker_with_rank(run.process, "1").send_signal(signal.SIGKILL)
    output = run.finish()

    figures = json.loads(Paths(tiny_workspace).train_metrics("ddp").read_text())
    assert figures["resumed_from_epoch"] >= 1, output[-3000:]
    assert figures["epochs"] == 40
    run = run_of(tiny_workspace, "ddp")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")]
    assert set(steps) == set(range(40)), "every epoch logged to the same run"


@pytest.mark.slow
def test_resume_after_a_killed_dp_run_continues_the_same_run(tiny_workspace):
    write_params(tiny_workspace, {"train": {"epochs": 40}})
    _interrupt_dp_training(tiny_workspace, signal.SIGKILL)
    write_params(tiny_workspace, {"train": {"epochs": 40, "resume": True}})
    figures = train_here(tiny_workspace, "dp")
    assert figures["resumed_from_epoch"] >= 1 and figures["epochs"] == 40
    runs = mlflow.search_runs(experiment_names=["asl-alphabet"], filter_string="tags.stage = 'train'")
    assert len(runs) == 1, "the resumed training continues its run instead of opening a second"
    assert runs.iloc[0]["status"] == "FINISHED"


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_made_with_other_params(tiny_workspace):
    write_params(tiny_workspace, {"train": {"epochs": 40}})
    _interrupt_dp_training(tiny_workspace, signal.SIGKILL)
    write_params(tiny_workspace, {"train": {"epochs": 40, "lr": 0.01, "resume": True}})
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="other params"):
        train_here(tiny_workspace, "dp")
    runs = mlflow.search_runs(experiment_names=["asl-alphabet"], filter_string="tags.stage = 'train'")
    assert len(runs) == 1, "a refused resume opens no run"


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_job(tiny_workspace):
    """Two torchrun agents on this machine, one process each, meeting at one rendezvous endpoint."""
    endpoint = f"127.0.0.1:{_free_port()}"
    runs = []
    for node_rank in (0, 1):
        params = tiny_workspace / f"params-node{node_rank}.yaml"
        write_params(
            tiny_workspace,
            {"gpus": 1, "distributed": {"nnodes": 2, "node_rank": node_rank, "rdzv_endpoint": endpoint}},
        ).rename(params)
        runs.append(CliRun(tiny_workspace, "train", "ddp", "--params", params.name))
    for run in runs:
        run.finish()

    figures = json.loads(Paths(tiny_workspace).train_metrics("ddp").read_text())
    assert figures["world_size"] == 2
    train_runs = mlflow.search_runs(experiment_names=["asl-alphabet"], filter_string="tags.stage = 'train'")
    assert len(train_runs) == 1 and train_runs.iloc[0]["params.distributed.nnodes"] == "2"
    assert train_runs.iloc[0]["tags.allreduce"] == "gloo"


@pytest.mark.slow
def test_a_terminated_training_is_marked_failed_not_left_running(tiny_workspace):
    write_params(tiny_workspace, {"train": {"epochs": 40}})
    assert _interrupt_dp_training(tiny_workspace, signal.SIGTERM) != 0
    [record] = mlflow.search_runs(
        experiment_names=["asl-alphabet"], filter_string="tags.stage = 'train'", output_format="list"
    )
    assert record.info.status == "FAILED"


def test_a_finished_training_leaves_no_checkpoint_to_resume(tiny_workspace):
    train_here(tiny_workspace, "dp")
    assert not checkpoint_path(tiny_workspace, "dp").exists()
    write_params(tiny_workspace, {"train": {"resume": True}})
    assert train_here(tiny_workspace, "dp")["resumed_from_epoch"] == -1, "nothing to resume: a fresh training"


@pytest.mark.slow
def test_a_fresh_start_ignores_an_old_checkpoint(tiny_workspace):
    """A checkpoint of an earlier, unfinished training must not leak into a training that did not
    ask to resume, even one whose params would make the checkpoint acceptable."""
    write_params(tiny_workspace, {"train": {"epochs": 40}})
    _interrupt_dp_training(tiny_workspace, signal.SIGKILL)
    figures = train_here(tiny_workspace, "dp")
    assert figures["resumed_from_epoch"] == -1 and figures["epochs"] == 40


# --- what stops a training: a diverging loss, and user errors under ddp ------------------------


def _train_runs() -> list:
    query = "tags.stage = 'train'"
    return mlflow.search_runs(experiment_names=["asl-alphabet"], filter_string=query, output_format="list")


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_diverging_training_fails_its_run_and_writes_no_model(tiny_workspace):
    write_params(tiny_workspace, {"train": {"weight_decay": 1e30}})
    from pipeline.errors import UserError

    expected = r"^training diverged: the training loss became NaN or infinite by step \d+ of epoch 1: "
    with pytest.raises(UserError, match=expected + r"lower train.lr .* or train.weight_decay \(now 1e\+30\)"):
        train_here(tiny_workspace, "dp")
    [record] = _train_runs()
    assert record.info.status == "FAILED"
    logged = MlflowClient().search_logged_models(experiment_ids=[record.info.experiment_id])
    assert logged == [], "no model logged"
    paths = Paths(tiny_workspace)
    assert not paths.model_dir("dp").exists() and not paths.train_metrics("dp").exists()
    assert not checkpoint_path(tiny_workspace, "dp").exists(), "no checkpoint of a diverged epoch"


def test_ddp_refuses_a_corrupt_shard_before_starting_any_process(tiny_workspace):
    _damage(next((tiny_workspace / "data" / "shards").glob("val-*.safetensors")))
    from pipeline.errors import UserError

    params_file = tiny_workspace / "params.yaml"
    # Found by a rank, the error would come back as torchrun's exit code, not raised here.
    with pytest.raises(UserError, match=r"val-00000.safetensors is corrupt .*run `dvc repro -f preprocess`"):
        run_train(load_params(params_file), Paths(tiny_workspace), "ddp", params_file)


def test_ddp_refuses_an_incompatible_checkpoint_before_starting_any_process(tiny_workspace):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.errors import UserError

    save_checkpoint(checkpoint_path(tiny_workspace, "ddp"), {"fingerprint": "made-with-other-params"})
    params_file = write_params(tiny_workspace, {"train": {"resume": True}})
    with pytest.raises(UserError, match="was made with other params or data"):
        run_train(load_params(params_file), Paths(tiny_workspace), "ddp", params_file)


@pytest.mark.slow
def test_a_user_error_inside_ddp_ranks_is_one_line_and_exit_code_2(tiny_workspace):
    """A diverging loss is found by the ranks themselves: their line, once, not torchrun's traceback."""
    write_params(tiny_workspace, {"train": {"weight_decay": 1e30}})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline", "train", "ddp"]
    result = subprocess.run(command, cwd=tiny_workspace, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: training diverged: the training loss became NaN"), output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    [record] = _train_runs()
    assert record.info.status == "FAILED"
    assert not Paths(tiny_workspace).model_dir("ddp").exists()


@pytest.mark.slow
def test_ddp_validation_figures_are_those_of_the_exported_model(tiny_workspace):
    """Each rank's BatchNorm statistics come from its own batches; every rank must evaluate rank 0's,
    the exported model's, or the per-epoch validation blends several models."""
    from pipeline.feed import tensor_batches
    from pipeline.loop import StepSettings, evaluate
    from pipeline.serving.pyfunc import WEIGHTS_FILE, load_network, read_model_config
    from pipeline.shards import load_split
    from pipeline.strategy import Strategy

    write_params(tiny_workspace, {"model": {"name": "resnet18"}, "train": {"epochs": 1, "bf16": False}})
    CliRun(tiny_workspace, "train", "ddp").finish()
    paths = Paths(tiny_workspace)
    figures = json.loads(paths.train_metrics("ddp").read_text())
    assert figures["world_size"] == 2
    model_dir = paths.model_dir("ddp")
    network = load_network(model_dir / WEIGHTS_FILE, read_model_config(model_dir / "model_config.json"))
    val_x, val_y = load_split(paths.shards, "val")
    settings = StepSettings(device=torch.device("cpu"), channels_last=True, bf16=False)
    batches = tensor_batches(val_x, val_y, list(np.array_split(np.arange(len(val_y)), 4)), settings)
    val_loss, val_accuracy = evaluate(network, batches, Strategy(torch.device("cpu")), settings)
    assert figures["val_accuracy"] == pytest.approx(val_accuracy, abs=1e-9)
    assert figures["val_loss"] == pytest.approx(val_loss, rel=1e-5)


# Below the tiny splits' 2.14 MB, above the 2.08 MB that streaming them holds (two shards of 128).
STREAMED = {"train": {"memory_budget_gb": 0.0021, "shuffle_buffer": 50}}


@pytest.mark.slow
def test_an_interrupted_streamed_training_resumes_to_the_weights_of_an_uninterrupted_one(tiny_workspace):
    model_file = Paths(tiny_workspace).model_dir("dp") / "model.safetensors"
    write_params(tiny_workspace, deep_merge(STREAMED, {"train": {"epochs": 20}}))
    train_here(tiny_workspace, "dp")
    uninterrupted = model_file.read_bytes()
    assert run_of(tiny_workspace, "dp").data.tags["data_placement"] == "streamed"

    model_file.unlink()
    assert _interrupt_dp_training(tiny_workspace, signal.SIGKILL) != 0
    write_params(tiny_workspace, deep_merge(STREAMED, {"train": {"epochs": 20, "resume": True}}))
    figures = train_here(tiny_workspace, "dp")
    assert figures["resumed_from_epoch"] >= 1 and figures["epochs"] == 20
    assert model_file.read_bytes() == uninterrupted, (
        "each epoch's order depends on the seed and the epoch only"
    )


@pytest.mark.slow
def test_streamed_ddp_matches_streamed_dp_on_a_model_without_batchnorm(tiny_workspace):
    write_params(tiny_workspace, STREAMED)
    dp = train_here(tiny_workspace, "dp")
    output = CliRun(tiny_workspace, "train", "ddp").finish()
    assert "(streamed data)" in output
    ddp = json.loads(Paths(tiny_workspace).train_metrics("ddp").read_text())
    assert ddp["world_size"] == 2 and ddp["images_per_second"] > 0
    assert ddp["val_loss"] == pytest.approx(dp["val_loss"], rel=1e-3)
    assert ddp["train_accuracy"] == pytest.approx(dp["train_accuracy"], abs=0.02)


@pytest.mark.slow
def test_224_px_images_preprocess_train_evaluate_and_serve(tiny_workspace):
    """The size pretrained ResNets are trained at, end to end (small_cnn, so that it takes seconds)."""
    from pipeline.evaluate import run_evaluate
    from pipeline.preprocess import shard_workspace

    params = load_params(
        write_params(
            tiny_workspace, {"data": {"image_size": 224, "shard_size": None}, "train": {"epochs": 1}}
        )
    )
    paths = Paths(tiny_workspace)
    manifest = shard_workspace(params, paths)
    assert manifest["image_size"] == 224
    train_shards = [shard for shard in manifest["shards"] if shard["split"] == "train"]
    # The automatic shard size (about 64 MiB) spreads 224 px training images over several shards.
    assert len(train_shards) >= 2 and all(
        shard["count"] * 224 * 224 * 3 * 2 <= 64 * 2**20 for shard in train_shards
    )
    assert sum(shard["count"] for shard in train_shards) == manifest["splits"]["train"]["count"]

    figures = train_here(tiny_workspace, "dp")
    metrics = run_evaluate(params, paths, "dp")
    assert figures["epochs"] == 1 and metrics["val_images"] == manifest["splits"]["val"]["count"]
    assert json.loads((paths.model_dir("dp") / "model_config.json").read_text())["image_size"] == 224
    model = mlflow.pyfunc.load_model(
        json.loads((paths.model_dir("dp") / "run.json").read_text())["model_uri"]
    )
    image = next(paths.raw_test.iterdir()).read_bytes()
    import pandas as pd

    [prediction] = model.predict(pd.DataFrame({"image": [image]})).to_dict("records")
    assert prediction["label"] in manifest["classes"] and len(prediction["probabilities"]) == 29
